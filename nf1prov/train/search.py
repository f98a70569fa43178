"""Hyper-parameter search: Optuna trials as nested MLflow runs `trial_<n>` (DESIGN 4).

Each trial draws a batch size (integer range `train.search_batch_size`, inclusive) and a learning
rate (log-uniform range `train.search_learning_rate`) from a TPE sampler seeded with `train.seed`,
and trains `train.epochs` epochs in its own nested run (tag `nf1prov.kind=trial`, params
`train.batch_size`, `train.learning_rate`, per-epoch metrics, overlays, `best_*` metrics). The
parent (the active run, the model) gets the data inputs once, the param and tag `best_trial`, the
best trial's batch size and learning rate (`best_trial.train.*` params), its per-epoch metrics
(so the parent reads like a single-run model), its `best_*` metrics and its model as `model/`.
Trials write no checkpoints: a search is not resumable.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from nf1prov.errors import UserError
from nf1prov.tracking import KIND, KIND_TRIAL
from nf1prov.train.trainer import (
    EpochCallback,
    TrainResult,
    fit,
    log_best,
    log_model,
    log_postprocess,
    log_run_inputs,
    param_value,
    prepare_data,
)

log = logging.getLogger(__name__)


def run_search(config: dict, data_root: Path, *, cache_dir: Path,
               on_epoch: EpochCallback | None = None) -> TrainResult:
    """Run ``train.trials`` Optuna trials under the active run; returns the best trial's result
    (its model is the one logged to the parent)."""
    import mlflow
    import optuna

    t = config["train"]
    lo_bs, hi_bs = _range(t["search_batch_size"], "search_batch_size", int)
    lo_lr, hi_lr = _range(t["search_learning_rate"], "search_learning_rate", float)
    if lo_lr <= 0:
        raise UserError(f"train.search_learning_rate must be positive (log-uniform), not "
                        f"{t['search_learning_rate']}.")

    parent = mlflow.active_run()
    data = prepare_data(config, data_root, cache_dir)
    log_run_inputs(config, data)
    results: dict[int, TrainResult] = {}

    def objective(trial: optuna.Trial) -> float:
        trial_config = copy.deepcopy(config)
        trial_config["train"]["batch_size"] = trial.suggest_int("batch_size", lo_bs, hi_bs)
        trial_config["train"]["learning_rate"] = trial.suggest_float(
            "learning_rate", lo_lr, hi_lr, log=True)
        # The context manager marks the trial FAILED if training raises; the error propagates.
        with mlflow.start_run(run_name=f"trial_{trial.number}", nested=True,
                              experiment_id=parent.info.experiment_id,
                              tags={KIND: KIND_TRIAL}):
            mlflow.log_params({"trial": str(trial.number),
                               "train.batch_size": param_value(trial_config["train"]["batch_size"]),
                               "train.learning_rate":
                                   param_value(trial_config["train"]["learning_rate"])})
            result = fit(trial_config, data, on_epoch=_trial_callback(on_epoch, trial.number),
                         checkpoint=False)
            log_best(result)
        results[trial.number] = result
        return result.best_val_loss

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=t["seed"]))
    study.optimize(objective, n_trials=t["trials"])  # exceptions propagate: the caller fails

    best_number = study.best_trial.number
    best = results[best_number]
    log.info("best trial %d: val_loss %.4f", best_number, best.best_val_loss)
    mlflow.log_params({
        "best_trial": str(best_number),
        "best_trial.train.batch_size": str(study.best_trial.params["batch_size"]),
        "best_trial.train.learning_rate": str(study.best_trial.params["learning_rate"]),
    })
    mlflow.set_tag("best_trial", str(best_number))
    for epoch, scores in enumerate(best.history, start=1):
        mlflow.log_metrics(scores, step=epoch)
    log_best(best)
    log_postprocess(config, data, best.model)
    log_model(best.model, data)
    return best


def _trial_callback(on_epoch: EpochCallback | None, number: int) -> EpochCallback | None:
    if on_epoch is None:
        return None

    def callback(epoch: int, scores: dict) -> None:
        on_epoch(epoch, {**scores, "trial": float(number)})

    return callback


def _range(value: list, key: str, kind: type) -> tuple:
    if len(value) != 2 or value[0] > value[1] or (kind is int and any(
            isinstance(v, float) and not v.is_integer() for v in value)):
        raise UserError(f"train.{key} must be [low, high] with low <= high"
                        f"{' (integers)' if kind is int else ''}, not {value}.")
    return kind(value[0]), kind(value[1])
