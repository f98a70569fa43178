"""Hyper-parameter search: Optuna trials as nested MLflow runs `trial_<n>` (DESIGN 4).

Each trial draws a batch size (integer range `train.search_batch_size`, inclusive) and a learning
rate (log-uniform range `train.search_learning_rate`) from a TPE sampler, and trains
`train.epochs` epochs in its own nested run (see `nf1prov.train.search_worker`: tag
`nf1prov.kind=trial`, params `train.batch_size`, `train.learning_rate`, per-epoch metrics,
overlays, `best_*` metrics, its best weights as `model/`).

The study lives in RDB storage, so that trials can run in several processes and on several
machines: `$NF1PROV_SEARCH_STORAGE`, else `train.search_storage`, else the sqlite file
`optuna.db` in the workspace's `.nf1prov/` folder (beside the cache; git-ignored, shared by the
workspace's runs). The study is named `nf1prov-<model run ID>`; the model run gets the tags
`nf1prov.search.study` and `nf1prov.search.storage` (password as `***`).

With `train.search_workers` = 1 the trials run in this process, the sampler seeded with
`train.seed`: the search is deterministic, as a single training is. With N > 1, N worker
processes run them (this process only watches): each gets the same footing (`max(1, CPUs // N)`
torch threads, its own sampler seed derived from `train.seed`, host and pid), and a worker that
dies (out of memory, a crashed driver) costs its trial, not the model. Other machines may join
with `nf1prov search-join CODENAME`.

When the study holds `train.trials` trials, the model run waits until none is RUNNING. A trial
still RUNNING in Optuna counts as failed (set to FAIL) when its MLflow run ended FAILED or
KILLED, when its worker ran on this host and its process is gone, or when Optuna's heartbeat of
it is older than `search_worker.GRACE_PERIOD_S` (its MLflow run is then ended FAILED). Then the
model run takes the best COMPLETE trial (`study.best_trial`): the param and tag `best_trial`,
params `best_trial.train.batch_size` / `best_trial.train.learning_rate`, the tag
`nf1prov.search.best_run` (its run ID), its per-epoch metrics (so the model reads like a
single-run model), its `best_*` metrics, instance parameters chosen for its model, its model
(read back from the trial run's `model/`) as `model/`, and the health verdict and learning curve
of its training (`trainer.log_health`). Trials write no checkpoints: a search is not
resumable. If no trial completed, the model fails, naming the trials' failures.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

from nf1prov import outbox, tracking
from nf1prov.errors import UserError
from nf1prov.train import search_worker as workers
from nf1prov.train.search_worker import (
    EXPERIMENT_ATTR,
    HOST_ATTR,
    PARENT_ATTR,
    PID_ATTR,
    RUN_ID_ATTR,
    STORAGE_ENV,
    STORAGE_TAG,
    STUDY_TAG,
    TRIALS_ATTR,
    masked,
)
from nf1prov.train.trainer import (
    EpochCallback,
    PreparedData,
    TrainResult,
    log_best,
    log_health,
    log_mlflow_model,
    log_postprocess,
    log_run_inputs,
    prepare_data,
)

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"  # in the workspace's .nf1prov/, beside the cache
BEST_RUN_TAG = "nf1prov.search.best_run"  # on the model run: the best trial's run ID
POLL_S = 2.0  # how often the model run looks at the trials it waits for
ONCE_METRICS = ("epochs_run",)  # trial metrics that are not per epoch (besides best_*)

def storage_url(config: dict, cache_dir: Path) -> str:
    """The study's storage: $NF1PROV_SEARCH_STORAGE, else train.search_storage, else
    ``sqlite:///<cache_dir's parent>/optuna.db``. Raises UserError for an unusable URL."""
    env = os.environ.get(STORAGE_ENV, "").strip()
    url = env or config["train"]["search_storage"].strip()
    if not url:
        return f"sqlite:///{(Path(cache_dir).resolve().parent / STORAGE_FILE).as_posix()}"
    where = STORAGE_ENV if env else "train.search_storage"
    if "://" not in url:
        raise UserError(f"{where} = {masked(url)!r} is not a database URL: use the SQLAlchemy "
                        "form, e.g. postgresql+psycopg2://user@host/optuna or "
                        "sqlite:////absolute/path/optuna.db.")
    if url.startswith("sqlite") and (workers.sqlite_file(url) is None
                                     or not workers.sqlite_file(url).is_absolute()):
        raise UserError(f"{where} = {url!r}: a sqlite study must be a file named by its "
                        "absolute path (sqlite:////absolute/path/optuna.db): the trial workers "
                        "are separate processes, started elsewhere.")
    return url


def checked_storage_url(config: dict, cache_dir: Path, tracking_uri: str) -> str:
    """`storage_url`, refused when it is the MLflow store itself."""
    url = storage_url(config, cache_dir)
    if _same_database(url, tracking_uri):
        raise UserError(f"The Optuna storage {masked(url)} is the MLflow store itself: give the "
                        "study a database of its own (both keep an alembic_version table), "
                        f"e.g. another database on the same server, via {STORAGE_ENV}.")
    return url


def check_storage(config: dict, cache_dir: Path, tracking_uri: str) -> None:
    """`nf1prov train`'s preflight, before any commit or run exists: the study's database
    opens; UserError when it cannot be used."""
    workers.open_storage(checked_storage_url(config, cache_dir, tracking_uri))


def study_name(parent_run_id: str) -> str:
    """The study of a model run: stable, whatever the run's codename."""
    return f"nf1prov-{parent_run_id}"


def run_search(config: dict, data_root: Path, *, cache_dir: Path,
               on_epoch: EpochCallback | None = None) -> TrainResult:
    """Run ``train.trials`` Optuna trials for the active run (the model); returns the best
    trial's result (its model is the one logged to the model run)."""
    import mlflow

    t = config["train"]
    _range(t["search_batch_size"], "search_batch_size", int)
    lo_lr, _ = _range(t["search_learning_rate"], "search_learning_rate", float)
    if lo_lr <= 0:
        raise UserError(f"train.search_learning_rate must be positive (log-uniform), not "
                        f"{t['search_learning_rate']}.")
    tracking_uri = mlflow.get_tracking_uri()
    url = checked_storage_url(config, cache_dir, tracking_uri)  # create_study opens it

    parent = mlflow.active_run()
    parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    data = prepare_data(config, data_root, cache_dir)
    log_run_inputs(config, data)
    study = create_study(url, parent_id, experiment_id, t["trials"], t["seed"])
    outbox.current().set_tags({STUDY_TAG: study.study_name, STORAGE_TAG: masked(url)})
    log.info("Optuna study %s in %s: %d trials, %d worker(s) here", study.study_name,
             masked(url), t["trials"], t["search_workers"])

    processes = []
    try:
        if t["search_workers"] == 1:
            workers.run_trials(study, client=client, config=config, data=data,
                               on_epoch=on_epoch)
        else:
            spec = workers.WorkerSpec(
                tracking_uri=tracking_uri, storage=url, study_name=study.study_name,
                parent_run_id=parent_id, config=config, data_root=str(data_root),
                cache_dir=str(cache_dir), code_root=str(workers.code_root()),
                threads=workers.threads_per_worker(t["search_workers"], t["threads"]),
                parent_pid=os.getpid())
            processes = workers.launch(spec, t["search_workers"])
        wait_for_trials(study, client, processes)
    finally:
        workers.stop(processes)
    outbox.current().flush(patience_s=60.0)  # the trials' logging must be in the store to read
    return finish_search(config, data, study, client)


def create_study(url: str, parent_id: str, experiment_id: str, trials: int, seed: int):
    """The study of model run ``parent_id`` (a new one), its user attributes set."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=workers.open_storage(url), study_name=study_name(
        parent_id), direction="minimize", sampler=workers.sampler(seed))
    study.set_user_attr(TRIALS_ATTR, int(trials))
    study.set_user_attr(PARENT_ATTR, parent_id)
    study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
    return study


def wait_for_trials(study, client, processes=(), poll_s: float | None = None) -> None:
    """Return once no trial of ``study`` is RUNNING and the local worker ``processes`` have
    ended (trials of other machines included; see the module docstring for when a RUNNING
    trial counts as failed). Local workers that linger once nothing is left to do are
    stopped after `search_worker.STOP_WAIT_S`."""
    idle_since = None
    while True:
        running = settle_trials(study, client)
        alive = [p for p in processes if p.poll() is None]
        if not running and not alive:
            break
        full = workers.trial_count(study) >= int(study.user_attrs[TRIALS_ATTR])
        if not running and full:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > workers.STOP_WAIT_S:
                workers.stop(alive)
        else:
            idle_since = None
        time.sleep(POLL_S if poll_s is None else poll_s)
    for process in processes:
        if process.returncode:
            log.warning("search worker process %d ended with exit code %d", process.pid,
                        process.returncode)
    held, wanted = workers.trial_count(study), int(study.user_attrs[TRIALS_ATTR])
    if held < wanted:
        log.warning("the study holds %d of its %d trials: its workers ended early", held, wanted)


def settle_trials(study, client) -> list:
    """Fail the RUNNING trials whose worker is known to be gone; returns those still RUNNING."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat rule
    running = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _gone(trial, client)
        if reason is None:
            running.append(trial)
        elif workers.mark_failed(study, trial._trial_id):
            log.warning("trial %d counts as failed: %s", trial.number, reason)
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if run_id and workers.run_status(client, run_id) == "RUNNING":
                workers.end_trial_run(client, run_id, "FAILED", reason)
    # Trials Optuna failed for a stale heartbeat: end their runs too.
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id and workers.run_status(client, run_id) == "RUNNING":
            workers.end_trial_run(client, run_id, "FAILED", "its search worker sent no "
                                  f"heartbeat for {workers.GRACE_PERIOD_S} s")
    return running


def _gone(trial, client) -> str | None:
    """Why the RUNNING ``trial``'s worker is known to be gone, or None."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        status = workers.run_status(client, run_id)
        if status in ("FAILED", "KILLED"):
            return f"its MLflow run {run_id} ended {status}"
    pid = trial.user_attrs.get(PID_ATTR)
    if trial.user_attrs.get(HOST_ATTR) == socket.gethostname() and isinstance(pid, int) \
            and not _pid_alive(pid):
        return f"its search worker (pid {pid} on this host) is gone"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish_search(config: dict, data: PreparedData, study, client) -> TrainResult:
    """Log the best COMPLETE trial into the active run (the model; see the module docstring)
    and return its result."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise RuntimeError(f"none of the {workers.trial_count(study)} trials of study "
                           f"{study.study_name} completed: {_failures(study, client)}")
    best = study.best_trial
    run_id = best.user_attrs[RUN_ID_ATTR]
    result = trial_result(client, run_id)
    failed = workers.trial_count(study) - len(done)
    log.info("best trial %d (run %s): val_loss %.4f; %d of %d trials completed", best.number,
             run_id, result.best_val_loss, len(done), workers.trial_count(study))
    box = outbox.current()
    box.log_params({
        "best_trial": str(best.number),
        "best_trial.train.batch_size": str(best.params["batch_size"]),
        "best_trial.train.learning_rate": str(best.params["learning_rate"]),
    })
    box.set_tags({"best_trial": str(best.number), BEST_RUN_TAG: run_id})
    if failed:
        log.warning("%d trial(s) of the search did not complete: %s", failed,
                    _failures(study, client))
    for epoch, scores in enumerate(result.history, start=1):
        box.log_metrics(scores, step=epoch)
    log_best(result)
    postprocess, instance_scores = log_postprocess(config, data, result.model)
    log_mlflow_model(config, data, result, postprocess, instance_scores)
    log_health(config, data, result, instance_scores)  # the best trial's training, its curve
    return result


def trial_result(client, run_id: str) -> TrainResult:
    """A trial's TrainResult, read back from its run: per-epoch metrics, `best_*`, `model/`."""
    metrics = client.get_run(run_id).data.metrics
    history = trial_history(client, run_id)
    best_epoch = int(metrics["best_epoch"])
    return TrainResult(best_epoch=best_epoch, best_val_loss=metrics["best_val_loss"],
                       best_metrics=history[best_epoch - 1], model=trial_model(run_id),
                       epochs_run=int(metrics.get("epochs_run", len(history))),
                       history=history)


def trial_history(client, run_id: str) -> list[dict[str, float]]:
    """The per-epoch metrics of a run, one dict per epoch (step 1, 2, ...)."""
    names = [name for name in client.get_run(run_id).data.metrics
             if not name.startswith(("best_", "system/")) and name not in ONCE_METRICS]
    by_step: dict[int, dict[str, float]] = {}
    for name in names:
        for metric in client.get_metric_history(run_id, name):
            by_step.setdefault(metric.step, {})[name] = metric.value
    return [by_step[step] for step in sorted(by_step)]


def trial_model(run_id: str):
    """The model a trial run logged as `model/`, on the CPU, in eval mode."""
    import mlflow

    from nf1prov import weights

    with tempfile.TemporaryDirectory(prefix="nf1prov-trial-") as tmp:
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model",
                                                     dst_path=tmp)
        return weights.load(Path(folder), ref=f"trial run {run_id}")


def _failures(study, client) -> str:
    lines = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "COMPLETE" or trial.user_attrs.get(workers.SURPLUS_ATTR):
            continue
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        reason = None
        if run_id:
            reason = client.get_run(run_id).data.tags.get(tracking.FAILURE)
        lines.append(f"trial {trial.number} {trial.state.name}"
                     + (f" ({reason})" if reason else ""))
    return "; ".join(lines) or "no trial ran"


def _same_database(url: str, tracking_uri: str) -> bool:
    a, b = workers.sqlite_file(url), tracking.sqlite_path(tracking_uri or "")
    if a is not None and b is not None:
        return a.resolve() == b.resolve()
    return url == tracking_uri


def _range(value: list, key: str, kind: type) -> tuple:
    if len(value) != 2 or value[0] > value[1] or (kind is int and any(
            isinstance(v, float) and not v.is_integer() for v in value)):
        raise UserError(f"train.{key} must be [low, high] with low <= high"
                        f"{' (integers)' if kind is int else ''}, not {value}.")
    return kind(value[0]), kind(value[1])
