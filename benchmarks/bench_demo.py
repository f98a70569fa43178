"""The figures the docs give about `nf1prov demo` and `configs/demo.toml`: how long the demo
takes and what its models score, measured as a user would get them, with the date and machine.

Each run is a fresh temp folder in which `python -m nf1prov demo DIR` (what the `nf1prov`
command runs; this checkout's code first on PYTHONPATH) runs as a child process, `--fast` too.
Timed: the whole command (wall, and CPU time of it and every process it started, from
``os.wait4``), the start-up before its first step, and each of its steps (from the moment each
`[n/9]` header line reaches standard output to the next). Read back from the demo's own
`mlflow.db`: model 1 (`configs/demo.toml` as shipped) and model 2 (the learning rate the demo
changes): best validation Dice per class, validation instance F1 (the instance parameters'
tuning), epochs run and best epoch, `nf1prov.health`, seconds per epoch (between the MLflow
timestamps of consecutive epochs' `val_loss`), and model 1's held-out scores from the demo's
`evaluate --baseline`: inner-cell Dice, instance F1, AP, each beside the classical baseline's.

`--train-only` runs instead the `configs/demo.toml` training alone, as a user following the
README: a throwaway workspace (`nf1prov.demo.prepare_workspace`), `nf1prov demo-data data`,
`nf1prov train --config configs/demo.toml --data-root data --json [--set ...]`, then `nf1prov
evaluate CODENAME --data-root data --baseline`, each timed.

How the figures vary: every case runs `--repeats` times, the variants interleaved so that load
drift hits them alike, and is printed as mean (range). `--busy N` adds `--busy-repeats` runs
of each case beside N CPU-bound processes (`python -c "while True: pass"`, stopped after), as on
a shared machine. CPU training is seeded and deterministic, so the scores should not vary at
all; the times do.

The report (standard output) is Markdown ready to paste: a line with the date, the machine (CPU
model, cores, load average at the start and the end), the versions and the command, then the
tables. Progress goes to standard error.

    python benchmarks/bench_demo.py                       # demo and demo --fast, 3 runs each
    python benchmarks/bench_demo.py --variants fast --repeats 1
    python benchmarks/bench_demo.py --repeats 3 --busy 2  # and one run of each beside 2 busy loops
    python benchmarks/bench_demo.py --train-only --set train.learning_rate=3e-3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG_CODE = "while True: pass"
STEP_HEADER = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
MODEL_LINE = re.compile(r"^  model ([12]): (\S+)  commit ")
FINISHED = "Demo finished in "

# (row label, metric) read from a model's run; model 1's held-out rows pair model and baseline.
TRAINING_ROWS = [("best val Dice inner-cell", "best_val_dice_inner-cell"),
                 ("best val Dice cell-boundary", "best_val_dice_cell-boundary"),
                 ("val instance F1 (instance tuning)", "val_instance_f1"),
                 ("epochs run", "epochs_run"), ("best epoch", "best_epoch")]
HOLDOUT_ROWS = [("held-out inner-cell Dice", "dice_inner-cell"),
                ("held-out instance F1 (IoU 0.5)", "instance_f1"),
                ("held-out AP (IoU 0.5:0.95)", "instance_ap")]
COUNTS = ("epochs run", "best epoch")


@dataclass
class Run:
    """One measured run of a case: seconds by label (in the order measured) and figures."""

    case: str
    busy: int
    seconds: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    health: dict[str, str] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.seconds.get("whole command, wall") or self.seconds["nf1prov train, wall"]

    @property
    def group(self) -> str:
        return self.case + (f", {self.busy} busy" if self.busy else "")


# --- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def code_version() -> str:
    """This checkout's commit, marked when the work tree differs from it (read-only git)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    sha = git("rev-parse", "--short=10", "HEAD").stdout.strip() or "unknown"
    dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
    return f"commit {sha}{' with uncommitted changes' if dirty else ''}"


def machine_line() -> str:
    """Date, CPU model, cores and load average now: the start of the report."""
    now = datetime.datetime.now(datetime.UTC)
    return (f"{now:%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}, load average {load_average()} "
            "(1/5/15 min) at the start")


def versions() -> str:
    found = []
    for package in ("torch", "mlflow"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"Python {platform.python_version()}, {', '.join(found)}, nf1prov at "
            f"{code_version()}")


# --- running a command ---------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This checkout's code first, output unbuffered (each line is timed as it arrives)."""
    env = dict(os.environ if extra is None else extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Timed:
    wall: float
    cpu: float
    lines: list[tuple[float, str]]  # (seconds since the start, line)

    @property
    def stdout(self) -> str:
        return "".join(line + "\n" for _, line in self.lines)


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Timed:
    """Run ``command``, timestamping each stdout line; stderr goes to ``log``. Exits with the
    command's last output when it fails."""
    start = time.perf_counter()
    lines = []
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr)
        for raw in proc.stdout:
            lines.append((time.perf_counter() - start, raw.decode(errors="replace").rstrip("\n")))
        _, status, usage = os.wait4(proc.pid, 0)  # CPU of it and of the children it waited for
    wall = time.perf_counter() - start
    if status != 0:
        out = "\n".join(line for _, line in lines[-20:])
        err = log.read_text(errors="replace")[-3000:]
        sys.exit(f"`{shlex.join(command)}` failed (exit {os.waitstatus_to_exitcode(status)}) in "
                 f"{cwd}:\n{out}\n{err}")
    return Timed(wall, usage.ru_utime + usage.ru_stime, lines)


class BusyLoops:
    """N CPU-bound processes beside the measurement, as another user's jobs would be."""

    def __init__(self, count: int):
        self.count = count

    def __enter__(self) -> BusyLoops:
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG_CODE])
                      for _ in range(self.count)]
        time.sleep(0.5 if self.procs else 0)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


# --- what the runs produced ---------------------------------------------------------------------


def step_seconds(result: Timed) -> dict[str, float]:
    """Start-up (before the first step) and each step's seconds, from the demo's header lines."""
    marks = [(t, match) for t, line in result.lines if (match := STEP_HEADER.match(line))]
    ends = [t for t, line in result.lines if line.startswith(FINISHED)]
    if not marks:
        return {}
    seconds = {"start-up, to the first step": marks[0][0]}
    bounds = [t for t, _ in marks[1:]] + [ends[0] if ends else result.wall]
    for (start, match), end in zip(marks, bounds, strict=True):
        title = match.group(3).split(": nf1prov ")[0].split(" (")[0]
        title = re.sub(r"Create the demo workspace .*", "Create the demo workspace", title)
        seconds[f"{match.group(1)}. {title}"] = end - start
    return seconds


def model_run(client, codename: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`nf1prov.codename` = '{codename}'",
                              max_results=1)
    if not runs:
        sys.exit(f"no run with codename {codename} in the demo's store")
    return runs[0]


def epoch_seconds(client, run_id: str) -> float | None:
    """Median seconds between consecutive epochs' val_loss (None with a single epoch)."""
    times = [m.timestamp / 1000 for m in sorted(client.get_metric_history(run_id, "val_loss"),
                                                 key=lambda m: m.step)]
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    return statistics.median(gaps) if gaps else None


def model_figures(client, codename: str, label: str, run: Run, holdout: bool) -> None:
    """Fill ``run`` with the figures of one model's run, prefixed with ``label``."""
    model = model_run(client, codename)
    metrics = model.data.metrics
    for row, key in TRAINING_ROWS:
        if key in metrics:
            run.figures[f"{label}: {row}"] = metrics[key]
    run.health[label] = model.data.tags.get("nf1prov.health", "(no tag)")
    per_epoch = epoch_seconds(client, model.info.run_id)
    if per_epoch is not None:
        run.seconds[f"{label}: seconds per epoch"] = per_epoch
    if model.info.end_time:
        run.seconds[f"{label}: training run (MLflow start to end)"] = (
            model.info.end_time - model.info.start_time) / 1000
    if holdout:
        for row, key in HOLDOUT_ROWS:
            for method, prefix in (("model", "holdout_"), ("baseline", "holdout_baseline_")):
                if f"{prefix}{key}" in metrics:
                    run.figures[f"{label}: {row}, {method}"] = metrics[f"{prefix}{key}"]


# --- the cases -----------------------------------------------------------------------------------


def run_demo(fast: bool, busy: int, base: Path) -> Run:
    from nf1prov import tracking

    workspace = base / "demo-workspace"
    base.mkdir(parents=True)
    command = [sys.executable, "-m", "nf1prov", "demo", str(workspace), *(["--fast"] * fast)]
    with BusyLoops(busy):
        result = timed(command, base, child_env(), base / "demo-stderr.log")
    run = Run("demo --fast" if fast else "demo", busy)
    run.seconds["whole command, wall"] = result.wall
    run.seconds["whole command, CPU (all its processes)"] = result.cpu
    run.seconds.update(step_seconds(result))
    codenames = dict(m.groups() for _, line in result.lines if (m := MODEL_LINE.match(line)))
    client = tracking.client(tracking.default_tracking_uri(workspace), read_only=True)
    model_figures(client, codenames["1"], "model 1", run, holdout=True)
    model_figures(client, codenames["2"], "model 2", run, holdout=False)
    return run


def run_training(overrides: list[str], busy: int, base: Path) -> Run:
    """configs/demo.toml trained alone in a throwaway workspace, then evaluated."""
    from nf1prov import tracking
    from nf1prov.demo import CONFIG, DATA, prepare_workspace, step_env

    workspace = prepare_workspace(base / "workspace", echo=lambda *_: None)
    env = child_env(step_env(workspace))
    nf1prov = [sys.executable, "-m", "nf1prov"]
    log = base / "stderr.log"
    run = Run("configs/demo.toml", busy)
    with BusyLoops(busy):
        data = timed([*nf1prov, "demo-data", DATA], workspace, env, log)
        sets = [arg for item in overrides for arg in ("--set", item)]
        train = timed([*nf1prov, "train", "--config", CONFIG, "--data-root", DATA, "--json",
                       *sets], workspace, env, log)
        codename = json.loads(train.stdout)["codename"]
        evaluate = timed([*nf1prov, "evaluate", codename, "--data-root", DATA, "--baseline",
                          "--no-progress"], workspace, env, log)
    run.seconds["nf1prov demo-data, wall"] = data.wall
    run.seconds["nf1prov train, wall"] = train.wall
    run.seconds["nf1prov train, CPU (all its processes)"] = train.cpu
    run.seconds["nf1prov evaluate --baseline, wall"] = evaluate.wall
    client = tracking.client(env["MLFLOW_TRACKING_URI"], read_only=True)
    model_figures(client, codename, "model", run, holdout=True)
    return run


# --- the report ----------------------------------------------------------------------------------


def spread(values: list[float], text) -> str:
    """mean (min-max), or the one value when they are all equal."""
    if len(set(values)) == 1:
        return text(values[0]) + (f" (all {len(values)})" if len(values) > 1 else "")
    low, high = text(min(values)), text(max(values))
    return f"{text(statistics.fmean(values))} ({low.removesuffix(' s')}-{high})"


def seconds_text(value: float) -> str:
    return f"{value:.0f} s" if value >= 20 else f"{value:.1f} s"


def table(title: str, runs: list[Run], attribute: str, text) -> list[str]:
    groups = list(dict.fromkeys(run.group for run in runs))
    rows = list(dict.fromkeys(key for run in runs for key in getattr(run, attribute)))
    counts = {g: sum(run.group == g for run in runs) for g in groups}
    lines = [f"| {title} | " + " | ".join(f"{g} ({counts[g]} run{'s' * (counts[g] > 1)})"
                                         for g in groups) + " |",
             "| --- |" + " --- |" * len(groups)]
    for row in rows:
        cells = []
        for g in groups:
            values = [getattr(run, attribute)[row] for run in runs
                      if run.group == g and row in getattr(run, attribute)]
            cells.append(spread(values, text(row)) if values else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def report(runs: list[Run], started: str, argv: list[str]) -> list[str]:
    command = shlex.join(["python", "benchmarks/bench_demo.py", *argv])
    lines = [f"Measured with `{command}` on {started}, {load_average()} at the end; "
             f"{versions()}. Mean (range) over the runs, \"(all N)\" when all N runs gave the "
             "same; \"N busy\": beside N CPU-bound processes.", ""]
    lines += table("seconds", runs, "seconds", lambda _: seconds_text)
    lines.append("")
    lines += table("figure", runs, "figures",
                   lambda row: (lambda v: f"{v:.0f}") if row.endswith(COUNTS)
                   else (lambda v: f"{v:.3f}"))
    health = sorted({f"{label} `{tag}`" for run in runs for label, tag in run.health.items()})
    if health:
        lines += ["", f"`nf1prov.health` tags seen: {'; '.join(health)}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument("--variants", default="full,fast",
                        help="demo variants, comma-separated: full (`nf1prov demo`), fast "
                             "(`nf1prov demo --fast`); default both")
    parser.add_argument("--train-only", action="store_true",
                        help="the configs/demo.toml training (and its evaluation) alone instead "
                             "of the demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="with --train-only: a train --set override")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="also run each case beside N CPU-bound processes")
    parser.add_argument("--busy-repeats", type=int, default=1,
                        help="runs of each case beside the busy processes (default 1)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="make the runs' folders here and keep them (default: temp, deleted)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.train_only and (not variants or set(variants) - {"full", "fast"}):
        parser.error(f"--variants takes full and/or fast, not {args.variants!r}")
    if args.overrides and not args.train_only:
        parser.error("--set goes with --train-only (the demo takes no overrides)")

    sys.path.insert(0, str(REPO))
    started = machine_line()
    print(f"{started}\n", file=sys.stderr)
    plan = [(case, 0) for _ in range(args.repeats)
            for case in (["train"] if args.train_only else variants)]
    plan += [(case, args.busy) for _ in range(args.busy_repeats if args.busy else 0)
             for case in (["train"] if args.train_only else variants)]
    base = args.keep or Path(tempfile.mkdtemp(prefix="nf1prov-bench-demo-"))
    runs = []
    try:
        for number, (case, busy) in enumerate(plan, 1):
            folder = base / f"run{number:02d}-{case}{f'-busy{busy}' if busy else ''}"
            run = (run_training(args.overrides, busy, folder) if case == "train"
                   else run_demo(case == "fast", busy, folder))
            runs.append(run)
            print(f"run {number}/{len(plan)} {run.group}: {seconds_text(run.wall)}; " + ", ".join(
                f"{key} {value:.3f}" for key, value in run.figures.items()
                if "inner-cell" in key or "F1" in key), file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\n".join(report(runs, started, sys.argv[1:])))


if __name__ == "__main__":
    main()
