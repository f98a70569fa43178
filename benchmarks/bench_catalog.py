"""What `nf1prov catalog` costs for 10 and 1,200 model runs, against what a user would write.

Builds a temp sqlite MLflow store of runs shaped like real nf1prov model runs (the tags, params,
latest metrics and dataset input of a real tiny training: 29 tags, 53 params, 51 metrics, plus
--epochs of metric history, which no search reads) and a temp git repository holding README.md,
then times, in the same run:

  ours (library)   nf1prov.catalog: fetch_runs + rebuild (fetch, render, splice);
  peer (library)   what a user would write with MLflow's public API: MlflowClient.search_runs
                   paged with page_token (max_results=1000, MLflow's default page), then the
                   same template rendered by one Jinja call on the same context (nf1prov's
                   build_context and template environment: the template needs its filters);
  ours (CLI)       `python -m nf1prov catalog --readme README.md` as a subprocess, the store in
                   MLFLOW_TRACKING_URI: interpreter start, imports, store check, git checks,
                   the README and the last-written record written;
  peer (script)    the peer above as a `python -c` script that writes the block to a file;
  the read-only verbs as a user runs them (`python -m nf1prov ...` in a repository whose
  README is up to date), each read directly (`nf1prov.store_read`, MLflow not imported) and
  through MLflow (NF1PROV_STORE_READER=mlflow: the path before issue [4/8]): `catalog
  --check` (the pre-commit hook), `list` and `show` of one model;
  floor (script)   the outside check p5's floor: a `python -c` script that imports sqlite3 and
                   jinja2 only, reads the same rows (the model runs, their tags, the params and
                   metrics the catalogue shows) and renders the same templates
                   (catalog.md.j2, catalog_entry.md.j2) from a context built the plainest way
                   (no Markdown escaping, no long-tag joins, no health or registry lines); p5
                   asks `catalog --check` <= 6x its CPU seconds at 1,200 models.

Each size has its own store (the larger holds the smaller's runs). Every variant is timed the
same way, on every store: rounds that call each (variant, store) once, interleaved, so that a
machine busier at some moment weighs on all alike; one warm-up round, then the median of
--repeats rounds (the README restored before each call), in wall seconds and in CPU seconds
(this process and the subprocesses it waited for). Ours and the peer must produce the same
catalogue, byte for byte (asserted). Printed: the times, ours/peer at
each size, and for each variant the cost of the largest size over the smallest: for ours (CLI),
the cost a user sees of a store of 1,200 models over one of 10; then the read-only verbs' CPU
seconds read directly and through MLflow (after / before) and p5's ratio, `catalog --check`
over the floor. The verbs' two ways must print the same bytes (asserted).

    .venv/bin/python benchmarks/bench_catalog.py [--sizes 10,1200] [--repeats 5] [--epochs 5]
    .venv/bin/python benchmarks/bench_catalog.py --profile 1200   # cProfile of ours (library)
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag, ViewType

import nf1prov
from nf1prov import catalog, tracking
from nf1prov.config import defaults, flatten
from nf1prov.resources import shipped_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_demo import machine_line, versions  # noqa: E402  (the header every benchmark prints)

README = "# Project\n\nSome prose.\n\n## Model Descriptions\n\nTrained models, newest first.\n"
DESCRIPTION = {  # the upstream README's description of fearless-eel-256
    "summary": "",
    "architecture": "UNet Generator",
    "task": "One-to-One slice segmentation mask prediction",
    "qc": "Does not perform any QC or filtering of images or slices",
    "data": ["Trained and evaluated on all patient data except patient NF0014 (Holdout Patient)",
             "The model was developed using multiple segmentation masks:",
             ["Background", "Inner-cell", "Cell-boundary"]],
    "preprocessing": ["Each input slice is normalized",
                      "Each input is padded to preserve dimensionality (height and width "
                      "divisible by 16)"],
    "loss": ["The BCE loss is modified to account for segmentation mask pixel frequencies",
             ["Computed using an exponential moving average during training by initially "
              "randomly sampling image patches"],
             "The logged BCE used a random alpha exponential moving average hyperparameter"],
}
CLASSES = ("background", "inner-cell", "cell-boundary", "total")
EPOCH_METRICS = [f"{split}_{stat}_{c}" for split in ("train", "val")
                 for stat in ("bce", "dice", "iou", "precision", "recall") for c in CLASSES]
ADJECTIVES = ("sedate", "fearless", "brave", "calm", "eager", "gentle", "jolly", "keen")
ANIMALS = ("hog", "eel", "owl", "fox", "lynx", "kiwi", "hare", "wolf", "yak", "bee")


# --- the store ---------------------------------------------------------------------------------

def run_shape(i: int, start: int, epochs: int) -> tuple[dict, dict, list[Metric]]:
    """(tags, params, metrics) of the i-th model run, as a real training records them."""
    codename = f"{ADJECTIVES[i % len(ADJECTIVES)]}-{ANIMALS[i % len(ANIMALS)]}-{i}"
    description = {f"{tracking.DESCRIPTION_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v)
                   for k, v in DESCRIPTION.items()}
    patients = [f"NF00{n}" for n in (16, 18, 21, 25)]
    splits = {"train": {"fields": 40 + i % 7, "patients": patients},
              "val": {"fields": 5, "patients": patients[:2]},
              "test": {"fields": 5, "patients": patients[2:]}}
    tags = description | {
        tracking.NOTE_CONTENT: "- **Architecture:** UNet Generator\n- **Task:** ...",
        tracking.RUN_NAME: codename, tracking.CODENAME: codename,
        tracking.KIND: tracking.KIND_MODEL, tracking.GIT_COMMIT: f"{i:040x}",
        tracking.GIT_BRANCH: "main",
        tracking.GIT_DIRTY: "false", tracking.GIT_TAG: f"model/{codename}",
        tracking.DATA_SPLITS: json.dumps(splits),
        "nf1prov.distributed.backend": "none", "nf1prov.distributed.devices": "cuda x 1",
        "nf1prov.distributed.world_size": "1",
        "nf1prov.env.argv": json.dumps(["train", "--config", "configs/unet.toml"]),
        "nf1prov.env.cuda": "12.4", "nf1prov.env.gpu": "NVIDIA A100-SXM4-40GB",
        "nf1prov.env.platform": "Linux-5.15.0-x86_64-with-glibc2.35",
        "nf1prov.env.python": "3.11.7", "nf1prov.env.torch": "2.5.1+cu124",
        "nf1prov.env.torch_threads": "8", tracking.HOST: "gpu-box",
        tracking.PID: str(10_000 + i), tracking.HEARTBEAT: f"{start / 1000 + 3600:.3f}",
    }
    if i % 7 == 0:
        tags[tracking.NOTES] = json.dumps([f"Retrained after fixing the crop margin ({i})"])
    config = flatten(defaults()) | {"data.root": "/data/nf1/organoids"}
    params = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in config.items()}
    params |= {"dataset.train_fields": "40", "dataset.val_fields": "5", "dataset.test_fields": "5",
               "dataset.train_crops": "960", "dataset.val_crops": "120",
               "instances.seed_threshold": "0.5", "instances.foreground_threshold": "0.5",
               "instances.min_size": "10"}
    score = 0.5 + (i % 50) / 100
    metrics = [Metric(name, score + epoch / 1000, start + epoch * 60_000, epoch)
               for epoch in range(1, epochs + 1)
               for name in (*EPOCH_METRICS, "train_loss", "val_loss")]
    last = start + epochs * 60_000
    best = {"best_epoch": float(epochs - 2), "best_val_loss": 0.2, "epochs_run": float(epochs),
            "val_instance_f1": 0.7, "val_instance_ap": 0.6}
    best |= {f"best_val_dice_{c}": score for c in CLASSES}
    metrics += [Metric(name, value, last, 0) for name, value in best.items()]
    return tags, params, metrics


def populate(client: MlflowClient, experiment_id: str, first: int, count: int,
             epochs: int) -> None:
    """Model runs ``first`` .. ``first + count - 1`` (newer start times for higher numbers): a
    run failed now and then, the newest still training, each linked to the split manifest."""
    manifest = Dataset("split_manifest", "6f1f0c3a", "local", '{"path": "/data/nf1"}',
                       schema='{"mlflow_colspec": []}', profile='{"num_rows": 50}')
    for i in range(first, first + count):
        start = 1_700_000_000_000 + i * 3_600_000
        tags, params, metrics = run_shape(i, start, epochs)
        run_id = client.create_run(experiment_id, start_time=start,
                                   run_name=tags[tracking.RUN_NAME]).info.run_id
        room = 1000 - len(params) - len(tags)  # MLflow takes 1,000 values a batch
        client.log_batch(run_id, metrics=metrics[:room],
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        for chunk in range(room, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[chunk:chunk + 1000])
        client.log_inputs(run_id, [DatasetInput(manifest, [InputTag("mlflow.data.context",
                                                                    "training")])])
        if i % 97 == 5:
            client.set_tag(run_id, tracking.FAILURE, "RuntimeError: CUDA out of memory")
            client.set_terminated(run_id, "FAILED", end_time=start + 600_000)
        elif i < first + count - 1:  # the newest stays RUNNING: still training
            client.set_terminated(run_id, "FINISHED", end_time=start + 3_000_000)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "--quiet", "-b", "main")
    git(path, "config", "user.email", "bench@example.org")
    git(path, "config", "user.name", "bench")
    (path / "README.md").write_text(README)
    git(path, "add", "README.md")
    git(path, "commit", "--quiet", "-m", "README")
    return path


# --- ours and the peer -------------------------------------------------------------------------

def ours_library(client: MlflowClient, readme: Path) -> str:
    """nf1prov's catalogue in process: the catalogue block as spliced into the README."""
    return catalog.rebuild(readme, catalog.fetch_runs(client)).new_block


def peer_library(client: MlflowClient) -> str:
    """What a user would write: every model run through MLflow's own pagination, then the
    template rendered by one plain Jinja call (nf1prov's template, context and filters)."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, "tags.`nf1prov.kind` = 'model'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    context = catalog.build_context(runs)
    env = catalog.environment(catalog.template_dirs(None, None))
    return env.get_template(catalog.TEMPLATE_NAME).render(**context).rstrip("\n") + "\n"


# The peer as a user's script: only MLflow and the catalogue's template machinery imported.
PEER_SCRIPT = f"""
import sys
from pathlib import Path
from mlflow import MlflowClient
from mlflow.entities import ViewType
from nf1prov import catalog
{inspect.getsource(peer_library)}
Path(sys.argv[2]).write_text(peer_library(MlflowClient(tracking_uri=sys.argv[1])))
"""


# p5's floor: the same rows, the same templates, nothing else (argv: database, templates, out).
FLOOR_SCRIPT = r"""
import datetime, json, sqlite3, sys
import jinja2

db, templates, out = sys.argv[1:4]
con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
where = ("r.lifecycle_stage = 'active' AND r.run_uuid IN (SELECT run_uuid FROM tags WHERE "
         "key = 'nf1prov.kind' AND value = 'model')")
runs = {row[0]: {"run_id": row[0], "experiment_id": str(row[1]), "status": row[2],
                 "start": row[3], "tags": {}, "params": {}, "metrics": {}}
        for row in con.execute("SELECT r.run_uuid, r.experiment_id, r.status, r.start_time "
                               f"FROM runs AS r WHERE {where} ORDER BY r.start_time DESC")}
for table, field, keys in (("tags", "tags", ""),
                           ("params", "params", " AND x.key IN ('data.root')"),
                           ("latest_metrics", "metrics",
                            " AND (x.key LIKE 'best%' OR x.key = 'epochs_run')")):
    for run_id, key, value in con.execute(
            f"SELECT x.run_uuid, x.key, x.value FROM {table} AS x WHERE x.run_uuid IN "
            f"(SELECT r.run_uuid FROM runs AS r WHERE {where}){keys}"):
        runs[run_id][field][key] = value


def bullets(items, depth=0):
    for item in items:
        if isinstance(item, list):
            yield from bullets(item, depth + 1)
        else:
            yield {"indent": "  " * depth, "text": item}


def entry(run):
    tags, metrics = run["tags"], run["metrics"]
    fields = [{"label": key[20:].capitalize(), "text": value,
               "bullets": list(bullets(json.loads(value))) if value.startswith("[") else []}
              for key, value in tags.items() if key.startswith("nf1prov.description.") and value]
    splits = json.loads(tags.get("nf1prov.data.splits", "{}"))
    return {"commit": tags.get("mlflow.source.git.commit"),
            "codename": tags.get("nf1prov.codename"), "important": None, "warnings": [],
            "notes": json.loads(tags.get("nf1prov.notes", "[]")),
            "fields": fields, "run_id": run["run_id"], "status": run["status"],
            "date": datetime.datetime.fromtimestamp(run["start"] / 1000, datetime.UTC)
            .strftime("%Y-%m-%d"), "url": None, "registered": [],
            "data_root": run["params"].get("data.root"),
            "splits": [{"name": k, "fields": v["fields"], "patients": v["patients"]}
                       for k, v in splits.items()],
            "holdout_patients": None, "epochs_run": metrics.get("epochs_run"),
            "best_epoch": metrics.get("best_epoch"),
            "val_dice": [{"name": k[14:], "value": f"{v:.3f}"} for k, v in metrics.items()
                         if k.startswith("best_val_dice_")],
            "holdout_dice": [], "holdout_iou": [], "holdout_instances": [], "reproduced": None}


env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates), trim_blocks=True,
                         lstrip_blocks=True, keep_trailing_newline=True)
env.filters.update(code=lambda v: f"`{v}`", items=", ".join,
                   link=lambda text, url: f"[{text}]({url})",
                   scores=lambda items: ", ".join(f"{s['name']} {s['value']}" for s in items))
groups = {}
for run in runs.values():
    groups.setdefault(run["experiment_id"], []).append(entry(run))
with open(out, "w") as file:
    file.write(env.get_template("catalog.md.j2").render(
        groups=[{"experiment_id": e, "entries": entries} for e, entries in groups.items()]))
"""
THROUGH_MLFLOW = {tracking.STORE_READER: "mlflow"}  # the verbs' path before issue [4/8]
VERBS = ("catalog --check", "list", "show")


@dataclass
class Case:
    """One variant on one store: ``call()``, after ``before()`` (not timed)."""

    label: str
    size: int
    call: Callable[[], object]
    before: Callable[[], object] = lambda: None
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    result: object = None

    def time(self, keep: bool) -> None:
        self.before()
        cpu, wall = cpu_seconds(), time.perf_counter()
        self.result = self.call()
        if keep:
            self.walls.append(time.perf_counter() - wall)
            self.cpus.append(cpu_seconds() - cpu)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.walls), statistics.median(self.cpus)


def cpu_seconds() -> float:
    """CPU time of this process and of the subprocesses it waited for."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run(args: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def make_stores(tmp: Path, sizes: list[int], epochs: int) -> dict[int, str]:
    """{size: tracking URI}: a store per size, each holding the runs of the smaller ones."""
    work = tmp / "populating.db"
    client = tracking.client(f"sqlite:///{work}")
    experiment_id = tracking.ensure_experiment(client, tracking.DEFAULT_EXPERIMENT,
                                               f"sqlite:///{work}")
    uris, made = {}, 0
    for size in sizes:
        populate(client, experiment_id, made, size - made, epochs)
        made = size
        copy = tmp / f"mlflow-{size}.db"
        with closing(sqlite3.connect(work)) as source, closing(sqlite3.connect(copy)) as target:
            source.backup(target)
        uris[size] = f"sqlite:///{copy}"
    return uris


def bench(sizes: list[int], repeats: int, epochs: int, where: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-catalog-", dir=where) as tmp:
        tmp = Path(tmp)
        code = Path(nf1prov.__file__).parents[1]  # the nf1prov under test, in the subprocesses too
        print(machine_line())
        print(versions())
        print(f"nf1prov from {code}; stores in {tmp}; {epochs} epochs of metric history a run")
        cases = []
        for size, uri in make_stores(tmp, sizes, epochs).items():
            client = MlflowClient(tracking_uri=uri)
            repo = make_repo(tmp / f"repo-{size}")
            readme, peer_out = repo / "README.md", tmp / f"peer-{size}.md"
            env = tracking.child_environment(uri) | {"PYTHONPATH": str(code)}
            restore = partial(readme.write_text, README)
            cli = [sys.executable, "-m", "nf1prov", "catalog", "--readme", str(readme)]
            script = [sys.executable, "-c", PEER_SCRIPT, uri, str(peer_out)]
            cases += [Case("ours (library)", size, partial(ours_library, client, readme), restore),
                      Case("peer (library)", size, partial(peer_library, client)),
                      Case("ours (CLI)", size, partial(run, cli, repo, env), restore),
                      Case("peer (script)", size, partial(run, script, repo, env))]
            cases += verb_cases(tmp, size, uri, env)
        # Round 0 warms up. Every round times every case once, the order reversed each round,
        # so that a machine busier at some moment weighs on all of them alike.
        for round_ in range(repeats + 1):
            for case in cases if round_ % 2 else reversed(cases):
                case.time(keep=round_ > 0)
        by = {(case.label, case.size): case for case in cases}
        for size in sizes:
            ours = by["ours (library)", size].result
            assert ours == by["peer (library)", size].result, "ours and the peer differ"
            assert ours.count("**Commit:**") == size
            by["ours (CLI)", size].time(keep=False)  # once more: its README is checked
            readme = tmp / f"repo-{size}" / "README.md"
            assert catalog.catalogue_block(readme.read_text())[0] == ours
            assert (tmp / f"peer-{size}.md").read_text() == ours
            for verb in VERBS:  # read directly or through MLflow: the same bytes
                assert by[verb, size].result == by[f"{verb} (MLflow)", size].result, verb
            assert (tmp / f"floor-{size}.md").read_text().count("**Commit:**") == size
        print(f"median of {repeats} rounds after a warm-up, every case once a round; "
              "wall / CPU seconds")
        times: dict[int, dict[str, tuple[float, float]]] = {size: {} for size in sizes}
        for case in cases:
            times[case.size][case.label] = case.medians()
        report(times)
        report_verbs(times)


def verb_cases(tmp: Path, size: int, uri: str, env: dict) -> list[Case]:
    """The read-only verbs, read directly and through MLflow, and p5's floor, on the store of
    ``size`` runs: `catalog --check` in a repository whose README is up to date (as a
    pre-commit hook finds it), `list`, `show` of the oldest model."""
    checked = make_repo(tmp / f"checked-{size}")
    nf1prov_cli = [sys.executable, "-m", "nf1prov"]
    run([*nf1prov_cli, "catalog"], checked, env)  # the README up to date
    commands = {"catalog --check": [*nf1prov_cli, "catalog", "--check"],
                "list": [*nf1prov_cli, "list"],
                "show": [*nf1prov_cli, "show", run_shape(0, 0, 0)[0][tracking.RUN_NAME]]}
    cases = [Case(f"{verb}{how}", size, partial(run, command, checked, env | extra))
             for verb, command in commands.items()
             for how, extra in (("", {}), (" (MLflow)", THROUGH_MLFLOW))]
    floor = [sys.executable, "-c", FLOOR_SCRIPT, str(tracking.sqlite_path(uri)),
             str(shipped_dir("templates")), str(tmp / f"floor-{size}.md")]
    return cases + [Case("floor (script)", size, partial(run, floor, checked, env))]


def report_verbs(times: dict[int, dict[str, tuple[float, float]]]) -> None:
    """The read-only verbs' CPU seconds, read directly (after) and through MLflow (before), and
    p5: `catalog --check` over the floor at the largest size."""
    sizes = sorted(times)
    print("\nCPU seconds of the read-only verbs (python -m nf1prov ...): read directly "
          "(after) / through MLflow (before)")
    print(f"{'':22}" + "".join(f"{f'{size:,} runs':>26}" for size in sizes))
    for verb in VERBS:
        print(f"{verb:22}" + "".join(
            f"{times[s][verb][1]:>8.3f} / {times[s][verb + ' (MLflow)'][1]:>6.3f} "
            f"({times[s][verb + ' (MLflow)'][1] / times[s][verb][1]:>4.1f}x)" for s in sizes))
    print(f"{'floor (script)':22}" + "".join(f"{times[s]['floor (script)'][1]:>26.3f}"
                                             for s in sizes))
    large = sizes[-1]
    ratio = times[large]["catalog --check"][1] / times[large]["floor (script)"][1]
    print(f"p5: catalog --check on {large:,} models / floor = {ratio:.2f}x CPU seconds "
          f"({'holds' if ratio <= 6 else 'FAILS'}: <= 6x)")


def report(times: dict[int, dict[str, tuple[float, float]]]) -> None:
    sizes = sorted(times)
    print(f"{'':16}" + "".join(f"{f'{size:,} runs':>22}" for size in sizes))
    print(f"{'':16}" + f"{'wall':>11}{'CPU':>11}" * len(sizes))

    def row(label: str, cells: list[tuple[float, float]], unit: str) -> None:
        print(f"{label:16}" + "".join(f"{wall:>10.3f}{unit}{cpu:>10.3f}{unit}"
                                      for wall, cpu in cells))

    for ours, peer in (("ours (library)", "peer (library)"), ("ours (CLI)", "peer (script)")):
        row(ours, [times[s][ours] for s in sizes], "s")
        row(peer, [times[s][peer] for s in sizes], "s")
        row("  ours / peer", [(times[s][ours][0] / times[s][peer][0],
                               times[s][ours][1] / times[s][peer][1]) for s in sizes], "x")
    small, large = sizes[0], sizes[-1]
    for variant in ("ours (CLI)", "ours (library)", "peer (script)"):
        (wall_l, cpu_l), (wall_s, cpu_s) = times[large][variant], times[small][variant]
        print(f"{variant}, {large:,} runs / {small:,} runs: wall {wall_l / wall_s:.2f}x, "
              f"CPU {cpu_l / cpu_s:.2f}x")


def profile(size: int, epochs: int, where: str | None) -> None:
    """cProfile of ours (library) on ``size`` runs, after a warm-up call."""
    with tempfile.TemporaryDirectory(prefix="bench-catalog-", dir=where) as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(client, tracking.DEFAULT_EXPERIMENT, uri)
        populate(client, experiment_id, 0, size, epochs)
        readme = Path(tmp) / "README.md"
        readme.write_text(README)
        ours_library(client, readme)
        profiler = cProfile.Profile()
        profiler.runcall(ours_library, client, readme)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1200", help="run counts, ascending")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5, help="metric history of each run")
    parser.add_argument("--profile", type=int, metavar="RUNS",
                        help="profile ours (library) on RUNS runs instead of timing")
    parser.add_argument("--tmp", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="folder for the store and the repository (default: /dev/shm, "
                             "where MLflow's many commits while populating cost no disk syncs)")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if args.profile:
        profile(args.profile, args.epochs, args.tmp)
    else:
        bench(sorted(int(s) for s in args.sizes.split(",")), args.repeats, args.epochs, args.tmp)


if __name__ == "__main__":
    main()
