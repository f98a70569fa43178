"""Data-parallel training on CPU: training samples per second of one process against two
data-parallel ranks (`nf1prov.train.distributed`), on the same data and config.

Both train the same UNet on the same synthetic data (`write_demo_dataset`, cached once before
anything is timed) with the same config: the same global batch (``train.batch_size``; each of
the 2 ranks gets half of every batch), the same number of epochs and batches per epoch, the same
seed. One process is a plain child process of this script; the 2 ranks are started by
``python -m torch.distributed.run --standalone --nproc-per-node 2`` (gloo). Each child first
runs one short warm-up `fit` (1 epoch of 1 batch: allocator, oneDNN kernels), then the timed
`fit`; metric logging goes to a no-op instead of MLflow, and no overlays are drawn.

What is timed, inside the children: the training epochs only (`run_epoch` on the training
split, each started after a barrier, including the loading of its batches, the gradient
all-reduce and the global batch norm); not process start-up, process-group set-up, data
preparation or the validation epochs (the whole `fit`, validation included, is shown alongside).
Samples per second = training crops processed (counted on every rank, summed) / those seconds.
Repeats alternate between the two set-ups (order swapped every repeat) so machine noise hits
both alike; the medians are compared.

Threads: both get the same total CPU budget, T = --threads (default: all cores): one process
runs T torch threads, each rank T/2 (at least 1); OMP_NUM_THREADS is set to match.

On a 2-core machine the 2 ranks split the same 2 cores the one process uses, so the ratio
shows what the gradient all-reduce and the sharded batch norm cost (a ratio below 1), not a
speed-up: a speed-up needs more cores (or GPUs) than one process can use.

    python benchmarks/bench_ddp.py [--repeats 3] [--epochs 2] [--batches 10] [--batch-size 16]
                                   [--crop-size 64] [--width 16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()

CONFIG = """[experiment]
name = "bench-ddp"

[data]
root = "{root}"
holdout_patients = []
input_slices = 3
crop_size = {crop}
crop_stride = {crop}
split_fractions = [0.6, 0.4, 0.0]

[model]
base_width = {width}

[train]
epochs = {epochs}
patience = {epochs}
batch_size = {batch_size}
learning_rate = 3e-3
device = "cpu"
weight_samples = 4
overlay_crops = 0
max_batches_per_epoch = {batches}
"""


# --- inside the children -----------------------------------------------------------------------


class _NoOutbox:
    """Stands in for the MLflow outbox: every logging call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Counting:
    """A loader that counts the crops it yields (this rank's share of each batch)."""

    def __init__(self, loader) -> None:
        self.loader, self.samples = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.samples += len(batch[0])
            yield batch


def rank_worker(args: argparse.Namespace) -> None:
    """One process, or one of the ranks: warm up, then time `fit`; rank 0 writes the JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from nf1prov import outbox
    from nf1prov.config import load_config
    from nf1prov.train import distributed, trainer

    outbox.current = lambda: _NoOutbox()
    config = load_config(args.config)
    warm = load_config(args.config, ["train.epochs=1", "train.max_batches_per_epoch=1"])
    ranks = distributed.init_from_environment("cpu")
    data = trainer.prepare_data(config, Path(config["data"]["root"]), Path(args.cache_dir))

    train_seconds, samples = [], []
    original = trainer.run_epoch

    def timed_run_epoch(split, model, loader, *rest, **kwargs):
        if split != "train":
            return original(split, model, loader, *rest, **kwargs)
        counting = _Counting(loader)
        kwargs.get("ranks", distributed.SINGLE).barrier()
        start = time.perf_counter()
        scores = original(split, model, counting, *rest, **kwargs)
        train_seconds.append(time.perf_counter() - start)
        samples.append(counting.samples)
        return scores

    trainer.run_epoch = timed_run_epoch
    trainer.fit(warm, data, checkpoint=False)
    train_seconds.clear()
    samples.clear()

    ranks.barrier()
    start = time.perf_counter()
    result = trainer.fit(config, data, checkpoint=False)
    fit_seconds = time.perf_counter() - start
    total = ranks.sum_(torch.tensor(sum(samples), dtype=torch.long)).item()
    if ranks.logs:
        Path(args.out).write_text(json.dumps({
            "world_size": ranks.world_size, "threads": torch.get_num_threads(),
            "epochs": result.epochs_run, "train_seconds": sum(train_seconds),
            "samples": total, "fit_seconds": fit_seconds,
            "train_loss": result.history[-1]["train_loss"]}))
    distributed.shutdown()


# --- the driver --------------------------------------------------------------------------------


def measure(nproc: int, threads: int, config: Path, cache: Path, out: Path) -> dict:
    worker = [str(SCRIPT), "--rank-worker", "--config", str(config), "--cache-dir", str(cache),
              "--out", str(out), "--threads", str(threads)]
    if nproc == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc), *worker]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    out.unlink(missing_ok=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{' '.join(command)} failed (exit status {done.returncode})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10, help="max_batches_per_epoch")
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="model.base_width")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=7)
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="total torch threads of each set-up (default: all cores)")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args)
        return

    from nf1prov.config import load_config
    from nf1prov.data.synthetic import write_demo_dataset
    from nf1prov.train import trainer

    per_rank = max(1, args.threads // 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, cache, config = tmp / "data", tmp / "cache", tmp / "bench.toml"
        write_demo_dataset(root, patients=args.patients, sites=args.sites, slices=args.slices,
                           height=args.image_size, width=args.image_size)
        config.write_text(CONFIG.format(root=root, crop=args.crop_size, width=args.width,
                                        epochs=args.epochs, batch_size=args.batch_size,
                                        batches=args.batches))
        data = trainer.prepare_data(load_config(config), root, cache)  # decode stacks once
        for i in range(len(data.train)):
            data.train[i]
        for i in range(len(data.val)):
            data.val[i]

        setups = {1: args.threads, 2: per_rank}
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for nproc in (1, 2) if repeat % 2 == 0 else (2, 1):
                runs[nproc].append(measure(nproc, setups[nproc], config, cache,
                                           tmp / f"result_{nproc}.json"))

    first = runs[1][0]
    print(f"{len(data.train)} training crops of {args.crop_size}x{args.crop_size} from "
          f"{args.patients * args.sites} stacks {args.slices}x{args.image_size}x"
          f"{args.image_size}; UNet width {args.width}; global batch {args.batch_size}; "
          f"{first['epochs']} epochs of at most {args.batches} batches")
    print(f"threads: 1 process x {runs[1][0]['threads']}, 2 ranks x {runs[2][0]['threads']} "
          f"each (--threads {args.threads}; {os.cpu_count()} cores here)")
    print()
    print(f"{'set-up':<10} {'repeat':>6} {'samples':>8} {'train s':>8} {'samples/s':>10} "
          f"{'fit s':>7} {'last train_loss':>16}")
    for nproc, label in ((1, "1 process"), (2, "2 ranks")):
        for i, run in enumerate(runs[nproc], 1):
            print(f"{label:<10} {i:>6} {run['samples']:>8} {run['train_seconds']:>8.2f} "
                  f"{run['samples'] / run['train_seconds']:>10.1f} {run['fit_seconds']:>7.2f} "
                  f"{run['train_loss']:>16.6f}")
    samples = {run["samples"] for nproc in runs for run in runs[nproc]}
    if len(samples) != 1:
        print(f"WARNING: the runs trained on different numbers of samples: {sorted(samples)}")

    def median_rate(nproc: int) -> float:
        return statistics.median(run["samples"] / run["train_seconds"] for run in runs[nproc])

    def best_rate(nproc: int) -> float:
        return max(run["samples"] / run["train_seconds"] for run in runs[nproc])

    one, two = median_rate(1), median_rate(2)
    print()
    print(f"1 process : {one:.1f} samples/s (median of {args.repeats})")
    print(f"2 ranks   : {two:.1f} samples/s (median of {args.repeats})")
    print(f"ratio 2 ranks / 1 process: {two / one:.2f}")
    print(f"(fastest runs: 1 process {best_rate(1):.1f}, 2 ranks {best_rate(2):.1f} samples/s, "
          f"ratio {best_rate(2) / best_rate(1):.2f}; on a shared machine the spread of the runs "
          "above shows how much other load moved them)")
    if (os.cpu_count() or 1) <= 2 or args.threads <= 2:
        print(f"Note: with {args.threads} threads in all, the 2 ranks split the same cores the "
              "one process uses, so this ratio shows the cost of the gradient all-reduce and "
              "the sharded batch norm, not a speed-up; a speed-up needs more cores (or GPUs) "
              "than one process can use.")


if __name__ == "__main__":
    main()
