"""How long `nf1prov catalog` takes to render 10, 100 and 1,000 model runs.

Creates the runs in a temp sqlite store (create_run + one log_batch + set_terminated each) and
times, in the same process:
  catalog   one search for every model run (tracking.model_runs), then render and splice;
  baseline  the naive way: list the run IDs, then one get_run per run, then render and splice.

    .venv/bin/python benchmarks/bench_catalog.py [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from nf1prov import catalog, tracking

DESCRIPTION = {
    "architecture": "UNet Generator",
    "task": "One-to-One slice segmentation mask prediction",
    "data": json.dumps(["All patients except NF0014", "Masks:",
                        ["Background", "Inner-cell", "Cell-boundary"]]),
    "loss": json.dumps(["Class-weighted BCE", ["EMA class weights"]]),
}


def populate(client: MlflowClient, experiment_id: str, count: int, offset: int) -> None:
    for i in range(offset, offset + count):
        start = 1_700_000_000_000 + i * 1000
        codename = f"bench-run-{i}"
        run = client.create_run(experiment_id, start_time=start, run_name=codename)
        tags = {tracking.KIND: tracking.KIND_MODEL, tracking.CODENAME: codename,
                tracking.GIT_COMMIT: f"{i:040x}", tracking.GIT_TAG: f"model/{codename}",
                tracking.NOTES: json.dumps([f"note for run {i}"])}
        tags.update({tracking.DESCRIPTION_PREFIX + k: v for k, v in DESCRIPTION.items()})
        metrics = [Metric(f"best_val_dice_{c}", 0.5 + (i % 50) / 100, start, 0)
                   for c in catalog.CLASSES]
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param("data.holdout_patients", "['NF0014']")],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id, "FINISHED", end_time=start + 500)


def render_catalog(client: MlflowClient, readme: Path) -> str:
    return catalog.rebuild(readme, catalog.fetch_runs(client)).new


def render_naive(client: MlflowClient, readme: Path) -> str:
    ids = [r.info.run_id for r in tracking.search_runs_all(
        client, f"tags.`{tracking.KIND}` = '{tracking.KIND_MODEL}'")]
    runs = [client.get_run(run_id) for run_id in ids]
    return catalog.rebuild(readme, catalog.newest_first(runs)).new


def timed(fn, *args) -> tuple[float, str]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        experiment_id = client.create_experiment("bench")
        readme = Path(tmp) / "README.md"
        made = 0
        print(f"{'runs':>6} {'create s':>9} {'catalog s':>10} {'naive s':>8} {'ratio':>6}")
        for size in sizes:
            create_s, _ = timed(populate, client, experiment_id, size - made, made)
            made = size
            render_catalog(client, readme)  # warm caches (templates, SQL statements)
            fast_s, fast = timed(render_catalog, client, readme)
            naive_s, naive = timed(render_naive, client, readme)
            assert fast == naive and fast.count("**Commit:**") == size
            print(f"{size:>6} {create_s:>9.2f} {fast_s:>10.3f} {naive_s:>8.3f} "
                  f"{naive_s / fast_s:>5.1f}x")


if __name__ == "__main__":
    main()
