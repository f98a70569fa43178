"""The entry point of training: one model (`trainer.train_one`), or an Optuna search over models
(`search.run_search`) when ``train.trials`` > 1. Here, so that the search may use the trainer
without the trainer knowing about the search."""

from __future__ import annotations

from pathlib import Path

from nf1prov.errors import UserError
from nf1prov.train.trainer import EpochCallback, TrainResult, check_can_train, train_one


def train_model(config: dict, data_root: Path, *, cache_dir: Path,
                resume_from: Path | None = None,
                on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train the model of ``config`` on ``data_root`` inside the active MLflow run.

    ``cache_dir``: where decoded stacks are cached. ``resume_from``: a `checkpoints/last.pt`
    file of this run (the caller re-opens the same run): training continues at the next epoch.
    ``on_epoch(epoch, metrics)`` is called after each epoch is logged (e.g. a heartbeat).
    With ``train.trials > 1`` this runs the Optuna search (`nf1prov.train.search`) instead.
    Raises UserError for bad data/config; any exception leaves the run for the caller to fail.
    """
    if config["train"]["trials"] == 1:
        return train_one(config, data_root, cache_dir=cache_dir, resume_from=resume_from,
                         on_epoch=on_epoch)
    if resume_from is not None:
        raise UserError("--resume is not supported with train.trials > 1 (an Optuna search "
                        "cannot be resumed); rerun the search, or set train.trials=1.")
    check_can_train(config, None)
    from nf1prov.train.search import run_search

    return run_search(config, Path(data_root), cache_dir=Path(cache_dir), on_epoch=on_epoch)
