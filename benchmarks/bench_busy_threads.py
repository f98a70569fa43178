"""Training steps on the CPU with and without other CPU-bound work beside them, under torch's
default OpenMP thread waiting (threads spin about 300,000 times before they sleep), under
OMP_WAIT_POLICY=PASSIVE (they sleep at once) and under a short spin (GOMP_SPINCOUNT=10000).

Each case runs in a fresh subprocess (the OpenMP runtime reads its settings once, at start):
the same UNet (width 16, 3 input slices), the same seeded batches of 8 crops of 128 x 128,
forward, loss and backward, Adam step, `--steps` times after 2 warm-up steps, with torch's
default thread count (one per core). "busy" starts `--hogs` pure-Python busy loops first (one
process each, as another user's job would be) and stops them after. Printed: the seconds of
each case and, idle and busy, each setting's time over the default's.

Run: python benchmarks/bench_busy_threads.py [--steps 12] [--hogs 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

STEPS_CODE = """
import sys, time, torch
from models.unet import UNet
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
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(time.perf_counter() - start)
"""

HOG_CODE = "while True: pass"


SETTINGS = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin 1e4": {"GOMP_SPINCOUNT": "10000"}}


def run_steps(steps: int, setting: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")} | setting
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", STEPS_CODE, str(steps)], env=env, cwd=root,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hogs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.steps} steps a case; {args.hogs} busy loop(s) beside "
          f"the 'busy' cases; best of {args.rounds} rounds, cases interleaved")
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for load in ("idle", "busy"):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG_CODE])
                    for _ in range(args.hogs if load == "busy" else 0)]
            try:
                time.sleep(0.5 if hogs else 0)
                for name, setting in SETTINGS.items():
                    seconds = run_steps(args.steps, setting)
                    key = (load, name)
                    best[key] = min(best.get(key, float("inf")), seconds)
                    print(f"  {load:4s}  {name:8s} {seconds:7.2f} s")
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print()
    for load in ("idle", "busy"):
        default = best[(load, "default")]
        print(f"{load}: default {default:.2f} s; " + "; ".join(
            f"{name} {best[(load, name)]:.2f} s ({best[(load, name)] / default:.2f}x the default)"
            for name in SETTINGS if name != "default"))


if __name__ == "__main__":
    main()
