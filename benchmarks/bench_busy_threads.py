"""Training steps on the CPU alone, beside other CPU-bound work and beside a second copy of
themselves, under each candidate thread policy: how many torch threads, and how their OpenMP
threads wait (torch's default: one thread per core, spinning about 300,000 times, some 3 ms,
before they sleep).

Each case runs in a fresh subprocess (the OpenMP runtime reads its settings once, at start):
the same UNet (width 16, 3 input slices), the same seeded batches of 8 crops of 128 x 128,
forward, loss and backward, Adam step, `--steps` times after 2 warm-up steps. Loads: "idle"
(nothing else started), "busy" (`--hogs` pure-Python busy loops beside it, one process each,
as another user's jobs would be), "pair" (two copies of the case at once, as two trainings:
the mean of the two). The policies (`POLICIES`): OpenMP variables, and a thread count that is
torch's own, fixed, the CPUs other processes left idle when the case starts
(`nf1prov.threads.idle_cpus`), or that measured again every `--epoch-steps` steps
(`torch.set_num_threads`, as a training could between epochs).

Printed: a header (date, machine, load, versions), each case's seconds as measured (rounds
alternate the policies and loads so that drift hits them alike), then per policy the best of
the rounds idle, busy and pair, and each over torch's default under the same load. The rule
the policy is chosen by (issue 27): idle at most 1.05x the default; busy and pair as near fair
sharing as can be.

Run: python benchmarks/bench_busy_threads.py [--steps 8] [--hogs 2] [--rounds 2]
         [--policies default,PASSIVE,...] [--loads idle,busy,pair]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_demo import BusyLoops, machine_line, versions  # noqa: E402

STEPS_CODE = """
import json, sys, time
mode, steps, epoch_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
from models.unet import UNet
from nf1prov import threads as nt
usable = nt.usable_cpus()
if mode.isdigit():
    torch.set_num_threads(int(mode))
elif mode != "torch":
    torch.set_num_threads(nt.idle_cpus(usable))
load = nt.OthersLoad()
torch.manual_seed(0)
model = UNet(in_channels=3, num_classes=3, base_width=16)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
x = torch.rand(8, 3, 128, 128); y = (torch.rand(8, 3, 128, 128) > 0.5).float()
def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward(); opt.step()
for _ in range(2):
    step()
used = []
start = time.perf_counter()
for i in range(steps):
    if mode == "epoch" and i and i % epoch_steps == 0:
        torch.set_num_threads(load.idle(usable))
    used.append(torch.get_num_threads())
    step()
print(json.dumps({"seconds": time.perf_counter() - start, "threads": used}))
"""

OMP_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
# name -> (OpenMP variables, threads: "torch" (its own), a number, "start" (the idle CPUs when
# the case starts) or "epoch" (measured again every --epoch-steps steps))
POLICIES = {
    "default": ({}, "torch"),
    "PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, "torch"),
    "spin 1e4": ({"GOMP_SPINCOUNT": "10000"}, "torch"),
    "spin 1e3": ({"GOMP_SPINCOUNT": "1000"}, "torch"),
    "spin 1e2": ({"GOMP_SPINCOUNT": "100"}, "torch"),
    "1 thread": ({}, "1"),
    "idle at start": ({}, "start"),
    "idle per epoch": ({}, "epoch"),
    "idle at start + spin 1e4": ({"GOMP_SPINCOUNT": "10000"}, "start"),
    "idle per epoch + spin 1e4": ({"GOMP_SPINCOUNT": "10000"}, "epoch"),
}
LOADS = ("idle", "busy", "pair")


def start_steps(steps: int, epoch_steps: int, policy: str) -> subprocess.Popen:
    variables, mode = POLICIES[policy]
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES} | variables
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-c", STEPS_CODE, mode, str(steps),
                             str(epoch_steps)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            text=True)


def finished(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode:
        sys.exit(f"a case failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def run_case(load: str, policy: str, args) -> tuple[float, list[int]]:
    """Seconds of the steps (the mean of the two copies for "pair") and the threads used."""
    with BusyLoops(args.hogs if load == "busy" else 0):
        processes = [start_steps(args.steps, args.epoch_steps, policy)
                     for _ in range(2 if load == "pair" else 1)]
        results = [finished(process) for process in processes]
    seconds = sum(r["seconds"] for r in results) / len(results)
    return seconds, [t for r in results for t in r["threads"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--epoch-steps", type=int, default=2,
                        help='steps between two measurements of "idle per epoch"')
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated names of POLICIES (default: all)")
    parser.add_argument("--loads", default=",".join(LOADS))
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    loads = [load for load in args.loads.split(",") if load]
    if "default" not in policies or set(policies) - set(POLICIES) or set(loads) - set(LOADS):
        parser.error(f"--policies from {list(POLICIES)} with default; --loads from {LOADS}")
    print(machine_line())
    print(versions())
    print(f"{args.steps} steps a case; busy: beside {args.hogs} busy loop(s); pair: two copies "
          f"at once; best of {args.rounds} rounds, policies and loads alternated")
    best: dict[tuple[str, str], float] = {}
    for number in range(args.rounds):
        order = policies if number % 2 == 0 else policies[::-1]
        for load in loads:
            for policy in order:
                seconds, used = run_case(load, policy, args)
                key = (load, policy)
                best[key] = min(best.get(key, float("inf")), seconds)
                print(f"  {load:4s}  {policy:26s} {seconds:7.2f} s  threads "
                      f"{min(used)}-{max(used)}", flush=True)
    print(f"\nload average at the end {' / '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\n{'policy':26s}" + "".join(f"{load:>22s}" for load in loads))
    for policy in policies:
        cells = []
        for load in loads:
            ratio = best[(load, policy)] / best[(load, "default")]
            cells.append(f"{best[(load, policy)]:7.2f} s ({ratio:4.2f}x)")
        print(f"{policy:26s}" + "".join(f"{cell:>22s}" for cell in cells))
    if "idle" in loads:
        idle = best[("idle", "default")]
        print("\nover the default's idle time (fair sharing of the CPUs: about 2x busy and pair):")
        for policy in policies:
            print(f"{policy:26s}" + "".join(f"{best[(load, policy)] / idle:20.2f}x  "
                                            for load in loads))


if __name__ == "__main__":
    main()
