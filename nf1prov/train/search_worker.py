"""Trial workers of a hyper-parameter search: processes that run trials of one model's Optuna
study until it holds its `train.trials` trials.

The study lives in RDB storage (`nf1prov.train.search` says which); its user attributes name
the model run (`parent_run_id`, `experiment_id`) and the number of trials (`trials`). A worker
loads the study and runs trials until the study holds that many (finished or running, failed
ones included), so any number of workers, on this machine or others (`nf1prov search-join`),
share the trials of one model.

Each trial is an MLflow run `trial_<number>` of the model's experiment, created with
`MlflowClient.create_run` and the tags `mlflow.parentRunId` (the model run), `nf1prov.kind =
trial`, `nf1prov.search.trial` (the number), `nf1prov.host`, `nf1prov.pid`,
`nf1prov.heartbeat` (refreshed every epoch) and `nf1prov.env.torch_threads`; it is made the
active run, so `fit` logs into it, and gets its params (`trial`, `train.batch_size`,
`train.learning_rate`), per-epoch metrics (and a shorter line per epoch on stderr, `trial N
epoch ...`), overlays, `best_*` metrics, its best weights as `model/` (`nf1prov.weights`) and
its health verdict `nf1prov.health` (no learning curve: the model run draws its own), so that
the model run can take the best trial's model from the store whichever process or machine
trained it. The Optuna trial records its MLflow run, host and
pid as user attributes (`mlflow_run_id`, `host`, `pid`).

A trial that raises is FAILED (its run gets `nf1prov.failure`; Ctrl-C and SIGTERM: KILLED) and
the worker goes on with the next one; Ctrl-C, SIGTERM, or the death of the process that started
the worker stop it. A worker stops before its next trial (and a trial at its next epoch) once
the model run is no longer RUNNING. Two workers that ask for a trial at the same moment when one
is left may get one too many: the surplus trial is marked PRUNED (user attribute `surplus`) and
never trained.

`python -m nf1prov.train.search_worker` is one worker process, its `WorkerSpec` as JSON on stdin
(the storage URL may hold a password: it never appears on a command line). It imports
`nf1prov` and `models` only from `code_root` (first on its PYTHONPATH; `-P` keeps the current
directory off `sys.path`) and checks that before it trains and before each trial ends FINISHED.
Exit codes: 0 done; 1 failed; 2 a user error; 130/143 stopped by SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from nf1prov import process_spec, threads, tracking
from nf1prov.code_origin import foreign_modules
from nf1prov.errors import Nf1provError, UserError

log = logging.getLogger(__name__)

SPEC_VERSION = 1
STORAGE_ENV = "NF1PROV_SEARCH_STORAGE"  # overrides train.search_storage (may hold a password)
STUDY_TAG = "nf1prov.search.study"  # on the model run: the Optuna study's name
STORAGE_TAG = "nf1prov.search.storage"  # on the model run: its storage URL, password as ***
TRIAL_TAG = "nf1prov.search.trial"  # on a trial run: the Optuna trial number
THREADS_TAG = "nf1prov.env.torch_threads"  # as on a model run (`nf1prov.provenance.run_tags`)
# Optuna trial user attributes
RUN_ID_ATTR, HOST_ATTR, PID_ATTR, SURPLUS_ATTR = "mlflow_run_id", "host", "pid", "surplus"
# Optuna study user attributes
TRIALS_ATTR, PARENT_ATTR, EXPERIMENT_ATTR = "trials", "parent_run_id", "experiment_id"

HEARTBEAT_INTERVAL_S = 30  # Optuna's heartbeat of a running trial
GRACE_PERIOD_S = 180  # a RUNNING trial without a heartbeat for this long is failed
SQLITE_TIMEOUT_S = 60  # how long a sqlite writer waits for the others' locks
PARENT_CHECK_S = 1.0
STOP_WAIT_S = 30.0  # how long a stopped worker may take to end its trial's run


# --- storage and study ----------------------------------------------------------------------


def masked(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: mask by hand
        return re.sub(r"^([^:/]+://[^/@:]*):[^/@]*@", r"\1:***@", url)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` storage URL, else None."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def open_storage(url: str):
    """Optuna RDB storage at ``url`` with trial heartbeats; a new sqlite file (and its folder)
    is created under a file lock, so that two searches starting at once do not race to create
    its tables. Raises UserError naming the (masked) URL and the fix."""
    import optuna

    engine_kwargs: dict = {"pool_pre_ping": True}
    lock = contextlib.nullcontext()
    db = sqlite_file(url) if url.startswith("sqlite") else None
    if db is not None:
        from filelock import FileLock

        db.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        lock = FileLock(tracking.store_lock_path(db))
    try:
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=HEARTBEAT_INTERVAL_S,
                                              grace_period=GRACE_PERIOD_S)
    except ModuleNotFoundError as exc:
        raise UserError(f"The Optuna storage {masked(url)} needs the Python package "
                        f"{exc.name!r}, which is not installed: install it (for PostgreSQL "
                        "`pip install psycopg2-binary`), or point train.search_storage / "
                        "NF1PROV_SEARCH_STORAGE at another database.") from None
    except Exception as exc:  # noqa: BLE001 - any failure to open it is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"Cannot open the Optuna storage {masked(url)}: {first}. Check the URL "
                        "(train.search_storage, or NF1PROV_SEARCH_STORAGE which overrides it) "
                        "and that the database server answers.") from None


def sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def worker_seed(seed: int) -> int:
    """The sampler seed of a worker process: derived from ``train.seed``, this host and this
    pid, so that workers sharing a study do not all draw the same first points."""
    text = f"{seed}:{socket.gethostname()}:{os.getpid()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def threads_per_worker(workers: int, setting: int = 0) -> int:
    """Torch threads of each of ``workers`` processes (`nf1prov.threads.choose`): the setting
    ``train.threads`` when > 0, else OMP_NUM_THREADS when set (the training process has it
    per worker already), else the CPUs this process may use shared out, at least one."""
    return threads.choose(setting, processes=workers).threads


def trial_count(study) -> int:
    return len(study.get_trials(deepcopy=False))


def run_status(client, run_id: str) -> str:
    return client.get_run(run_id).info.status


# --- running trials -------------------------------------------------------------------------


class ParentEnded(Exception):
    """The model run ended while this trial was training: the trial is of no use any more."""


def run_trials(study, *, client, config: dict, data, on_epoch=None,
               code_root: Path | None = None, announce: bool = False) -> list[int]:
    """Run trials of ``study`` in this process until it holds its ``trials`` trials (or the
    model run ends); returns the numbers of the trials this process trained.

    Trial exceptions fail that trial only; KeyboardInterrupt and other BaseExceptions end the
    trial's run KILLED and propagate. ``on_epoch(epoch, scores)`` is called after each epoch
    (``scores`` holds ``trial``); ``code_root``: check imported code comes from there;
    ``announce``: print a line on stderr for each trial trained (worker processes, whose
    progress bars are off: several would garble the terminal).
    """
    import optuna

    attrs = study.user_attrs
    trials, parent_id = int(attrs[TRIALS_ATTR]), attrs[PARENT_ATTR]
    experiment_id = attrs[EXPERIMENT_ATTR]
    t = config["train"]
    lo_bs, hi_bs = int(t["search_batch_size"][0]), int(t["search_batch_size"][1])
    lo_lr, hi_lr = float(t["search_learning_rate"][0]), float(t["search_learning_rate"][1])
    ran: list[int] = []

    def parent_running() -> bool:
        return run_status(client, parent_id) == "RUNNING"

    def stop_when_done(study, _trial) -> None:
        if trial_count(study) >= trials or not parent_running():
            study.stop()

    def objective(trial: optuna.Trial) -> float:
        if trial.number >= trials or not parent_running():
            # Lost a race for the last trial, or the model run ended: do not train it.
            trial.set_user_attr(SURPLUS_ATTR, True)
            study.stop()
            raise optuna.TrialPruned("surplus trial: the study already holds its trials")
        trial_config = copy.deepcopy(config)
        trial_config["train"]["batch_size"] = trial.suggest_int("batch_size", lo_bs, hi_bs)
        trial_config["train"]["learning_rate"] = trial.suggest_float(
            "learning_rate", lo_lr, hi_lr, log=True)
        result = train_trial(trial, trial_config, client=client, data=data,
                             parent_id=parent_id, experiment_id=experiment_id,
                             on_epoch=on_epoch, code_root=code_root,
                             parent_running=parent_running)
        ran.append(trial.number)
        if announce:
            print(f"nf1prov: trial {trial.number} done on {socket.gethostname()}:{os.getpid()}"
                  f": best val_loss {result.best_val_loss:.4f} at epoch {result.best_epoch} "
                  f"(batch size {trial_config['train']['batch_size']}, learning rate "
                  f"{trial_config['train']['learning_rate']:.3g}).", file=sys.stderr, flush=True)
        return result.best_val_loss

    if trial_count(study) >= trials or not parent_running():
        return ran
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A failed trial is logged by Optuna (WARNING, with its error) and the worker goes on.
        study.optimize(objective, catch=(Exception,), callbacks=[stop_when_done])
    return ran


def train_trial(trial, config: dict, *, client, data, parent_id: str, experiment_id: str,
                on_epoch=None, code_root: Path | None = None, parent_running=None):
    """Train one trial in its own nested run (see the module docstring); returns its
    TrainResult. The run ends FINISHED, or FAILED / KILLED with `nf1prov.failure`."""
    import mlflow
    import torch

    from nf1prov.train.trainer import fit, log_best, log_health, log_model, param_value

    number = trial.number
    trial.set_user_attr(HOST_ATTR, socket.gethostname())  # first: a worker that dies from here
    trial.set_user_attr(PID_ATTR, os.getpid())  # on is known to be gone
    run = client.create_run(experiment_id, run_name=f"trial_{number}", tags={
        "mlflow.parentRunId": parent_id, tracking.KIND: tracking.KIND_TRIAL,
        TRIAL_TAG: str(number), tracking.HOST: socket.gethostname(),
        tracking.PID: str(os.getpid()), tracking.HEARTBEAT: f"{time.time():.3f}",
        THREADS_TAG: str(torch.get_num_threads())})
    run_id = run.info.run_id
    trial.set_user_attr(RUN_ID_ATTR, run_id)

    def epoch_done(epoch: int, scores: dict) -> None:
        with contextlib.suppress(Exception):  # a missed beat only makes the run look older
            client.set_tag(run_id, tracking.HEARTBEAT, f"{time.time():.3f}")
        if on_epoch is not None:
            on_epoch(epoch, {**scores, "trial": float(number)})
        if parent_running is not None and not parent_running():
            raise ParentEnded(f"the model run {parent_id} ended before trial {number} finished")

    mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    try:
        mlflow.log_params({"trial": str(number),
                           "train.batch_size": param_value(config["train"]["batch_size"]),
                           "train.learning_rate": param_value(config["train"]["learning_rate"])})
        result = fit(config, data, on_epoch=epoch_done, checkpoint=False, trial=number)
        log_best(result)
        log_model(result.model)
        log_health(config, data, result, None, curve=False)  # the model run draws its curve
        if code_root is not None:
            check_code(code_root)
    except BaseException as exc:
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        # an nf1prov error (a diverged loss) is written for the user: no class name before it
        reason = getattr(exc, "reason", None) or (
            str(exc) if isinstance(exc, Nf1provError) else
            f"{type(exc).__name__}: {exc}" if str(exc) else
            "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
        end_trial_run(client, run_id, status, reason)
        if not isinstance(exc, Exception | KeyboardInterrupt):
            # Optuna records only Exceptions and KeyboardInterrupt as FAIL; others (SIGTERM in
            # the training process) would leave the trial RUNNING for ever.
            mark_failed(trial.study, trial._trial_id)
        raise
    mlflow.end_run("FINISHED")
    return result


def end_trial_run(client, run_id: str, status: str, reason: str) -> None:
    """End trial run ``run_id`` (the active run, or any) ``status`` with `nf1prov.failure`."""
    import mlflow

    line = " ".join(reason.split())[:500] or status
    with contextlib.suppress(Exception):
        client.set_tag(run_id, tracking.FAILURE, line)
    active = mlflow.active_run()
    try:
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the trial's own error matters more
        log.warning("could not end trial run %s %s: %s", run_id, status, exc)


def mark_failed(study, trial_id: int) -> bool:
    """Set a RUNNING trial to FAIL; False when it had finished meanwhile."""
    import optuna
    from optuna.trial import TrialState

    try:
        return bool(study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


# --- the code a worker runs -----------------------------------------------------------------


def code_root() -> Path:
    """The folder this process imports `nf1prov` from (a model commit's snapshot in a training
    process): the folder worker processes must import from too."""
    import nf1prov

    return Path(nf1prov.__file__).resolve().parent.parent


def check_code(root: Path) -> None:
    foreign = foreign_modules(root)
    if foreign:
        shown = "; ".join(f"{name} from {path}" for name, path in foreign[:8])
        raise UserError(f"The search worker imported code that is not the model commit's "
                        f"({shown}), not from {root}. Remove whatever puts another nf1prov or "
                        "models package ahead on sys.path (a .pth file, sitecustomize).")


# --- worker processes -----------------------------------------------------------------------


@dataclass
class WorkerSpec:
    """Everything a worker process needs, as plain JSON data."""

    tracking_uri: str
    storage: str  # the full URL, password included: passed on stdin only
    study_name: str
    parent_run_id: str
    config: dict
    data_root: str
    cache_dir: str
    code_root: str  # the folder holding the nf1prov and models packages to import
    threads: int
    parent_pid: int = 0
    version: int = SPEC_VERSION


def worker_environment(spec: WorkerSpec) -> dict[str, str]:
    env = tracking.child_environment(spec.tracking_uri)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec.code_root, env.get("PYTHONPATH")]))
    env.update(threads.choose(spec.threads, env).environment())  # and how OpenMP waits
    env["TQDM_DISABLE"] = "1"  # several processes' progress bars garble one terminal
    return env


def launch(spec: WorkerSpec, count: int) -> list[subprocess.Popen]:
    """Start ``count`` worker processes for ``spec``, each in its own session (a Ctrl-C at the
    terminal reaches the process that started them, which stops them: `stop`)."""
    command = [sys.executable, "-P", "-m", "nf1prov.train.search_worker"]
    processes = []
    for _ in range(count):
        process = subprocess.Popen(command, env=worker_environment(spec), stdin=subprocess.PIPE,
                                   start_new_session=True, text=True)
        with contextlib.suppress(BrokenPipeError):  # it died at once: its exit code says why
            process.stdin.write(json.dumps(asdict(spec)))
            process.stdin.close()
        processes.append(process)
    return processes


def stop(processes: list[subprocess.Popen], wait_s: float = STOP_WAIT_S) -> None:
    """Interrupt the worker processes still running (each ends its trial's run KILLED), wait up
    to ``wait_s``, then kill what is left."""
    alive = [p for p in processes if p.poll() is None]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + wait_s
    for process in alive:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Stopped(KeyboardInterrupt):
    """SIGTERM, or the process that started this worker is gone (a KeyboardInterrupt, so that
    Optuna records the trial as failed)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


_stop_reason = "killed by SIGTERM"


def _on_sigterm(signum, frame) -> None:
    raise Stopped(_stop_reason, 128 + signal.SIGTERM)


def watch_parent(parent_pid: int) -> None:
    import _thread

    def loop() -> None:
        global _stop_reason
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        _stop_reason = "the process that started this search worker died"
        _thread.interrupt_main(signal.SIGTERM)

    if parent_pid:
        threading.Thread(target=loop, name="nf1prov-search-parent-watch", daemon=True).start()


def serve(spec: WorkerSpec) -> list[int]:
    """The work of one worker process: load the study and run trials."""
    import mlflow
    import optuna
    import torch

    from nf1prov.train.trainer import prepare_data

    root = Path(spec.code_root)
    check_code(root)
    torch.set_num_threads(spec.threads)
    mlflow.set_tracking_uri(spec.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=spec.tracking_uri)
    storage = open_storage(spec.storage)
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              sampler=sampler(worker_seed(spec.config["train"]["seed"])))
    if study.user_attrs.get(PARENT_ATTR) != spec.parent_run_id:
        raise UserError(f"Study {spec.study_name} in {masked(spec.storage)} belongs to run "
                        f"{study.user_attrs.get(PARENT_ATTR)}, not {spec.parent_run_id}.")
    data = prepare_data(spec.config, Path(spec.data_root), Path(spec.cache_dir))
    return run_trials(study, client=client, config=spec.config, data=data, code_root=root,
                      announce=True)


def main() -> int:
    spec = process_spec.read(WorkerSpec, SPEC_VERSION, "search worker")
    if spec is None:
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    watch_parent(spec.parent_pid)
    who = f"search worker {socket.gethostname()}:{os.getpid()}"
    try:
        ran = serve(spec)
    except Stopped as exc:
        print(f"nf1prov: {who} stopped: {exc.reason}.", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"nf1prov: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:  # noqa: BLE001 - the model run's process reports the exit code
        traceback.print_exc(file=sys.stderr)
        return 1
    print(f"nf1prov: {who} trained trial(s) {', '.join(map(str, ran)) or 'none'}.",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
