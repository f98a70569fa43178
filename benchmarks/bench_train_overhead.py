"""Trainer overhead: what nf1prov's training adds on top of the plain PyTorch loop doing the
same numeric work, measured side by side in one process.

Both arms train on the same `nf1prov demo-data` dataset (written to a temp dir), with the
config `configs/demo.toml` (UNet width 8, 64-pixel crops, batch 8) and early stopping out of
reach (patience = epochs), so that both run every epoch:

- plain: the loop a user would write around nf1prov's dataset and loss. The same
  `prepare_data` crop datasets, `DataLoader`s built with the same arguments and seeded
  generator, the same seeded model init, Adam, class-weighted BCE with its EMA weights
  (`WeightedBCELoss`), the crop-margin trim, every epoch a pass over the training batches then
  a validation pass for the validation loss (one `.item()` per validation batch). Deterministic
  algorithms on, as the trainer sets them on the CPU. No metrics, no logging, no progress bar.
- ours: the real training process of `nf1prov train`, `nf1prov.provenance.worker.train_in_run`,
  called in this process on a fresh run of a real sqlite MLflow store (temp dir) with the
  outbox and the heartbeat. Its loop (`trainer.fit`) adds per batch the metric sums and the
  tqdm bar, per epoch the metric computation, MLflow metrics, overlay PNGs, the
  `checkpoints/last.pt` artifact, the best-weights copy and a heartbeat. Around the loop,
  once per training: environment and `pip freeze`, params, config, split manifest, dataset
  input, best metrics, instance-parameter tuning, the model artifact and the run's end.

The ratio is fit time / plain time: the loop with everything the trainer does per batch and
per epoch, against the plain loop (target: overhead under 3 %). Beside it: the same ratio in
process CPU time (steadier on a shared machine) and the per-epoch pieces in ms. The
once-per-training costs do not grow with the training; they are printed in seconds, the
instance tuning apart (work a plain loop does not do at all, not overhead). After one untimed
warm-up of each arm the repeats alternate, ours first every other time, so that machine noise
hits both; the headline ratio is the median of the per-repeat ratios of the two back-to-back
runs, beside the ratio of the medians. Both arms end with the same weights (deterministic CPU
kernels, the same batches in the same order): the script prints the largest difference between
the plain loop's final parameters and those of the `checkpoints/last.pt` the run logged, and
between their per-epoch training and validation losses (0 and 0 when the work is identical).

One torch thread by default (`--threads 0`: torch's own default), as the tests use: on a
shared 2-core machine two threads make every timing swing by a factor of two.

    python benchmarks/bench_train_overhead.py                 # about 1.5 min on 2 cores
    python benchmarks/bench_train_overhead.py --epochs 4 --repeats 7 --width 16 --patients 8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from torch.utils.data import DataLoader

from models import ARCHITECTURES
from nf1prov import outbox, tracking
from nf1prov.config import load_config
from nf1prov.data.synthetic import write_demo_dataset
from nf1prov.provenance import run_tags, training
from nf1prov.provenance.heartbeat import Heartbeat
from nf1prov.train import trainer
from nf1prov.train.loss import WeightedBCELoss
from nf1prov.train.metrics import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# plain: the loop a user would write
# --------------------------------------------------------------------------------------------

def plain_loop(config: dict, data) -> tuple[dict, list[tuple[float, float]]]:
    """Train as `trainer.fit` does, minus everything but the numbers. Returns the final state
    dict and per epoch (train loss, val loss), both means over samples."""
    d, t, m = config["data"], config["train"], config["model"]
    margin = d["crop_margin"]
    torch.use_deterministic_algorithms(True)
    trainer.seed_everything(t["seed"])
    data.train.augment(config["augment"], t["seed"])
    model = ARCHITECTURES[m["architecture"]](in_channels=d["input_slices"],
                                             num_classes=len(CLASS_NAMES),
                                             base_width=m["base_width"])
    optimizer = torch.optim.Adam(model.parameters(), lr=t["learning_rate"], betas=(0.5, 0.999))
    weights = trainer.sample_class_weights(data.train, t["weight_samples"], t["seed"], margin)
    criterion = WeightedBCELoss(weights, alpha=t["alpha"])
    generator = torch.Generator().manual_seed(t["seed"])
    train_loader = DataLoader(data.train, batch_size=t["batch_size"], shuffle=True,
                              generator=generator, num_workers=t["num_workers"])
    val_loader = DataLoader(data.val, batch_size=t["batch_size"], shuffle=False,
                            num_workers=t["num_workers"])

    losses = []
    for epoch in range(1, t["epochs"] + 1):
        data.train.set_epoch(epoch)
        model.train()
        train_loss = torch.zeros((), dtype=torch.float64)
        for image, target, _ in train_loader:
            logits = trainer.trim(model(image), margin)
            loss, _ = criterion(logits, trainer.trim(target, margin), update=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss += loss.detach().double() * len(image)
        model.eval()
        val_loss = 0.0
        with torch.no_grad():
            for image, target, _ in val_loader:
                logits = trainer.trim(model(image), margin)
                loss, _ = criterion(logits, trainer.trim(target, margin))
                val_loss += loss.item() * len(image)
        losses.append((train_loss.item() / len(data.train), val_loss / len(data.val)))
    torch.use_deterministic_algorithms(False)
    return model.state_dict(), losses


# --------------------------------------------------------------------------------------------
# ours: the real training process, with its phases timed
# --------------------------------------------------------------------------------------------

class PhaseTimer:
    """Times the functions `train_model` and `fit` call, by wrapping them where they are looked
    up (module globals, class attributes): wall seconds per name in ``seconds``, process CPU
    seconds under ``"<name> cpu"``. The per-epoch names count only their calls inside `fit`."""

    PHASES = {  # name: (owner, attribute)
        "prepare_data": (trainer, "prepare_data"),
        "fit": (trainer, "fit"),
        "log_postprocess": (trainer, "log_postprocess"),
        # the per-epoch work inside fit
        "metrics to MLflow": (outbox.Outbox, "log_metrics"),
        "overlays": (trainer, "log_overlays"),
        "checkpoint": (trainer, "log_checkpoint"),
        "heartbeat": (Heartbeat, "beat"),
    }
    PER_EPOCH = ("metrics to MLflow", "overlays", "checkpoint", "heartbeat")

    def __init__(self) -> None:
        self.seconds = {f"{name}{cpu}": 0.0 for name in self.PHASES for cpu in ("", " cpu")}
        self.fitting = False

    def __enter__(self) -> PhaseTimer:
        self.originals = {name: getattr(owner, attr)
                          for name, (owner, attr) in self.PHASES.items()}
        for name, (owner, attr) in self.PHASES.items():
            setattr(owner, attr, self._timed(name, self.originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, (owner, attr) in self.PHASES.items():
            setattr(owner, attr, self.originals[name])

    def _timed(self, name, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            counts = name not in self.PER_EPOCH or self.fitting
            self.fitting |= name == "fit"
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                if counts:
                    self.seconds[name] += time.perf_counter() - start
                    self.seconds[f"{name} cpu"] += time.process_time() - cpu
                self.fitting &= name != "fit"
        return wrapper


def ours(config: dict, data_root: Path, cache_dir: Path, uri: str,
         experiment_id: str) -> tuple[dict[str, float], str]:
    """One `nf1prov train` training process on a new run. Returns (seconds by phase, with
    "total"; run id)."""
    client = tracking.client(uri)
    run = client.create_run(experiment_id, tags=run_tags.creation_tags(
        tracking.KIND_SCRATCH, config["description"]))  # the parent's part: not timed
    spec = training.Spec(run_id=run.info.run_id, tracking_uri=uri, config=config,
                       data_root=str(data_root), cache_dir=str(cache_dir), code_root=str(REPO),
                       argv=["train", "--bench"])
    with PhaseTimer() as phases:
        start = time.perf_counter()
        finished = training.train_in_run(spec)
        phases.seconds["total"] = time.perf_counter() - start
    assert finished, "the store stopped answering during the benchmark"
    mlflow.end_run()  # the worker leaves its process's active run to the process's end
    return phases.seconds, run.info.run_id


def logged_result(client, run_id: str, tmp: Path) -> tuple[dict, list[tuple[float, float]]]:
    """The run's `checkpoints/last.pt` weights and per-epoch (train_loss, val_loss)."""
    path = client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, k),
                                           key=lambda m: m.step)]
               for k in ("train_loss", "val_loss")}
    return ckpt["model"], list(zip(history["train_loss"], history["val_loss"], strict=True))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
               for k in a)


# --------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm")
    parser.add_argument("--width", type=int, default=8, help="UNet base width")
    parser.add_argument("--patients", type=int, default=5, help="demo-data patients")
    parser.add_argument("--sites", type=int, default=3, help="demo-data sites per patient")
    parser.add_argument("--size", type=int, default=128, help="demo-data image height, width")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 is the steadiest on a "
                             "shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "creating tables", ...
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    with tempfile.TemporaryDirectory(prefix="nf1prov-bench-train-") as tmp_name, \
            contextlib.chdir(tmp_name):  # nothing lands in the checkout
        tmp = Path(tmp_name)
        data_root, cache_dir = tmp / "demo-data", tmp / "cache"
        write_demo_dataset(data_root, patients=args.patients, sites=args.sites, slices=7,
                           height=args.size, width=args.size, seed=0)
        config = load_config(REPO / "configs" / "demo.toml", [
            f"train.epochs={args.epochs}", f"train.patience={args.epochs}",
            f"model.base_width={args.width}", 'train.device="cpu"'])
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        client = tracking.client(uri)
        experiment_id = tracking.ensure_experiment(client, "bench", uri)

        def plain() -> tuple[float, float, dict, list]:
            data = trainer.prepare_data(config, data_root, cache_dir)  # fresh, as ours does
            start, cpu = time.perf_counter(), time.process_time()
            weights, losses = plain_loop(config, data)
            return time.perf_counter() - start, time.process_time() - cpu, weights, losses

        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # tqdm, notes
            plain(), ours(config, data_root, cache_dir, uri, experiment_id)  # warm-up, cache
            plain_runs, ours_runs = [], []
            for repeat in range(args.repeats):
                if repeat % 2:  # every other repeat ours goes first
                    ours_runs.append(ours(config, data_root, cache_dir, uri, experiment_id))
                *seconds, plain_weights, plain_losses = plain()
                plain_runs.append(seconds)
                if not repeat % 2:
                    ours_runs.append(ours(config, data_root, cache_dir, uri, experiment_id))
            ours_weights, ours_losses = logged_result(client, ours_runs[-1][1], tmp / "down")
            crops = len(trainer.prepare_data(config, data_root, cache_dir).train)

    report(args, config, crops, plain_runs, [phases for phases, _ in ours_runs])
    weight_diff = max_difference(plain_weights, ours_weights)
    loss_diff = max(abs(a - b) for pair in zip(plain_losses, ours_losses, strict=True)
                    for a, b in zip(*pair, strict=True))
    print(f"same work: max |final parameter difference| = {weight_diff:.3g} (plain vs the "
          f"logged checkpoints/last.pt), max |per-epoch train/val loss difference| = "
          f"{loss_diff:.3g}")


def report(args, config: dict, crops: int, plain_runs: list, ours_runs: list) -> None:
    median = {k: statistics.median(run[k] for run in ours_runs) for k in ours_runs[0]}
    plain_s = statistics.median(s for s, _ in plain_runs)
    plain_cpu = statistics.median(c for _, c in plain_runs)
    fit, epochs = median["fit"], args.epochs
    t = config["train"]
    print(f"demo-data {args.patients} patients x {args.sites} sites, 7x{args.size}x{args.size}; "
          f"{crops} training crops, batch {t['batch_size']}, UNet width {args.width}, {epochs} "
          f"epochs, {torch.get_num_threads()} torch threads; medians of {args.repeats} "
          "alternating repeats")
    print("plain loop runs, s:   ", " ".join(f"{s:.3f}" for s, _ in plain_runs))
    print("nf1prov fit runs, s:  ", " ".join(f"{run['fit']:.3f}" for run in ours_runs))
    print(f"plain PyTorch loop:   {plain_s:8.3f} s   (CPU {plain_cpu:.3f} s)")
    print(f"nf1prov trainer loop: {fit:8.3f} s   (CPU {median['fit cpu']:.3f} s; trainer.fit "
          "in a real run)")
    # each repeat ran the two back to back: their ratio is the least touched by load swings
    ratio = statistics.median(run["fit"] / s
                              for run, (s, _) in zip(ours_runs, plain_runs, strict=True))
    best = min(run["fit"] for run in ours_runs) / min(s for s, _ in plain_runs)
    print(f"ratio ours/plain:     {ratio:8.4f}     (median of the back-to-back pairs; of the "
          f"medians {fit / plain_s:.4f}, best of each {best:.4f}, CPU time "
          f"{median['fit cpu'] / plain_cpu:.4f})")
    print(f"overhead:             {100 * (ratio - 1):+8.2f} %")
    per_epoch = {name: median[name] / epochs for name in PhaseTimer.PER_EPOCH}
    per_epoch_cpu = {name: median[f"{name} cpu"] / epochs for name in PhaseTimer.PER_EPOCH}
    rest = (fit - plain_s) / epochs - sum(per_epoch.values())
    rest_cpu = (median["fit cpu"] - plain_cpu) / epochs - sum(per_epoch_cpu.values())
    print("per epoch, ms wall (CPU): " + ", ".join(
        f"{name} {1000 * per_epoch[name]:.1f} ({1000 * per_epoch_cpu[name]:.1f})"
        for name in PhaseTimer.PER_EPOCH)
        + f"; the rest (metric sums, progress bar, ...) {1000 * rest:+.1f} "
        f"({1000 * rest_cpu:+.1f})")
    once = median["total"] - fit - median["prepare_data"] - median["log_postprocess"]
    print(f"once per training:    {once:8.3f} s   (environment and pip freeze, params, config, "
          f"manifest, model, run end: {100 * once / plain_s:.1f} % of this short training)")
    print(f"instance tuning:      {median['log_postprocess']:8.3f} s   (work the plain loop "
          "does not do; not overhead)")


if __name__ == "__main__":
    main()
