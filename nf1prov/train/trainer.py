"""The training loop. Read it top to bottom: data, model, loss, loop, logging.

`train_one` (through `nf1prov.train.run.train_model`) trains inside the *active* MLflow run (the
caller starts it, ends it, and marks it FAILED when this raises) and logs into it:

- params: the flattened config (`nf1prov.config.flatten`; lists as JSON) and dataset sizes;
- artifacts: `config/config.toml`, `manifest/split_manifest.csv`, `overlays/epoch_NNN/*.png`,
  `checkpoints/last.pt` (after every epoch), the best model `model/` and
  `plots/learning_curve.png`;
- the split manifest as an MLflow dataset input (context "training");
- tags: `mlflow.note.content`, `nf1prov.description.<field>` and, at the end, the health
  verdict `nf1prov.health` (DESIGN 3.3, `nf1prov.train.health`);
- metrics per epoch (step = epoch, 1-based) named `<split>_<metric>_<class>` (DESIGN 3.7), and
  after training `best_epoch`, `best_val_loss`, `best_val_dice_<class>`.

Per batch the loop does only device work (forward, loss, backward, step, metric sums); the host
synchronises for the progress bar every `PROGRESS_EVERY` batches and once per epoch for metrics.
On CPU, `torch.use_deterministic_algorithms(True)`: the same config on the same data gives
bitwise-identical metrics (`nf1prov reproduce` relies on it).

Data-parallel (``train.nproc`` > 1, `nf1prov.train.distributed`): every rank runs this loop on
its shard of each global batch and gets the same epoch metrics; rank 0 alone logs (the other
ranks never touch MLflow) and, after the loop, chooses the instance parameters and logs the
model.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from nf1prov import outbox, tracking
from nf1prov.config import flatten, to_toml
from nf1prov.description import description_markdown, description_tags
from nf1prov.devices import pick_device
from nf1prov.errors import Nf1provError, UserError
from nf1prov.tracking import NOTE_CONTENT
from nf1prov.train import distributed
from nf1prov.train.loss import WeightedBCELoss, initial_class_weights
from nf1prov.train.metrics import CLASS_NAMES, EpochMetrics

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
PROGRESS_EVERY = 20  # batches between progress-bar loss readings (each one syncs the device)
EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """What `train_model` returns. ``model`` holds the best epoch's weights, on the CPU, in eval
    mode; ``best_metrics`` is that epoch's full metric dict (train and val)."""

    best_epoch: int
    best_val_loss: float
    best_metrics: dict[str, float]
    model: nn.Module
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list, repr=False)  # per epoch


@dataclass
class PreparedData:
    """Fields of view by split, the crop datasets and the split manifest (pandas.DataFrame)."""

    splits: dict[str, list]
    train: Any  # nf1prov.data.dataset.CropDataset
    val: Any
    manifest: Any
    source: str  # data root, as logged
    cache_dir: Path | None = None  # where file hashes are remembered


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

def check_can_train(config: dict, resume_from: Path | None) -> None:
    """Refusals before anything is logged: no active run, no such device or architecture, no
    checkpoint."""
    if distributed.current().logs and _active_run() is None:
        raise RuntimeError("train_model must be called inside an active MLflow run "
                           "(mlflow.start_run()); the caller owns the run.")
    resolve_device(config["train"]["device"])
    from models import ARCHITECTURES

    name = config["model"]["architecture"]
    if name not in ARCHITECTURES:
        raise UserError(f"model.architecture {name!r} is not in models.ARCHITECTURES (known: "
                        f"{', '.join(sorted(ARCHITECTURES))}): set it to one of those, or add "
                        "the class there.")
    if resume_from is not None and not Path(resume_from).is_file():
        raise UserError(f"Checkpoint {resume_from} does not exist: pass the checkpoints/last.pt "
                        "of the run to resume.")


def _active_run():
    import mlflow  # here, not above: the ranks that never log need not import MLflow (seconds)

    return mlflow.active_run()


def train_one(config: dict, data_root: Path, *, cache_dir: Path,
              resume_from: Path | None = None,
              on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train the one model of ``config`` on ``data_root`` inside the active MLflow run (what
    `nf1prov.train.run.train_model` does when ``train.trials`` is 1); see there."""
    check_can_train(config, resume_from)
    ranks = distributed.current()
    # One rank per machine decodes the stacks into the cache; the others then read it.
    if ranks.local_rank != 0:
        ranks.barrier()
    data = prepare_data(config, Path(data_root), Path(cache_dir))
    if ranks.local_rank == 0:
        ranks.barrier()
    distributed.check_same_data(data.manifest, data.source, ranks)
    if ranks.logs:
        log_run_inputs(config, data, resumed=resume_from is not None)
        device = distributed.device_for(resolve_device(config["train"]["device"]), ranks)
        outbox.current().set_tags(distributed.run_tags(device, ranks))
    result = fit(config, data, resume_from=resume_from, on_epoch=on_epoch, checkpoint=True)
    if not ranks.logs:
        return result
    log_best(result)
    postprocess, instance_scores = log_postprocess(config, data, result.model)
    log_mlflow_model(config, data, result, postprocess, instance_scores)
    log_health(config, data, result, instance_scores)
    return result


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def prepare_data(config: dict, data_root: Path, cache_dir: Path) -> PreparedData:
    """Discover and validate fields of view (only those of ``data.fields`` when it lists any),
    split them, build the train/val crop datasets."""
    from nf1prov.data import layout, manifest, splits
    from nf1prov.data.dataset import CropDataset

    d = config["data"]
    fields = layout.discover_training_fields(data_root, d)  # data.fields narrows it
    layout.validate_fields(fields, d["input_slices"], d["crop_size"],
                           normalisation=d["normalisation"], edge_slices=d["edge_slices"])
    by_split = splits.split_fields(fields, d["split_fractions"])

    def crops(split: str) -> CropDataset:
        return CropDataset(by_split[split], input_slices=d["input_slices"],
                           crop_size=d["crop_size"], crop_stride=d["crop_stride"],
                           boundary_thickness=d["boundary_thickness"], cache_dir=cache_dir,
                           normalisation=d["normalisation"], edge_slices=d["edge_slices"])

    train, val = crops("train"), crops("val")
    for name, ds in (("training", train), ("validation", val)):
        if len(ds) == 0:
            raise UserError(f"The {name} split of {data_root} holds no {d['crop_size']}-pixel "
                            "crops: add fields of view, or lower data.crop_size.")
    return PreparedData(splits=by_split, train=train, val=val,
                        manifest=manifest.build_manifest(by_split, cache_dir=cache_dir),
                        source=str(data_root), cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

@dataclass
class Training:
    """What a training step changes, and a checkpoint saves and restores: the model (and
    ``trained``, the same model inside DDP when data-parallel), optimiser, gradient scaler, loss
    weights, the shuffle generator, the early-stopping state and the per-epoch metrics."""

    model: nn.Module
    trained: nn.Module  # what the training steps call: model, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: WeightedBCELoss
    generator: torch.Generator  # the shuffle order is part of the seeded state
    build: Callable[[], nn.Module]  # a fresh plain network of the config's architecture
    state: dict = field(default_factory=lambda: {
        "epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0})
    best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
    history: list[dict[str, float]] = field(default_factory=list)


def fit(config: dict, data: PreparedData, *, resume_from: Path | None = None,
        on_epoch: EpochCallback | None = None, checkpoint: bool = True,
        trial: int | None = None) -> TrainResult:
    """Train with early stopping on validation loss; log per-epoch metrics, overlays and (with
    ``checkpoint``) `checkpoints/last.pt` to the active run, and print each epoch's line
    (`epoch_line`; ``trial``: the search trial it trains). Returns the best epoch's model."""
    d, t = config["data"], config["train"]
    ranks = distributed.current()
    device = distributed.device_for(resolve_device(t["device"]), ranks)
    use_amp = device.type == "cuda"  # AMP only on CUDA (CPU autocast is slow and imprecise)
    with deterministic(device.type == "cpu"):
        seed_everything(t["seed"])
        log.info("seed %d (torch, numpy, random, DataLoader generator)", t["seed"])
        # each epoch's crop transforms come from (seed, epoch): resumable by construction
        data.train.augment(config["augment"], t["seed"])
        run = build_training(config, data, device, ranks, use_amp)
        train_loader, val_loader = make_loaders(data, t, run.generator, ranks, device)
        overlay_indices = pick_overlay_crops(len(data.val), t["overlay_crops"])
        if resume_from is not None:
            restore(run, load_checkpoint(Path(resume_from), config))
            log.info("resuming after epoch %d from %s", run.state["epoch"], resume_from)
        state = run.state

        for epoch in range(state["epoch"] + 1, t["epochs"] + 1):
            if state["bad_epochs"] >= t["patience"]:
                break  # a resumed run that had already stopped early
            label = f"epoch {epoch}/{t['epochs']}"
            data.train.set_epoch(epoch)
            scores = run_epoch("train", run.trained, train_loader, run.criterion, device,
                               use_amp, d["crop_margin"], t["max_batches_per_epoch"], label,
                               optimizer=run.optimizer, scaler=run.scaler, ranks=ranks,
                               epoch=epoch)
            scores |= run_epoch("val", run.model, val_loader, run.criterion, device, use_amp,
                                d["crop_margin"], t["max_batches_per_epoch"], label, ranks=ranks,
                                epoch=epoch, learning_rate=current_learning_rate(run.optimizer))
            if ranks.logs:
                outbox.current().log_metrics(scores, step=epoch)
            run.history.append(scores)

            state["epoch"] = epoch
            if scores["val_loss"] < state["best_val_loss"]:
                state.update(best_val_loss=scores["val_loss"], best_epoch=epoch, bad_epochs=0)
                run.best_weights = {k: v.detach().to("cpu", copy=True)
                                    for k, v in run.model.state_dict().items()}
            else:
                state["bad_epochs"] += 1

            if ranks.logs:
                print(epoch_line(epoch, t, scores, state, trial), file=sys.stderr, flush=True)
                log_overlays(run.model, data.val, overlay_indices, epoch, device,
                             d["input_slices"])
                if checkpoint:
                    log_checkpoint(config, run)
                if on_epoch is not None:
                    on_epoch(epoch, scores)
            if state["bad_epochs"] >= t["patience"]:
                log.info("early stop after epoch %d: no better val_loss for %d epochs",
                         epoch, t["patience"])
                break

        ranks.barrier()  # every rank is done with the group before rank 0 goes on alone
        return best_result(run)


def build_training(config: dict, data: PreparedData, device: torch.device,
                   ranks: distributed.Ranks, use_amp: bool) -> Training:
    """The network (from ``models.ARCHITECTURES``), optimiser, scaler and loss of a new
    training, seeded; the order of construction is part of what makes a run reproducible."""
    d, t, m = config["data"], config["train"], config["model"]
    from models import ARCHITECTURES

    def build() -> nn.Module:
        return ARCHITECTURES[m["architecture"]](
            in_channels=d["input_slices"], num_classes=len(CLASS_NAMES),
            base_width=m["base_width"])

    model = build().to(device)
    trained = model
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            distributed.global_batch_norm(model, ranks),
            device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=t["learning_rate"], betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    weights = sample_class_weights(data.train, t["weight_samples"], t["seed"], d["crop_margin"])
    criterion = WeightedBCELoss(weights, alpha=t["alpha"], ranks=ranks).to(device)
    generator = torch.Generator().manual_seed(t["seed"])
    return Training(model=model, trained=trained, optimizer=optimizer, scaler=scaler,
                    criterion=criterion, generator=generator, build=build)


def best_result(run: Training) -> TrainResult:
    """The best epoch's weights in a plain network (no DDP, no global batch norm) for export."""
    if run.best_weights is None:  # every epoch's validation loss is checked finite
        raise RuntimeError("no epoch produced a model to keep: its validation loss was never "
                           "below infinity")
    model = run.build()
    model.load_state_dict(run.best_weights)
    state = run.state
    return TrainResult(best_epoch=state["best_epoch"], best_val_loss=state["best_val_loss"],
                       best_metrics=run.history[state["best_epoch"] - 1], model=model.eval(),
                       epochs_run=state["epoch"], history=run.history)


def run_epoch(split: str, model: nn.Module, loader: DataLoader, criterion: WeightedBCELoss,
              device: torch.device, use_amp: bool, margin: int, max_batches: int, label: str,
              optimizer: torch.optim.Optimizer | None = None,
              scaler: torch.amp.GradScaler | None = None,
              ranks: distributed.Ranks = distributed.SINGLE, epoch: int = 0,
              learning_rate: float | None = None) -> dict[str, float]:
    """One pass over ``loader``; trains when an optimizer is given. Returns the epoch metrics
    (of the whole split: summed over ``ranks``). Raises `LossNotFinite` naming ``epoch`` and
    the batch once a batch's loss is NaN or inf (``learning_rate``: the optimizer's, for the
    message of a validation pass)."""
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    metrics = EpochMetrics(split, device)
    watch = LossWatch(device)
    if training:
        learning_rate = current_learning_rate(optimizer)
    total = len(loader) if max_batches <= 0 else min(max_batches, len(loader))
    batches = itertools.islice(loader, total)
    with torch.set_grad_enabled(training), tqdm(batches, total=total, leave=False,
                                                 desc=f"{label} {split}", mininterval=1.0,
                                                 disable=not ranks.logs) as bar:
        for step, (image, target, _) in enumerate(bar):
            image = image.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(image)
            # the crop margin: boundary classes are unknowable at crop edges
            logits, target = trim(logits, margin), trim(target, margin)
            loss, per_class_bce = criterion(logits, target, update=training)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            metrics.update(logits.detach(), target, per_class_bce, loss.detach())
            watch.update(loss, batch=step + 1)
            if step % PROGRESS_EVERY == 0:  # the host syncs here anyway: stop a diverged run
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                watch.check(split, epoch, learning_rate)
    # every rank holds the global batch's loss, so all of them stop at the same batch
    watch.check(split, epoch, learning_rate)
    metrics.sum_across(ranks)
    return metrics.compute()


def epoch_line(epoch: int, t: dict, scores: dict[str, float], state: dict,
               trial: int | None = None) -> str:
    """The line an epoch leaves on screen (at most 100 characters up to 999 epochs and a
    patience of 99): training and validation loss, validation Dice per class, the best epoch so
    far (lowest validation loss) and the epochs left before early stopping, e.g. ``epoch 3/8
    loss 0.412 val 0.398  Dice bg 0.97 inner 0.61 boundary 0.33  best 3  patience 5/5``. A
    search trial's line is shorter, without the Dice (several trials' lines may interleave)."""
    loss = f"loss {scores['train_loss']:.3f} val {scores['val_loss']:.3f}"
    patience = f"patience {t['patience'] - state['bad_epochs']}/{t['patience']}"
    stop = f"best {state['best_epoch']}  {patience}"
    if trial is not None:
        return f"trial {trial} epoch {epoch}/{t['epochs']}  {loss}  {stop}"
    dice = " ".join(f"{short} {scores[f'val_dice_{name}']:.2f}" for name, short in
                    zip(CLASS_NAMES, ("bg", "inner", "boundary"), strict=True))
    return f"epoch {epoch}/{t['epochs']}  {loss}  Dice {dice}  {stop}"


def current_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class LossNotFinite(Nf1provError):
    """The loss became NaN or inf: the training diverged. The message is the run's one-line
    `nf1prov.failure`; nothing in the code is broken, so no traceback. Exit 1."""

    exit_code = 1


class LossWatch:
    """The first batch of a pass whose loss is NaN or inf, found on the device (no host
    synchronisation per batch) and reported by `check` when the host next looks."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros((), dtype=torch.int64, device=device)  # batch number; 0: none

    def update(self, loss: torch.Tensor, batch: int) -> None:
        bad = (self.first == 0) & ~torch.isfinite(loss.detach())
        self.first = torch.where(bad, batch, self.first)

    def check(self, split: str, epoch: int, learning_rate: float | None) -> None:
        """Raise `LossNotFinite` naming ``epoch`` and the first such batch, if there was one."""
        batch = int(self.first)
        if not batch:
            return
        lr = f" (now {learning_rate:g})" if learning_rate is not None else ""
        if split == "train" and epoch == 1 and batch == 1:  # no optimiser step was taken yet
            raise LossNotFinite(
                "the loss was NaN/inf at epoch 1, batch 1, before any training step: not the "
                "learning rate, but the inputs (or the starting weights) hold NaN or infinite "
                "values; check the images under data.root and data.normalisation")
        which = "loss" if split == "train" else "validation loss"
        raise LossNotFinite(f"the {which} became NaN/inf at epoch {epoch}, batch {batch}: "
                            f"lower train.learning_rate{lr}")


def make_loaders(data: PreparedData, t: dict, generator: torch.Generator,
                 ranks: distributed.Ranks, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Training batches shuffled by ``generator``, validation batches in order. Distributed:
    this rank's shard of each global batch of ``train.batch_size`` (the same batches one
    process would take: `distributed.GlobalBatchShards`)."""
    options = {"num_workers": t["num_workers"], "pin_memory": device.type == "cuda"}
    if not ranks.distributed:
        return (DataLoader(data.train, batch_size=t["batch_size"], shuffle=True,
                           generator=generator, **options),
                DataLoader(data.val, batch_size=t["batch_size"], shuffle=False, **options))
    image, target, _ = data.train[0]
    collate = functools.partial(distributed.collate_crops, image_shape=tuple(image.shape),
                                target_shape=tuple(target.shape))
    return (DataLoader(data.train, generator=generator, collate_fn=collate, batch_sampler=(
                distributed.GlobalBatchShards(data.train, t["batch_size"], ranks, generator)),
                       **options),
            DataLoader(data.val, collate_fn=collate, batch_sampler=(
                distributed.GlobalBatchShards(data.val, t["batch_size"], ranks)), **options))


def trim(x: torch.Tensor, margin: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H - 2*margin, W - 2*margin)."""
    return x[..., margin:x.shape[-2] - margin, margin:x.shape[-1] - margin] if margin else x


def sample_class_weights(dataset, samples: int, seed: int, margin: int) -> torch.Tensor:
    """Initial loss weights from ``samples`` training targets drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(dataset), size=min(samples, len(dataset)), replace=False)
    targets = torch.stack([torch.as_tensor(dataset[int(i)][1]) for i in sorted(indices)])
    return initial_class_weights(trim(targets, margin))


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names (`nf1prov.devices.pick_device`)."""
    return pick_device(name, setting="train.device")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def deterministic(mode: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms(mode)` inside the block, restored after it."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

def log_checkpoint(config: dict, run: Training) -> None:
    """Everything needed to continue exactly where this epoch ended, as `checkpoints/last.pt`."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "loss_weights": run.criterion.weights.detach().cpu(),
        "rng": {"generator": run.generator.get_state(), "torch": torch.get_rng_state()},
        "state": dict(run.state),
        "best_weights": run.best_weights,
        "history": run.history,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        torch.save(ckpt, path)
        check_room(path, _artifact_uri("checkpoints"))
        outbox.current().log_artifact(path, artifact_path="checkpoints")


ROOM_MARGIN = 64 * 1024  # bytes: filesystem blocks, and the metrics written after a checkpoint


def check_room(checkpoint: Path, artifact_uri: str) -> None:
    """Raise `DiskFull` before a new ``checkpoint`` replaces the run's last one in a local
    artifact folder (``artifact_uri``) whose filesystem lacks room for it: the copy truncates
    the old file first, so one cut short by a full disk would leave no checkpoint at all, and
    `train --resume` nothing to go on from. Only growth needs room (the old file's blocks are
    freed first). Other stores (a tracking server's) are not checked."""
    from nf1prov.errors import DiskFull, free_space, local_folder

    folder = local_folder(artifact_uri)
    if folder is None:
        return
    old = folder / checkpoint.name
    need = checkpoint.stat().st_size - (old.stat().st_size if old.exists() else 0) + ROOM_MARGIN
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if shutil.disk_usage(existing).free < need:
        raise DiskFull(f"The disk holding {folder} has no room for the next checkpoint ("
                       f"{free_space(existing)}; it needs {need} bytes more): the last "
                       "checkpoint is kept. Free space there, or move the store to a larger "
                       "disk.")


def _artifact_uri(path: str) -> str:
    """``path`` under the active run's artifact URI, from the run as started (no store call: the
    store may be away, `outbox`)."""
    import mlflow

    run = mlflow.active_run()
    return f"{run.info.artifact_uri.rstrip('/')}/{path}" if run is not None else ""


def restore(run: Training, ckpt: dict) -> None:
    """Put a checkpoint (`load_checkpoint`) back into a newly built training."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.criterion.weights.copy_(ckpt["loss_weights"])
    run.generator.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.state, run.best_weights, run.history = ckpt["state"], ckpt["best_weights"], ckpt["history"]


def load_checkpoint(path: Path, config: dict) -> dict:
    """Read a `checkpoints/last.pt`; refuse one made for a different network or data shape."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"Checkpoint {path} does not exist: pass the checkpoints/last.pt of "
                        "the run to resume.") from None
    except Exception as exc:
        from nf1prov.weights import load_failure

        raise UserError(f"Checkpoint {path} cannot be read: {load_failure(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"Checkpoint {path} is not a nf1prov checkpoint (format "
                        f"{CHECKPOINT_FORMAT}).")
    for section, key in [("model", "architecture"), ("model", "base_width"),
                         ("data", "input_slices"), ("data", "crop_size")]:
        then, now = ckpt["config"][section][key], config[section][key]
        if then != now:
            raise UserError(f"Checkpoint {path} was trained with {section}.{key} = {then!r}, "
                            f"the config says {now!r}: resume with the run's own config.")
    return ckpt


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------

def param_value(value: Any) -> str:
    """Lists as JSON (valid TOML too), the rest as text."""
    return json.dumps(value) if isinstance(value, list) else str(value)


def log_run_inputs(config: dict, data: PreparedData, resumed: bool = False) -> None:
    """Params, resolved config, split manifest (artifact and dataset input), description tags.

    Params already in the run (a resumed run) are not logged again: MLflow params are
    immutable; a changed value is reported in the log and left as first recorded. A resumed run
    already holds its config, manifest and description, so those are not logged again.
    """
    import mlflow

    from nf1prov.tracking import DATA_SPLITS

    run = mlflow.active_run()
    existing = outbox.patiently(lambda: mlflow.get_run(run.info.run_id).data.params,
                                "reading the run's params")
    params = {k: param_value(v) for k, v in flatten(config).items()}
    params |= {f"dataset.{split}_fields": str(len(fovs)) for split, fovs in data.splits.items()}
    params |= {"dataset.train_crops": str(len(data.train)),
               "dataset.val_crops": str(len(data.val))}
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    if changed:
        log.warning("params differ from those first logged in run %s (kept as logged): %s",
                    run.info.run_id, changed)
    new = {k: v for k, v in params.items() if k not in existing}
    box = outbox.current()
    if new:
        box.log_params(new)
    if resumed:
        return

    box.log_text(to_toml(config), "config/config.toml")
    box.log_text(logged_manifest(config, data).to_csv(index=False),
                 "manifest/split_manifest.csv")
    # MLflow warns that a local path "can be interpreted in multiple ways" and about integer
    # columns in the inferred schema: neither matters for a record of the files used.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(data.manifest, source=data.source,
                                          name="split_manifest")
        # two trainings logging the same manifest at once race on its unique row: retry
        outbox.patiently(lambda: tracking.retry_on_conflict(
            lambda: mlflow.log_input(dataset, context="training")), "logging the dataset input")
    tags = description_tags(config["description"])
    tags[NOTE_CONTENT] = description_markdown(config["description"])
    tags[DATA_SPLITS] = data_splits_tag(data.splits)
    box.set_tags(tags)


def logged_manifest(config: dict, data: PreparedData):
    """The split manifest with the holdout patients' files under the data root as well (split
    ``holdout``: training never reads them; `reproduce` checks them, `evaluate` scores them).
    A holdout folder that cannot be read is left out with a warning: it stops no training."""
    import pandas as pd

    from nf1prov.data import manifest
    from nf1prov.data.layout import DataError

    try:
        holdout = manifest.holdout_manifest(data.source, config["data"]["holdout_patients"],
                                            cache_dir=data.cache_dir)
    except DataError as exc:
        log.warning("The holdout patients' files are not in the split manifest: %s", exc)
        return data.manifest
    return pd.concat([data.manifest, holdout], ignore_index=True) if len(holdout) \
        else data.manifest


DATA_SPLITS_MAX_CHARS = 6000  # MLflow refuses tag values over 8000 characters


def data_splits_tag(splits: dict[str, list], limit: int = DATA_SPLITS_MAX_CHARS) -> str:
    """What each split trained on, for the catalogue: JSON ``{split: {"fields": n, "patients":
    [sorted patient folder names]}}``. Past ``limit`` characters (MLflow caps tag values) the
    names are replaced by ``"patient_count"``."""
    summary = {split: {"fields": len(fovs), "patients": sorted({f.patient for f in fovs})}
               for split, fovs in splits.items()}
    text = json.dumps(summary)
    if len(text) <= limit:
        return text
    return json.dumps({split: {"fields": s["fields"], "patient_count": len(s["patients"])}
                       for split, s in summary.items()})


def log_best(result: TrainResult, prefix: str = "best_") -> None:
    """`best_epoch`, `best_val_loss` and `best_val_dice_<class>` (and `_total`) of the kept
    model, and `epochs_run` (epochs trained in all, early stopping and resumes included), into
    the active run."""

    best = {f"{prefix}epoch": float(result.best_epoch), f"{prefix}val_loss": result.best_val_loss,
            "epochs_run": float(result.epochs_run)}
    best |= {f"{prefix}val_dice_{c}": result.best_metrics[f"val_dice_{c}"]
             for c in (*CLASS_NAMES, "total")}
    outbox.current().log_metrics(best)


def log_model(model: nn.Module) -> None:
    """The best model as the run's `model/`: its state dict and architecture record
    (`nf1prov.weights`), so that loading it never unpickles code from the store."""
    from nf1prov import weights

    with tempfile.TemporaryDirectory(prefix="nf1prov-weights-") as tmp:
        weights.save(model.to("cpu").eval(), Path(tmp))
        outbox.current().log_artifacts(tmp, artifact_path="model")


def log_mlflow_model(config: dict, data: PreparedData, result: TrainResult, postprocess,
                     instance_scores: dict | None) -> None:
    """The best model as the active run's MLflow logged model ``model``
    (`nf1prov.segment.mlflow_model`: pyfunc from code, its files under ``model/artifacts/``),
    with its best-epoch metrics (and instance scores) linked to it and to the split manifest,
    the run's dataset input; this commit's `nf1prov.segment.mlflow_pyfunc` is its code."""
    import mlflow.data

    from nf1prov import weights
    from nf1prov.segment import mlflow_model

    run = _active_run()
    split = data.val if data.val.fields else data.train
    stack = split.cache.image(split.fields[0].image_path)
    settings = mlflow_model.settings(
        config, postprocess.flat, input_dtype=stack.dtype, codename=run.info.run_name,
        commit=run.data.tags.get(tracking.GIT_COMMIT), run_id=run.info.run_id,
        postprocess3d=postprocess.cells)
    with warnings.catch_warnings():  # as in log_run_inputs: the same dataset, its digest
        warnings.simplefilter("ignore", UserWarning)
        digest = mlflow.data.from_pandas(data.manifest, source=data.source,
                                         name="split_manifest").digest
    linked = {f"best_{k}": v for k, v in result.best_metrics.items()
              if k.startswith("val_dice_")} | {"best_val_loss": result.best_val_loss}
    linked |= {f"val_{k}": (instance_scores or {})[k] for k in (
        "instance_f1", "instance_ap", "instance3d_f1", "instance3d_ap")
        if k in (instance_scores or {})}  # those log_postprocess logs
    with tempfile.TemporaryDirectory(prefix="nf1prov-mlflow-model-") as tmp:
        weights.save(result.model.to("cpu").eval(), Path(tmp) / "weights")
        saved = mlflow_model.save(Path(tmp) / "weights", settings, Path(tmp) / "model",
                                  mlflow_model.example(stack, settings["input_slices"]))
        outbox.current().log_logged_model(
            saved, metrics=linked, step=result.best_epoch, dataset=("split_manifest", digest),
            params=mlflow_model.params(settings),
            tags={tracking.CODENAME: settings["codename"] or "",
                  tracking.MODEL_COMMIT: settings["commit"] or ""})


def log_health(config: dict, data: PreparedData, result: TrainResult,
               instance_scores: dict | None, curve: bool = True) -> str:
    """The model's health verdict (`nf1prov.train.health`) as the tag ``nf1prov.health`` of the
    active run and, with ``curve``, its `plots/learning_curve.png` (`nf1prov.train.plots`);
    returns the verdict."""
    from nf1prov.train import health, plots

    t = config["train"]
    verdict = health.verdict(
        result.history, result.best_epoch, t["epochs"],
        stopped_early=result.epochs_run < t["epochs"],
        instance_f1=(instance_scores or {}).get("instance_f1"),
        class_fractions=val_class_fractions(data.val, t, config["data"]["crop_margin"]))
    box = outbox.current()
    box.set_tags({tracking.HEALTH: verdict})
    if curve:
        with tempfile.TemporaryDirectory(prefix="nf1prov-plots-") as tmp:
            run = _active_run()
            path = plots.learning_curve(result.history, result.best_epoch,
                                        Path(tmp) / "learning_curve.png",
                                        title=run.info.run_name if run is not None else None)
            box.log_artifact(path, artifact_path="plots")
    return verdict


def val_class_fractions(dataset, t: dict, margin: int) -> dict[str, float]:
    """Each class's share of the pixels a validation pass scores: the crops it reads (the first
    ``train.max_batches_per_epoch`` batches, in order), trimmed by the crop margin."""
    count = len(dataset) if t["max_batches_per_epoch"] <= 0 else min(
        len(dataset), t["max_batches_per_epoch"] * t["batch_size"])
    pixels = np.zeros(len(CLASS_NAMES))
    for i in range(count):
        pixels += trim(torch.as_tensor(dataset[i][1]), margin).sum(dim=(-2, -1)).numpy()
    total = pixels.sum()
    return {name: float(n / total) if total else math.nan
            for name, n in zip(CLASS_NAMES, pixels, strict=True)}


MAX_TUNE_PIXELS = 16_000_000  # validation pixels segmented per candidate when choosing


class ChosenInstances(NamedTuple):
    """A model's instance parameters: per slice (``flat``, dims 2) and of cells as 3-D objects
    (``cells``, dims 3)."""

    flat: Any  # nf1prov.segment.instances.PostProcess
    cells: Any


def log_postprocess(config: dict, data: PreparedData, model: nn.Module):
    """Choose the instance parameters of ``model`` (`nf1prov.segment.instances.tune`) on the
    validation split, per slice and for cells as 3-D objects, or take the config's when
    ``postprocess.tune`` is false, and log them to the active run: params ``instances.*`` and
    ``instances3d.*``, the artifacts ``config/instances.json`` and ``config/instances3d.json``
    and, when chosen, the metrics ``val_instance_f1``, ``val_instance_ap``,
    ``val_instance3d_f1`` and ``val_instance3d_ap`` they reach. Returns the parameters (a
    `ChosenInstances`) and the scores (``instance_f1``, ``instance_ap``, ``instance3d_f1``,
    ``instance3d_ap``; None when not chosen).

    Validation stacks are predicted whole, as `predict` does; past `MAX_TUNE_PIXELS` the centre
    slices of the per-slice search are an evenly spaced subset, and the 3-D search takes whole
    stacks (cut to their centre when one alone is larger), so that the search stays seconds on
    a large split. A stack's z ratio comes from its physical sizes, else ``postprocess.z_ratio``.
    """
    import mlflow

    from nf1prov.segment.instances import (
        POSTPROCESS_ARTIFACT,
        POSTPROCESS_ARTIFACT_3D,
        PostProcess,
        tune,
    )

    p = config["postprocess"]
    start = PostProcess(p["seed_threshold"], p["foreground_threshold"], p["min_size"])
    chosen, scores = start, None
    # configs from before min_volume lack it: 0, off
    start3d = dict(dims=3, link_iou=p["link_iou"], min_volume=p.get("min_volume", 0))
    chosen3d = start.replace(**start3d)
    if p["tune"]:
        device = resolve_device(config["train"]["device"])
        model = model.to(device)
        flat_pairs, whole = _tune_slices(config, data, model, device)
        chosen, scores = tune(flat_pairs, start)
        log.info("instance parameters chosen on validation data: %s (F1 %.3f, AP %.3f)",
                 chosen.describe(), scores["instance_f1"], scores["instance_ap"])
        cell_pairs = _tune_stacks(config, data, model, device, flat_pairs if whole else None)
        model.to("cpu")
        chosen3d, scores3d = tune(cell_pairs, chosen.replace(**start3d))
        log.info("3-D instance parameters chosen on validation data: %s (F1 %.3f, AP %.3f)",
                 chosen3d.describe(), scores3d["instance_f1"], scores3d["instance_ap"])
        scores |= {k.replace("instance_", "instance3d_"): v for k, v in scores3d.items()}
    try:  # a resumed run may hold them already
        already_logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    except Exception as exc:
        if not outbox.is_unreachable(exc):
            raise
        already_logged = {}  # the same values again are harmless once the store is back
    box = outbox.current()
    if scores is not None:
        box.log_metrics({f"val_{k}": scores[k] for k in ("instance_f1", "instance_ap",
                                                         "instance3d_f1", "instance3d_ap")})
    params = chosen.params() | chosen3d.params()
    box.log_params({k: v for k, v in params.items() if k not in already_logged})
    box.log_text(chosen.to_json(), POSTPROCESS_ARTIFACT)
    box.log_text(chosen3d.to_json(), POSTPROCESS_ARTIFACT_3D)
    return ChosenInstances(chosen, chosen3d), scores


def _tune_slices(config: dict, data: PreparedData, model: nn.Module, device):
    """(prob, mask) of the validation stacks for the per-slice search (at most
    `MAX_TUNE_PIXELS`: evenly spaced centre slices past it), and whether they are whole."""
    from nf1prov.data.cache import read_tiff
    from nf1prov.segment.predict import predict_stack

    d = config["data"]
    cache, fields = data.val.cache, data.val.fields
    slices = [(i, z) for i, f in enumerate(fields)
              for z in range(cache.image(f.image_path).shape[0])]
    height, width = cache.image(fields[0].image_path).shape[1:]
    budget = max(1, MAX_TUNE_PIXELS // (height * width))
    whole = len(slices) <= budget
    if not whole:
        slices = [slices[int(k)] for k in np.linspace(0, len(slices) - 1, budget).round()]
    pairs = []
    for i, fov in enumerate(fields):
        zs = [z for j, z in slices if j == i]
        if not zs:
            continue
        prob = predict_stack(model, np.asarray(cache.image(fov.image_path)),
                             input_slices=d["input_slices"], tile_size=d["crop_size"],
                             device=device, normalisation=d["normalisation"], slices=zs)
        pairs.append((prob, read_tiff(fov.mask_path)[zs]))
    return pairs, whole


def _tune_stacks(config: dict, data: PreparedData, model: nn.Module, device,
                 predicted: list | None) -> list:
    """(prob, mask, z_ratio) of whole validation stacks for the 3-D search: ``predicted`` (the
    per-slice search's, when whole) or predicted here, stacks in order up to
    `MAX_TUNE_PIXELS` (at least one, cut to its centre in x-y when larger)."""
    from nf1prov.data.cache import read_tiff
    from nf1prov.segment.predict import predict_stack

    d, fields = config["data"], data.val.fields
    ratios = [_z_ratio(f.image_path, config["postprocess"]["z_ratio"]) for f in fields]
    if predicted is not None:
        return [(prob, mask, ratio) for (prob, mask), ratio in zip(predicted, ratios,
                                                                  strict=True)]
    pairs, left = [], MAX_TUNE_PIXELS
    for fov, ratio in zip(fields, ratios, strict=True):
        stack = np.asarray(data.val.cache.image(fov.image_path))
        depth, height, width = stack.shape
        side = int(math.sqrt(left / depth))
        if pairs and depth * height * width > left:
            break
        y0, x0 = max(0, (height - side) // 2), max(0, (width - side) // 2)
        crop = (slice(None), slice(y0, y0 + side), slice(x0, x0 + side))
        prob = predict_stack(model, stack[crop], input_slices=d["input_slices"],
                             tile_size=d["crop_size"], device=device,
                             normalisation=d["normalisation"])
        pairs.append((prob, read_tiff(fov.mask_path)[crop], ratio))
        left -= prob[0].size
    return pairs


def _z_ratio(image_path, default: float) -> float:
    """A stack's z step over its xy pixel size from its physical sizes, else ``default``."""
    import tifffile

    from nf1prov.segment.ome import physical_sizes, z_ratio

    try:
        with tifffile.TiffFile(image_path) as tif:
            return z_ratio(physical_sizes(tif)) or default
    except Exception:  # the stack was read for training: its metadata only may be unreadable
        return default


def pick_overlay_crops(n: int, count: int) -> list[int]:
    """``count`` validation crop indices spread evenly over the split (fixed for the run)."""
    if count <= 0 or n == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


def log_overlays(model: nn.Module, dataset, indices: list[int], epoch: int,
                 device: torch.device, input_slices: int) -> None:
    """PNG per crop: input centre slice | target | prediction, under overlays/epoch_NNN/,
    titled with the epoch and the crop's id, classes in the shared colours with their legend
    (`nf1prov.segment.pictures.training_picture`; the prediction as sigmoid probabilities)."""
    if not indices:
        return
    from nf1prov.segment.pictures import training_picture

    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
    targets = torch.stack([torch.as_tensor(dataset[i][1]) for i in indices])
    model.eval()
    with torch.no_grad():
        probs = torch.sigmoid(model(images.to(device)).float()).cpu()
    with tempfile.TemporaryDirectory() as tmp:
        for k, i in enumerate(indices):
            crop = dataset.meta(i)["sample_id"]
            picture = training_picture(images[k, input_slices // 2].numpy(),
                                       targets[k].numpy(), probs[k].numpy(),
                                       title=f"epoch {epoch} · validation crop {crop}")
            picture.save(Path(tmp) / f"{safe_name(crop)}.png")
        outbox.current().log_artifacts(tmp, artifact_path=f"overlays/epoch_{epoch:03d}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "crop"
