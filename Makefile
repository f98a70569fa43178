# `make test` and `make demo` set up .venv themselves: torch==2.13.0 first (the CPU wheel; a bare
# `torch` would pull a multi-GB CUDA build), then the project with its dev extra.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15

demo: $(STAMP)
	$(VENV)/bin/nf1prov demo --replace

lint: $(STAMP)
	$(VENV)/bin/ruff check nf1prov models tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q monai==1.6.1  # bench_predict.py's peer; not a dependency of nf1prov
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .nf1prov demo-workspace
