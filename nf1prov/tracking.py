"""MLflow tracking store access shared by every verb: where the store is, and the contract tags.

The tag names below are the contract of DESIGN 3.3; every module reads and writes them through
these constants.
"""

from __future__ import annotations

import os
from pathlib import Path

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
NOTES = "nf1prov.notes"
FAILURE = "nf1prov.failure"

# --- nf1prov's own tags (not contract, documented in docs/architecture.md) -------------------
HOST = "nf1prov.host"
PID = "nf1prov.pid"
HEARTBEAT = "nf1prov.heartbeat"  # unix seconds (float, as text) of the last sign of life
REPRODUCES = "nf1prov.reproduces"  # on a reproduction: the original run ID
REPRODUCED = "nf1prov.reproduced"  # on the original: the latest reproduction's outcome
# what each split trained on, JSON {split: {"fields": n, "patients": [...]}} (trainer)
DATA_SPLITS = "nf1prov.data.splits"

KIND_MODEL = "model"  # a committed model: the run a git commit belongs to
KIND_TRIAL = "trial"  # a nested Optuna trial under a model run
KIND_SCRATCH = "scratch"  # trained with --no-commit: never enters the catalogue

DEFAULT_EXPERIMENT = "nf1-segmentation"


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


def default_tracking_uri(repo_root: Path) -> str:
    """MLflow's own default form, anchored at the repository root: sqlite:///<root>/mlflow.db."""
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(cli_value: str | None, repo_root: Path | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db."""
    if cli_value:
        return cli_value
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if repo_root is None:
        raise UserError(
            "No MLflow tracking store given and not inside a git repository to put mlflow.db in: "
            "pass --tracking-uri URI or set MLFLOW_TRACKING_URI."
        )
    return default_tracking_uri(repo_root)


def client(tracking_uri: str):
    """An MlflowClient on ``tracking_uri`` that has been checked to answer.

    Raises UserError naming the URI when the store cannot be reached.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    c = MlflowClient(tracking_uri=tracking_uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:  # any failure here means the store is unusable
        raise UserError(
            f"Cannot reach the MLflow tracking store {tracking_uri!r}: {exc}. Check the URI "
            "(--tracking-uri or MLFLOW_TRACKING_URI) and that the server is running."
        ) from exc
    return c


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    """The ID of experiment ``name``, created when missing.

    For a sqlite store the artifacts go beside the database (<db dir>/mlartifacts), not under
    whatever directory the command happened to run from.
    """
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted: restore it in the MLflow UI "
                            "or choose another name with --experiment.")
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=artifact_location)


def search_runs_all(c, filter_string: str = "", order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` across all experiments, in one paged query.

    Deleted runs are left out. ``order_by`` defaults to newest first.
    """
    from mlflow.entities import ViewType

    experiment_ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    runs: list = []
    token = None
    while True:
        page = c.search_runs(
            experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=5000, order_by=order_by or ["attributes.start_time DESC"], page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def model_runs(c, kinds: tuple[str, ...] = (KIND_MODEL,)) -> list:
    """All runs whose nf1prov.kind is one of ``kinds``, newest first."""
    # MLflow's filter language has no IN for tags: one query per kind, merged.
    runs = [run for kind in kinds for run in search_runs_all(c, f"tags.`{KIND}` = '{kind}'")]
    return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)


def runs_by_codename(c, codename: str) -> list:
    """Runs named ``codename`` (the codename is the run name), in any experiment."""
    return search_runs_all(c, f"attributes.run_name = '{codename}'")
