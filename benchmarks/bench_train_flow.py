"""`nf1prov train` end to end: training in one process (the flow before the training process
was split off) vs ours, where the training runs in a child process importing the model
commit's code (`nf1prov.provenance.worker`).

Both run as fresh processes on the same synthetic data and config, in a throwaway git
repository holding this checkout's nf1prov/ and models/, with a sqlite store:
- one process: preflight, a run, then `train_model` inside it, all in one interpreter;
- ours: `python -m nf1prov train --no-commit` (preflight and run in the parent, the training in
  the child). --no-commit keeps repeated runs from piling up commits; a committed model adds
  the commit itself and a `git archive` of the code on top.
Repeats alternate between the two; the medians are compared.

    python benchmarks/bench_train_flow.py [--repeats 3] [--epochs 2] [--width 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ONE_PROCESS = """
import sys
import mlflow
from nf1prov import tracking
from nf1prov.provenance import preflight
plan = preflight.preflight(config_path=sys.argv[1], overrides=sys.argv[2:], no_commit=True)
experiment = tracking.ensure_experiment(plan.client, plan.experiment_name, plan.tracking_uri)
run = plan.client.create_run(experiment)
from nf1prov.train.run import train_model
with mlflow.start_run(run_id=run.info.run_id):
    train_model(plan.config, plan.data_root, cache_dir=plan.cache_dir)
"""


def workspace(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for name in ("nf1prov", "models", "configs", "templates"):
        shutil.copytree(REPO / name, repo / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.nf1prov/\n/demo-data/\n"
                                     "__pycache__/\n")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "nf1prov", "demo-data", "demo-data", "--patients",
                    "3", "--sites", "2", "--slices", "5", "--height", "96", "--width", "96"],
                   cwd=repo, check=True, capture_output=True)
    return repo


def timed(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", f"model.base_width={args.width}",
                 "data.crop_size=32", "data.crop_stride=32", "train.overlay_crops=1"]
    with tempfile.TemporaryDirectory(prefix="nf1prov-bench-flow-") as tmp:
        repo = workspace(Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
               "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
               "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
               "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
        one = [sys.executable, "-c", ONE_PROCESS, "configs/demo.toml", *overrides]
        ours = [sys.executable, "-m", "nf1prov", "train", "--no-commit", "--config",
                "configs/demo.toml", *[a for o in overrides for a in ("--set", o)]]
        timed(ours, repo, env)  # warm-up: the store's schema, the decoded-stack cache
        baseline, split = [], []
        for _ in range(args.repeats):
            baseline.append(timed(one, repo, env))
            split.append(timed(ours, repo, env))
    b, s = statistics.median(baseline), statistics.median(split)
    print(f"one process (baseline):        {b:6.2f} s  (median of {args.repeats})")
    print(f"parent + training process:     {s:6.2f} s  (median of {args.repeats})")
    print(f"ratio ours / baseline: {s / b:.2f}x  (+{s - b:.2f} s per training)")


if __name__ == "__main__":
    main()
