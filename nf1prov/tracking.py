"""MLflow tracking store access shared by every verb: where the store is, and the contract tags.

The tag names below are the contract of DESIGN 3.3; every module reads and writes them through
these constants.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nf1prov import store_read
from nf1prov.errors import UserError

# --- contract tags (DESIGN 3.3) -------------------------------------------------------------
RUN_NAME = "mlflow.runName"
GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
GIT_REPO_URL = "mlflow.source.git.repoURL"
GIT_DIRTY = "mlflow.source.git.dirty"
NOTE_CONTENT = "mlflow.note.content"
KIND = "nf1prov.kind"
CODENAME = "nf1prov.codename"
GIT_TAG = "nf1prov.git_tag"
DESCRIPTION_PREFIX = "nf1prov.description."
NOTES = "nf1prov.notes"  # before one tag per note: all notes in one JSON array (read only)
# one tag per note: nf1prov.notes.<13-digit number ordering the notes>.<8 random hex digits>
NOTE_PREFIX = NOTES + "."
FAILURE = "nf1prov.failure"
# `ok`, or `warning: <reason>[; <reason>]...` when a model run ends (docs/training.md)
HEALTH = "nf1prov.health"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
USER = "mlflow.user"

# --- nf1prov's own tags (not contract, documented in docs/architecture.md) -------------------
HOST = "nf1prov.host"
PID = "nf1prov.pid"
HEARTBEAT = "nf1prov.heartbeat"  # unix seconds (float, as text) of the last sign of life
REPRODUCES = "nf1prov.reproduces"  # on a reproduction: the original run ID
REPRODUCED = "nf1prov.reproduced"  # on the original: the latest reproduction's outcome
# what each split trained on, JSON {split: {"fields": n, "patients": [...]}} (trainer)
DATA_SPLITS = "nf1prov.data.splits"
# what the latest logged evaluation scored (segment.evaluate; the catalogue shows the patients)
EVALUATED_PATIENTS = "nf1prov.evaluation.patients"  # JSON list of the patient folders scored
EVALUATED_DATA_ROOT = "nf1prov.evaluation.data_root"  # the folder they were read from

KIND_MODEL = "model"  # a committed model: the run a git commit belongs to
KIND_TRIAL = "trial"  # a nested Optuna trial under a model run
KIND_SCRATCH = "scratch"  # trained with --no-commit: never enters the catalogue

DEFAULT_EXPERIMENT = "nf1-segmentation"
# MLflow 3's UI opens an experiment without this tag on its GenAI pages; nf1prov's are models
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_MODELS = "custom_model_development"
LOGGED_MODEL = "model"  # a model run's MLflow logged model: runs:/<run_id>/model (DESIGN 3.11)
MODEL_COMMIT = "nf1prov.commit"  # on a logged model and a registered version: the commit
UPLOAD = "nf1prov.upload"  # on a logged model: which upload made it (tracking.log_logged_model)


def child_environment(tracking_uri: str | None = None) -> dict[str, str]:
    """os.environ for an `nf1prov` subprocess that must start its own run: no run, experiment
    or registry inherited from an outer `mlflow run` or shell; ``tracking_uri`` pinned if
    given."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")
           and not key.startswith("MLFLOW_EXPERIMENT_")}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def public_uri(uri: str) -> str:
    """``uri`` without a user name or password (a tracking URI may hold them)."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def ui_hint(tracking_uri: str) -> str:
    """How to look at the store in MLflow's UI: a server is its own UI; a local store needs
    `mlflow ui` started on it."""
    import shlex

    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"  # pastes into a shell


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless given --host/--port


def server_ui(tracking_uri: str | None) -> str | None:
    """The MLflow UI of an http(s) tracking server (the server is its own UI), without
    credentials, query or trailing slash; None for any other store."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(tracking_uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# MLflow 3's UI shows an experiment on its GenAI pages unless the URL asks for these
ML_PAGES = "?workflowType=machine_learning"


def run_page(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI at ``ui`` (its experiment then opens on the model
    training pages, `ML_PAGES`)."""
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}{ML_PAGES}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI: on its http(s) server, or for any other store where the
    `mlflow ui` command of `ui_hint` serves it (`LOCAL_UI`)."""
    return run_page(server_ui(tracking_uri) or LOCAL_UI, experiment_id, run_id)


def run_page_line(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """`run_url` as `train` and `show` print it: a local store's page needs `mlflow ui`."""
    local = "" if server_ui(tracking_uri) else " (while that `mlflow ui` runs)"
    return run_url(tracking_uri, experiment_id, run_id) + local


def default_tracking_uri(repo_root: Path) -> str:
    """MLflow's own default form, anchored at the repository root: sqlite:///<root>/mlflow.db."""
    path = str(Path(repo_root).resolve() / "mlflow.db")
    # SQLAlchemy percent-decodes the path (`sqlite_path`): a '%' or '?' in a folder name must
    # be encoded to name that folder
    return "sqlite:///" + path.replace("%", "%25").replace("?", "%3F")


def resolve_tracking_uri(cli_value: str | None, repo_root: Path | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db (a
    percent-encoded sqlite path decoded, `plain_sqlite_uri`)."""
    if cli_value:
        return plain_sqlite_uri(cli_value)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return plain_sqlite_uri(env)
    if repo_root is None:
        raise UserError(
            "No MLflow tracking store given and not inside a git repository to put mlflow.db in: "
            "pass --tracking-uri URI or set MLFLOW_TRACKING_URI."
        )
    return default_tracking_uri(repo_root)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (query string dropped), else None: the file
    SQLAlchemy (so MLflow) opens, which percent-decodes the path (``my%20store`` is the folder
    ``my store``)."""
    from urllib.parse import unquote

    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0]))


def plain_sqlite_uri(tracking_uri: str) -> str:
    """``tracking_uri`` with a percent-encoded sqlite path written out (``my%20store`` ->
    ``my store``): the same file to SQLAlchemy, and MLflow, which creates the database's folder
    from the path as written, then creates no literal ``my%20store`` folder. A path that holds
    '%' or '?' itself must stay encoded; other URIs are returned as they are."""
    db = sqlite_path(tracking_uri)
    if db is None or "%" not in tracking_uri.split("?", 1)[0] or any(c in str(db) for c in "%?"):
        return tracking_uri
    query = tracking_uri.partition("?")[1:]
    return f"sqlite:///{db}" + "".join(query)


def store_lock_path(db: Path) -> str:
    """The lock file that serialises creating the sqlite store ``db``: in the temp folder (keyed
    by the database's path), never beside it, where a repository's model commit would pick it up."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"nf1prov-store-{key}.lock")


def retry_on_conflict(action, attempts: int = 5, pause: float = 0.2):
    """``action()``, tried again when it raises: for get-or-create steps (MLflow's dataset
    inputs) whose insert can lose a race with another process's identical insert, after which
    the retry finds the row and links to it. The last failure is raised."""
    import time

    for attempt in range(attempts):
        try:
            return action()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(pause * (attempt + 1))


# A store that does not answer must say so in seconds, not after MLflow's minutes of retries.
# The first contact uses these; a user's own setting of any of them wins.
PROBE_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "8"}
# The training process: a call to a server that went away fails in seconds and waits in the
# outbox (`nf1prov.outbox`), which retries it, instead of stalling the training for minutes.
TRAINING_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                          "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                          "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@contextlib.contextmanager
def _impatient_http():
    added = [k for k in PROBE_HTTP_SETTINGS if k not in os.environ]
    os.environ.update({k: PROBE_HTTP_SETTINGS[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def client(tracking_uri: str, read_only: bool = False):
    """An MlflowClient on ``tracking_uri`` that has been checked to answer.

    A sqlite store is created (tables and migrations) under a file lock, so that several
    processes starting on a brand-new store create it once instead of racing each other into a
    half-created database. A server gets one quick try (about 20 seconds at most). Raises
    UserError (`store_problem`) naming the store and the fix when it cannot be used.

    A sqlite store this user cannot write is refused up front (its first write would fail half
    way), unless ``read_only``: the verbs that only read (list, show, checkout, predict, ...)
    use it as it is, which MLflow does without writing to an existing, migrated database.
    """
    import mlflow
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    tracking_uri = plain_sqlite_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not _writable(db) and not (read_only and db.is_file()):
        raise UserError(store_problem(tracking_uri, PermissionError("read-only")))
    lock = FileLock(store_lock_path(db)) if db is not None else contextlib.nullcontext()
    try:
        with lock, _impatient_http():  # MlflowClient() creates and migrates a new sqlite store
            c = MlflowClient(tracking_uri=tracking_uri)
            c.search_experiments(max_results=1)
    except Exception as exc:  # any failure here means the store is unusable
        raise UserError(store_problem(tracking_uri, exc)) from exc
    return c


SQLITE_HEADER = b"SQLite format 3\x00"


def store_problem(tracking_uri: str, exc: BaseException) -> str:
    """One paragraph for a store that failed: what is wrong with it, and the fix."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 300:  # MLflow's messages can run to kilobytes: cut at a word
        first = first[:300].rsplit(" ", 1)[0] + " ..."
    text = str(exc).lower()
    db = sqlite_path(tracking_uri)
    where = "(--tracking-uri or MLFLOW_TRACKING_URI)"
    if db is not None:
        if db.is_file() and db.stat().st_size and db.read_bytes()[:16] != SQLITE_HEADER:
            return (f"The MLflow store {db} is not an SQLite database (damaged, or another kind "
                    "of file): restore it from a backup, or move it away to start an empty "
                    f"store there. Or point at another store {where}.")
        if "readonly" in text or "read-only" in text or not _writable(db):
            if _on_read_only_filesystem(db):
                return (f"The MLflow store {db} lies on a read-only filesystem: this command "
                        "writes to the store, so run it on a writable copy of the store or "
                        f"remount that filesystem read-write, or point at another store {where}."
                        " (The verbs that only read, such as list and show, work as it is.)")
            return (f"The MLflow store {db} is read-only for this user: make it and its folder "
                    f"writable (chmod u+w), or point at a store you can write {where}.")
        if any(word in text for word in ("migration", "alembic", "revision", "no such table")):
            return (f"The MLflow store {db} is half-created or was made by another MLflow "
                    f"version ({first}). Upgrade it with `mlflow db upgrade {tracking_uri}`, or, "
                    "if it holds nothing you need, move it away to start an empty store.")
        return f"Cannot open the MLflow store {db}: {first}. Check the file {where}."
    if tracking_uri.startswith(("http://", "https://")):
        if any(code in text for code in ("401", "403", "unauthorized", "forbidden",
                                         "permission_denied", "unauthenticated")):
            return (f"The MLflow server {tracking_uri} refused our credentials ({first}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                    "MLFLOW_TRACKING_TOKEN) to an account of that server.")
        return (f"The MLflow server {tracking_uri} does not answer ({first}). Check that the "
                f"server is running and the URI is right {where}; a lab's server is started "
                "with `mlflow server` (README, \"A shared MLflow server for the lab\").")
    return (f"Cannot reach the MLflow tracking store {tracking_uri!r}: {first}. Check the URI "
            f"{where} and that the server is running.")


def _on_read_only_filesystem(db: Path) -> bool:
    """Whether the folder of ``db`` (or its nearest existing parent) is on a filesystem mounted
    read-only, where no chmod helps."""
    folder = db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _writable(db: Path) -> bool:
    """Whether this user can write the database (sqlite also writes a journal beside it)."""
    if db.exists():
        return os.access(db, os.W_OK) and os.access(db.parent, os.W_OK)
    return not db.parent.exists() or os.access(db.parent, os.W_OK)


def refuse_deleted(experiment, name: str) -> None:
    """UserError when ``experiment`` (MLflow's, or None) is in the trash: runs cannot go there."""
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted: restore it in the MLflow UI "
                        "or choose another name with --experiment.")


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    """The ID of experiment ``name``, created when missing.

    For a sqlite store the artifacts go beside the database (<db dir>/mlartifacts), not under
    whatever directory the command happened to run from.
    """
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        refuse_deleted(experiment, name)
        if EXPERIMENT_KIND not in experiment.tags:  # made by an older nf1prov or by hand
            c.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND,
                                 EXPERIMENT_KIND_MODELS)
        return experiment.experiment_id
    artifact_location = None
    db = sqlite_path(tracking_uri)
    if db is not None:
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=artifact_location,
                                   tags={EXPERIMENT_KIND: EXPERIMENT_KIND_MODELS})
    except Exception:
        # Another process created it between our lookup and our create (its unique name
        # constraint refused ours): use theirs. Anything else is re-raised.
        experiment = c.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage == "deleted":
            raise
        return experiment.experiment_id


def run_logged_models(c, run_id: str, name: str = LOGGED_MODEL) -> list:
    """The logged models ``name`` that run ``run_id`` made (MLflow's LoggedModel), oldest
    first."""
    experiment_id = c.get_run(run_id).info.experiment_id
    found, token = [], None
    while True:
        page = c.search_logged_models(experiment_ids=[experiment_id],
                                      filter_string=f"name = '{name}'", page_token=token)
        found += [m for m in page if m.source_run_id == run_id]
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda m: m.creation_timestamp)


def run_logged_model(c, run_id: str, name: str = LOGGED_MODEL):
    """The READY logged model ``name`` of run ``run_id`` (the newest), or None."""
    from mlflow.entities import LoggedModelStatus

    ready = [m for m in run_logged_models(c, run_id, name)
             if m.status == LoggedModelStatus.READY]
    return ready[-1] if ready else None


def log_logged_model(c, run_id: str, folder: Path, *, upload: str, name: str = LOGGED_MODEL,
                     step: int = 0, params: dict[str, str] | None = None,
                     tags: dict[str, str] | None = None, metrics: list | None = None,
                     dataset: tuple[str, str] | None = None) -> str:
    """Make the MLflow model saved in ``folder`` run ``run_id``'s logged model ``name`` (with
    ``params`` and ``tags``): create it, upload its files, mark it READY, list it among the run's
    outputs, delete the run's other models of that name (an earlier attempt's: ``runs:/<run
    id>/<name>`` must mean this one), and log ``metrics`` ([(key, value, timestamp, step)])
    linked to it and to ``dataset`` ((name, digest) of the run's dataset input). Returns its
    model ID.

    ``upload`` names this upload: called again with it (the outbox delivering again after an
    outage), the model it created is completed, not made twice."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    earlier = run_logged_models(c, run_id, name)
    model = next((m for m in earlier if m.tags.get(UPLOAD) == upload), None)
    if model is None:
        model = c.create_logged_model(c.get_run(run_id).info.experiment_id, name=name,
                                      source_run_id=run_id, params=params,
                                      tags={**(tags or {}), UPLOAD: upload})
    if model.status != LoggedModelStatus.READY:
        _name_in_mlmodel(Path(folder), model.model_id, run_id)
        c.log_model_artifacts(model.model_id, str(folder))
        c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    for other in earlier:
        if other.model_id != model.model_id:
            c.delete_logged_model(other.model_id)
    outputs = c.get_run(run_id).outputs
    if model.model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
        c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    dataset_name, dataset_digest = dataset or (None, None)
    linked = [Metric(key, value, timestamp, at, model_id=model.model_id,
                     dataset_name=dataset_name, dataset_digest=dataset_digest, run_id=run_id)
              for key, value, timestamp, at in metrics or []]
    if linked:
        c.log_batch(run_id, metrics=linked)
    return model.model_id


def _name_in_mlmodel(folder: Path, model_id: str, run_id: str) -> None:
    """Write the logged model's ID and run into the folder's ``MLmodel`` (what
    `mlflow.pyfunc.log_model` does; a loaded model's ``metadata.model_id`` reads it)."""
    from mlflow.models import Model

    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        record = Model.load(str(mlmodel))
        record.model_id, record.run_id = model_id, run_id
        record.save(str(mlmodel))


def search_runs_all(c, filter_string: str = "", order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` across all experiments, in one paged query.

    Deleted runs are left out. ``order_by`` defaults to newest first.
    """
    from mlflow.entities import ViewType

    experiment_ids = active_experiment_ids(c)
    if not experiment_ids:
        return []
    runs: list = []
    token = None
    with gc_paused():
        while True:
            page = c.search_runs(
                experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                max_results=5000, order_by=order_by or ["attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs


def active_experiment_ids(c) -> list[str]:
    """The IDs of every experiment not deleted, all pages of them."""
    from mlflow.entities import ViewType

    ids, token = [], None
    while True:
        page = c.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a while: for building many small objects at
    once (a search's tags, params and metrics of every run, a catalogue's values), which
    otherwise sets off collections over the whole heap of a process that imported MLflow, about
    half of a search's time. Cyclic garbage left meanwhile is collected once it is back on."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def model_runs(c, kinds: tuple[str, ...] = (KIND_MODEL,), *,
               params: tuple[str, ...] | None = None,
               metrics: tuple[str, ...] | None = None) -> list:
    """All runs whose nf1prov.kind is one of ``kinds``, newest first. ``c``: an MlflowClient,
    or a `reader`, which reads of the params and metrics only those in ``params`` and
    ``metrics`` when given."""
    # MLflow's filter language has no IN for tags: one query per kind, merged.
    if isinstance(c, store_read.Store):
        with gc_paused():
            runs = [run for kind in kinds for run in c.runs_tagged(KIND, kind, params, metrics)]
    else:
        runs = [run for kind in kinds
                for run in search_runs_all(c, f"tags.`{KIND}` = '{kind}'")]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def runs_by_codename(c, codename: str) -> list:
    """Runs named ``codename`` (the codename is the run name), in any experiment."""
    if isinstance(c, store_read.Store):
        return c.runs_named(codename)
    return search_runs_all(c, f"attributes.run_name = '{codename}'")


# --- reading without MLflow (the verbs that only read) -------------------------------------------

RunData, RunRecord = store_read.RunData, store_read.RunRecord
# "mlflow": the verbs that only read go through MLflow too (`reader` gives None)
STORE_READER = "NF1PROV_STORE_READER"


def reader(tracking_uri: str) -> store_read.Store | None:
    """``tracking_uri`` read without importing MLflow (`nf1prov.store_read`): a sqlite store's
    tables or a server's REST API; None where it must go through MLflow (another kind of store,
    a schema or setting `store_read` does not know, NF1PROV_STORE_READER=mlflow). The query
    functions here take it where they take an MlflowClient."""
    if os.environ.get(STORE_READER, "").strip().lower() == "mlflow":
        return None
    tracking_uri = plain_sqlite_uri(tracking_uri)
    db = sqlite_path(tracking_uri)
    try:
        if db is not None:
            return store_read.SqliteStore(db, tracking_uri)
        if tracking_uri.startswith(("http://", "https://")):
            return store_read.RestStore(
                tracking_uri, float(PROBE_HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
    except store_read.Unreadable:
        pass
    return None


def read_model_runs(c, kinds: tuple[str, ...] = (KIND_MODEL,), *,
                    params: tuple[str, ...] | None = None,
                    metrics: tuple[str, ...] | None = None) -> list:
    """`model_runs` for reading every model at once (the catalogue): the same runs, newest
    first, with the same ``info`` and ``data``; of the params and metrics, only those named in
    ``params`` and ``metrics`` when given (at least those: all of them where MLflow searched).

    MLflow's search builds an object per tag, param and metric of every run; for a store of a
    thousand trained models that is seconds. So a store `reader` reads is read that way even
    when ``c`` is an MlflowClient; if that read fails, MLflow's search does it.
    """
    direct = c if isinstance(c, store_read.Store) else reader(c.tracking_uri)
    if direct is not None:
        try:
            return model_runs(direct, kinds, params=params, metrics=metrics)
        except store_read.Unreadable:
            if direct is c:
                raise
    return model_runs(c, kinds)


def get_run(c, run_id: str):
    """Run ``run_id`` (whatever its state), or None when the store has none (``c``: an
    MlflowClient or a `reader`)."""
    if isinstance(c, store_read.Store):
        return c.run(run_id)
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        return None


def experiment_names(c) -> dict[str, str]:
    """{ID: name} of the experiments not deleted (MLflow's first page of them)."""
    if isinstance(c, store_read.Store):
        return c.experiments()
    return {e.experiment_id: e.name for e in c.search_experiments()}


# --- tag values longer than MLflow keeps ------------------------------------------------------

# MLflow's mlflow.utils.validation.MAX_TAG_VAL_LENGTH: a longer tag value is cut to this many
# characters with only a warning (by a server's or PostgreSQL's store too). Written out, since
# importing mlflow for it costs seconds in verbs that need no MLflow; tests/test_long_tags.py
# checks that it is MLflow's.
TAG_VALUE_LIMIT = 8000
_MORE = ".more."  # <key>.more.<i>: the i-th continuation of a value split by `long_tag`
_LENGTH = ".length"  # <key>.length: the split value's whole length, in characters
_PART = re.compile(r"(.+)\.more\.[1-9][0-9]*")
_NOTE_KEY = re.compile(r"nf1prov\.notes\.([0-9]{13})\.[0-9a-f]{8}")


def long_tag(key: str, value: str, rewritable: bool = False) -> dict[str, str]:
    """The tags that keep ``value`` under ``key`` whole, each within `TAG_VALUE_LIMIT`.

    A value that fits is ``{key: value}``. A longer one is split: ``key`` holds its first part
    (what MLflow's UI shows), ``key.more.1``, ``key.more.2``, ... the rest in order, and
    ``key.length`` its whole length, so that `read_long_tags` tells a whole value from one
    missing a part. Write them in one call (``log_batch``, ``create_run``). ``rewritable``: the
    key may be written again with a shorter value; ``key.length`` is then always written, so
    that the parts of an earlier, longer value are not read as part of this one.
    """
    if len(value) <= TAG_VALUE_LIMIT:
        return {key: value, f"{key}{_LENGTH}": str(len(value))} if rewritable else {key: value}
    parts = [value[i:i + TAG_VALUE_LIMIT] for i in range(0, len(value), TAG_VALUE_LIMIT)]
    tags = {key: parts[0]} | {f"{key}{_MORE}{i}": part for i, part in enumerate(parts[1:], 1)}
    return tags | {f"{key}{_LENGTH}": str(len(value))}


def long_tags(tags: dict[str, str], rewritable: bool = False) -> dict[str, str]:
    """`long_tag` of every item of ``tags``."""
    return {k: v for key, value in tags.items()
            for k, v in long_tag(key, value, rewritable).items()}


def log_tags(c, run_id: str, tags: dict[str, str], rewritable: bool = False) -> None:
    """Set ``tags`` on ``run_id`` in one write, every value whole (`long_tags`)."""
    from mlflow.entities import RunTag

    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in long_tags(tags, rewritable).items()])


def read_long_tags(tags: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(``tags`` with every value `long_tag` split joined back and its parts left out, a
    sentence for each value that lacks a part: it is read as far as its parts go)."""
    lengths = {key[:-len(_LENGTH)]: value for key, value in tags.items()
               if key.endswith(_LENGTH) and value.isdigit() and key[:-len(_LENGTH)] in tags}
    if not lengths:  # nothing was split: the common case, one pass over the keys
        return tags, []
    joined, problems = {}, []
    for key, value in tags.items():
        part = _PART.fullmatch(key)
        if ((part and part.group(1) in lengths)
                or (key.endswith(_LENGTH) and key[:-len(_LENGTH)] in lengths)):
            continue
        if key in lengths:
            value, problem = _join_parts(tags, key, int(lengths[key]))
            problems += [problem] if problem else []
        joined[key] = value
    return joined, problems


def _join_parts(tags: dict[str, str], key: str, length: int) -> tuple[str, str | None]:
    value, i = tags[key], 1
    while len(value) < length and f"{key}{_MORE}{i}" in tags:
        value += tags[f"{key}{_MORE}{i}"]
        i += 1
    if len(value) == length:
        return value, None
    return value[:length], (f"tag {key} holds {min(len(value), length)} of its {length} "
                            f"characters: part {key}{_MORE}{i} is missing from the store")


def json_array_prefix(text: str) -> list | None:
    """The complete items of a JSON array, or of one cut short (nested arrays too, each as far
    as it got), or None when ``text`` is not the start of a JSON array (or is broken before its
    end).

    ``'["a", "b", ["c", "d'`` -> ``["a", "b", ["c"]]``: a string, number or literal that reaches
    the end of ``text`` may have been cut, so it is left out.
    """
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return None
    root: list = []
    stack = [root]
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos == len(text):
            return root
        if text[pos] == "[":
            stack[-1].append([])
            stack.append(stack[-1][-1])
            pos += 1
        elif text[pos] == "]":
            stack.pop()
            pos += 1
            if len(stack) == 0:  # the whole array: nothing cut, nothing may follow
                return None if text[pos:].strip() else root
        else:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                return root if _cut_at_end(text, pos, exc) else None
            if end == len(text) and text[pos] != '"':
                return root
            stack[-1].append(value)
            pos = end


def _cut_at_end(text: str, pos: int, exc: json.JSONDecodeError) -> bool:
    """Whether the value at ``pos`` failed to parse only because ``text`` ends inside it."""
    if text[pos] == '"':
        return exc.msg.startswith("Unterminated string") or (
            exc.pos >= len(text) - 6 and "\\" in text[-6:])  # inside an escape
    rest = text[pos:]
    return (any(word.startswith(rest) for word in ("true", "false", "null"))
            or re.fullmatch(r"-?[0-9]*\.?[0-9]*([eE][-+]?[0-9]*)?", rest) is not None)


def cut_array(tag: str, raw: str, kept: int, what: str) -> str:
    """The sentence saying that the JSON array ``raw`` of ``tag`` was cut short, of which
    ``kept`` complete ``what`` are read."""
    why = (f"was cut by MLflow's {TAG_VALUE_LIMIT:,}-character limit (before nf1prov kept long "
           "values whole)" if len(raw) >= TAG_VALUE_LIMIT else "ends inside its JSON array")
    return (f"its tag {tag} {why}: the {kept} complete {what} before the cut are read, the "
            "rest is lost")


def note_key(tags: dict[str, str]) -> str:
    """The tag key of a new note on a run whose tags are ``tags``: it sorts after each note
    there (the current unix time in milliseconds, or one more than the newest note's number),
    and a random suffix keeps apart two notes added at the same moment by two processes."""
    import secrets
    import time

    newest = max((int(m.group(1)) for m in map(_NOTE_KEY.fullmatch, tags) if m), default=0)
    number = max(time.time_ns() // 1_000_000, newest + 1)
    return f"{NOTE_PREFIX}{number:013d}.{secrets.token_hex(4)}"


def is_note_tag(key: str) -> bool:
    """Whether ``key`` holds notes: the old `NOTES` array or a note of its own."""
    return key == NOTES or _NOTE_KEY.fullmatch(key) is not None


def read_notes(tags: dict[str, str]) -> tuple[list[str], list[str]]:
    """(a run's notes, oldest first; a sentence for each problem found reading them).

    ``tags``: as `read_long_tags` gives them. The old `NOTES` array comes first (one that
    MLflow cut, read as far as it parses), then one tag per note in key order.
    """
    notes, problems = _old_notes(tags.get(NOTES))
    notes += [tags[key] for key in sorted(k for k in tags if _NOTE_KEY.fullmatch(k))]
    return [note for note in notes if note.strip()], problems


def _old_notes(raw: str | None) -> tuple[list[str], list[str]]:
    if not raw:
        return [], []
    try:
        parsed = json.loads(raw)
    except ValueError:
        prefix = json_array_prefix(raw)
        if prefix is None:  # not a JSON array: a note written by hand
            return [raw], []
        notes = [str(n) for n in prefix if not isinstance(n, list)]
        return notes, [cut_array(NOTES, raw, len(notes), "notes")]
    return ([str(n) for n in parsed] if isinstance(parsed, list) else [str(parsed)]), []


def warn_damaged(run, problems: list[str]) -> None:
    """Each of ``problems`` (`read_long_tags`, `read_notes`) on stderr, naming the run."""
    for problem in problems:
        print(f"nf1prov: warning: {run.info.run_name} (run {run.info.run_id}): {problem}.",
              file=sys.stderr)
