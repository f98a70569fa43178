"""The rooms of nf1prov and their layers (DESIGN 2, docs/architecture.md), read from the source:
every import of an nf1prov module, at module level or inside a function, must go to the same
layer or a lower one, and no chain of imports may lead back to where it started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nf1prov"

# Lowest first. A room is a subpackage of nf1prov or a module directly in it.
LAYERS = (
    ("errors", "resources", "process_spec", "code_origin", "devices", "git", "store_read",
     "tracking", "outbox", "atomic", "threads"),  # plumbing: errors, git, the MLflow store,
                                      # atomic writes
    ("data",),                        # TIFFs, crops, splits, the upstream layout
    ("config", "description", "weights"),  # configs and their [description]; model files
    ("segment",),                     # prediction, instances, baseline, evaluation (arrays)
    ("train",),                       # the training loop and the search
    ("provenance",),                  # commit, run tags, liveness, checkout, reproduce, models
    ("catalog",),                     # the README catalogue
    ("share",),                       # bioimage.io export, the model registry
    ("commands", "demo", "cli", "__main__"),  # the command line
)
LAYER = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = ["nf1prov", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "nf1prov"


def imports(module: str) -> set[str]:
    """The nf1prov modules ``module`` imports (``from nf1prov.x import y`` counts as
    nf1prov.x.y when that is a module, else as nf1prov.x)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_room_has_a_layer():
    rooms = {room(module) for module in MODULES} - {"nf1prov"}
    assert rooms <= set(LAYER), f"place these in LAYERS: {sorted(rooms - set(LAYER))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways(module):
    if room(module) == "nf1prov":
        return
    upward = sorted(target for target in GRAPH[module]
                    if room(target) != "nf1prov" and LAYER[room(target)] > LAYER[room(module)])
    assert not upward, (f"{module} (layer {LAYER[room(module)]}) imports from higher layers: "
                        + ", ".join(f"{t} ({LAYER[room(t)]})" for t in upward))


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_what_they_check():
    """The graph is not empty by mistake: known arrows are there."""
    assert "nf1prov.segment.predict" in GRAPH["nf1prov.provenance.models"]
    assert "nf1prov.train.trainer" in GRAPH["nf1prov.train.run"]
    assert "nf1prov.git" in GRAPH["nf1prov.provenance.commit"]
