"""Outside check p4 (issue 27): the same small training alone, beside two CPU-bound loops, and
two such trainings at once; each at most 2.5x the lone training (fair sharing of 2 cores costs
about 2x).

The training: `nf1prov train --config configs/demo.toml --set train.epochs=8` on `nf1prov
demo-data` output, in throwaway demo workspaces (`nf1prov.demo.prepare_workspace`, one per
training that may run at once, sharing one data folder), as a user runs it. Its seconds per
epoch come from the run's own `val_loss` timestamps (the median gap between epochs, read from
the workspace's store). Two variants by default (`--variants` names others: "1 thread",
"PASSIVE"), measured in the same run:

- "torch's default": what nf1prov did before issue 27, one thread per usable CPU and OpenMP's
  default waiting, given as the user's own variables (OMP_NUM_THREADS=<CPUs>,
  GOMP_SPINCOUNT=300000, libgomp's default spin), which nf1prov leaves alone;
- "nf1prov": no OpenMP variables, nf1prov chooses (`nf1prov.threads`).

Each round runs every case of both variants, the variants' order alternating between rounds;
the best of the rounds counts. Printed: a header (date, machine, load, versions), each
measurement, then per variant the three figures, their ratio to the lone training and whether
each is within 2.5x, and nf1prov's figures over torch's default.

    python benchmarks/bench_busy_training.py [--rounds 2] [--epochs 8] [--hogs 2]
        [--variants "torch's default,nf1prov,1 thread"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_demo import BusyLoops, child_env, epoch_seconds, machine_line, versions  # noqa: E402

LIMIT = 2.5  # p4: each case at most this many times the lone training
CASES = ("alone", "busy", "two at once")
OPENMP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def variant_environments() -> dict[str, dict[str, str]]:
    """The variants measured by default (the first two) and on request (``--variants``)."""
    cpus = len(os.sched_getaffinity(0))
    return {"torch's default": {"OMP_NUM_THREADS": str(cpus), "GOMP_SPINCOUNT": "300000"},
            "nf1prov": {},
            "1 thread": {"OMP_NUM_THREADS": "1"},
            "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}


class Workspace:
    """A demo workspace whose trainings read ``data``."""

    def __init__(self, folder: Path, data: Path):
        from nf1prov.demo import prepare_workspace, step_env

        self.folder = prepare_workspace(folder, echo=lambda *_: None)
        self.env = step_env(self.folder)
        self.data = data

    def start(self, epochs: int, variables: dict[str, str], log: Path) -> subprocess.Popen:
        env = child_env({k: v for k, v in self.env.items() if k not in OPENMP} | variables)
        command = [sys.executable, "-m", "nf1prov", "train", "--config", "configs/demo.toml",
                   "--data-root", str(self.data), "--json", "--set", f"train.epochs={epochs}"]
        return subprocess.Popen(command, cwd=self.folder, env=env, stdout=subprocess.PIPE,
                                stderr=log.open("wb"), text=True)

    def epoch_seconds(self, process: subprocess.Popen, log: Path) -> float:
        from nf1prov import tracking

        out, _ = process.communicate()
        if process.returncode:
            sys.exit(f"training failed (exit {process.returncode}):\n"
                     + log.read_text(errors="replace")[-3000:])
        client = tracking.client(self.env["MLFLOW_TRACKING_URI"], read_only=True)
        run_id = json.loads(out)["run_id"]
        self.threads = client.get_run(run_id).data.tags.get("nf1prov.env.torch_threads", "?")
        return epoch_seconds(client, run_id)


def measure(case: str, variables: dict[str, str], spaces: list[Workspace], args,
            logs: Path) -> list[float]:
    """Seconds per epoch of each training of ``case`` (two for "two at once")."""
    count = 2 if case == "two at once" else 1
    with BusyLoops(args.hogs if case == "busy" else 0):
        started = [(space, space.start(args.epochs, variables, logs / f"{n}.log"))
                   for n, space in enumerate(spaces[:count])]
        seconds = [space.epoch_seconds(process, logs / f"{n}.log")
                   for n, (space, process) in enumerate(started)]
        print(f"    ({case}: torch threads "
              + ", ".join(space.threads for space, _ in started) + ")", flush=True)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound loops beside 'busy'")
    parser.add_argument("--keep", type=Path, default=None, help="keep the workspaces here")
    parser.add_argument("--variants", default="torch's default,nf1prov",
                        help=f"comma-separated, from {list(variant_environments())}")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    print(machine_line())
    print(versions())
    print(f"configs/demo.toml, {args.epochs} epochs; busy: beside {args.hogs} CPU-bound loops; "
          f"best of {args.rounds} rounds, variants alternated", flush=True)
    base = args.keep or Path(tempfile.mkdtemp(prefix="nf1prov-bench-busy-"))
    known = variant_environments()
    names = list(dict.fromkeys(args.variants.split(",")))
    if set(names) - set(known):
        parser.error(f"--variants from {list(known)}")
    variants = {name: known[name] for name in names}
    best: dict[tuple[str, str], float] = {}
    try:
        data = base / "data"
        subprocess.run([sys.executable, "-m", "nf1prov", "demo-data", str(data)], check=True,
                       env=child_env(), stdout=subprocess.DEVNULL)
        spaces = [Workspace(base / f"workspace{n}", data) for n in (1, 2)]
        for number in range(args.rounds):
            order = list(variants) if number % 2 == 0 else list(variants)[::-1]
            for name in order:
                for case in CASES:
                    seconds = measure(case, variants[name], spaces, args, base)
                    key = (name, case)
                    best[key] = min(best.get(key, float("inf")), max(seconds))
                    print(f"  round {number + 1}  {name:16s} {case:12s} "
                          + ", ".join(f"{s:.2f}" for s in seconds) + " s per epoch", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average at the end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("seconds per epoch (best of the rounds; two at once: the slower of the two), and over "
          "the lone training:")
    for name in variants:
        alone = best[(name, "alone")]
        cells = [f"alone {alone:.2f} s"]
        for case in CASES[1:]:
            ratio = best[(name, case)] / alone
            cells.append(f"{case} {best[(name, case)]:.2f} s ({ratio:.2f}x, "
                         f"{'within' if ratio <= LIMIT else 'OVER'} {LIMIT}x)")
        print(f"  {name:16s} " + "; ".join(cells))
    default = "torch's default"
    if {default, "nf1prov"} <= set(variants):
        print("nf1prov over torch's default: " + "; ".join(
            f"{case} {best[('nf1prov', case)] / best[(default, case)]:.2f}x" for case in CASES))

if __name__ == "__main__":
    main()
