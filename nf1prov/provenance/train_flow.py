"""The `nf1prov train` flow, ordered so that a failure leaves nothing half-done.

1. `preflight` (caller): every check, nothing created.
2. The MLflow run is created (or the run `mlflow run` started is adopted) with the description,
   kind, host, pid and a first heartbeat; its generated name becomes the codename, made unique.
3. Under the commit lock: the codename is checked again, every change git does not ignore is
   staged and committed with the contract message, and `model/<codename>` is tagged.
4. The run gets the git tags (the commit SHA overwrites anything MLflow guessed) and the
   environment (tags + `environment/pip-freeze.txt`).
5. Training runs inside the run with a heartbeat thread; the run ends FINISHED.

From step 2 on, any exception ends the run FAILED (Ctrl-C or SIGTERM: KILLED) with a one-line
`nf1prov.failure`, and is re-raised. A commit that fails (a pre-commit hook, a locked index)
therefore leaves a FAILED run saying why, no commit and no tag, and the index as it was; a
training that fails after the commit keeps the commit and tag (that code did run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nf1prov import tracking
from nf1prov.config import load_config
from nf1prov.errors import UserError
from nf1prov.provenance import codename as codenames
from nf1prov.provenance import commit as model_commit
from nf1prov.provenance import git, liveness, preflight, run_tags
from nf1prov.provenance.heartbeat import Heartbeat

RESUMED_AT = "nf1prov.resumed_at"  # unix seconds of each resume, JSON array


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM (like KeyboardInterrupt for Ctrl-C)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


@dataclass
class Outcome:
    codename: str
    run_id: str
    experiment_id: str
    sha: str | None
    kind: str
    tracking_uri: str
    resumed: bool = False


# Set once SIGTERM arrived: the Interrupted raised by the handler may surface wrapped in another
# exception (e.g. when it lands inside MLflow's or SQLAlchemy's code), and must still mean KILLED.
_sigterm_received = False


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into `Interrupted` in the main thread for the duration (no-op elsewhere)."""
    global _sigterm_received
    _sigterm_received = False  # a new training: an earlier one's SIGTERM does not count

    def handler(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        raise Interrupted("killed by SIGTERM", 128 + signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _trainer():
    """`train_model`, imported only when training starts (torch is slow to import)."""
    from nf1prov.train.trainer import train_model

    return train_model


def end_run(client, run_id: str, status: str, reason: str | None = None) -> None:
    """Record the failure reason (if any), then end the run with ``status``."""
    import mlflow

    if reason:
        client.set_tag(run_id, tracking.FAILURE, run_tags.failure_line(reason))
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)
    else:
        client.set_terminated(run_id, status=status)


def end_run_or_warn(client, run_id: str, status: str, reason: str, attempts: int = 3) -> None:
    """`end_run`, retried (a busy sqlite store, a flaky server); if it still fails, warn and
    return, so that the exception being handled, not this one, decides the exit code. The run
    then stays RUNNING until `nf1prov list --reap` sees its process gone."""
    for attempt in range(attempts):
        try:
            end_run(client, run_id, status, reason)
            return
        except Exception as exc:  # noqa: BLE001 - any store error
            error = exc
            time.sleep(0.5 * (attempt + 1))
    print(f"nf1prov: warning: could not mark run {run_id} {status} ({reason}): {error}. "
          "`nf1prov list --reap` marks it FAILED once this process has ended.", file=sys.stderr)


@contextlib.contextmanager
def run_guard(client, run_id: str) -> Iterator[None]:
    """End the run KILLED or FAILED with a reason on any exception, then re-raise it."""
    try:
        yield
    except KeyboardInterrupt:
        end_run_or_warn(client, run_id, "KILLED", "interrupted by Ctrl-C (SIGINT)")
        raise
    except Interrupted as exc:
        end_run_or_warn(client, run_id, "KILLED", exc.reason)
        raise
    except BaseException as exc:
        if _sigterm_received:
            end_run_or_warn(client, run_id, "KILLED", "killed by SIGTERM")
            raise Interrupted("killed by SIGTERM", 128 + signal.SIGTERM) from exc
        end_run_or_warn(client, run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise


def create_or_adopt_run(plan: preflight.Plan, kind: str) -> tuple[str, str]:
    """(run_id, experiment_id): a new run, or the one `mlflow run` started (MLFLOW_RUN_ID)."""
    client = plan.client
    tags = run_tags.creation_tags(kind, plan.config["description"])
    if plan.adopt_run_id:
        run = client.get_run(plan.adopt_run_id)
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        return run.info.run_id, run.info.experiment_id
    experiment_id = tracking.ensure_experiment(client, plan.experiment_name, plan.tracking_uri)
    run = client.create_run(experiment_id, tags=tags)  # MLflow generates the run name
    return run.info.run_id, experiment_id


def record_code(plan: preflight.Plan, run_id: str, experiment_id: str) -> tuple[str, str | None]:
    """Make the codename unique and (unless --no-commit) the model commit and tag; set the git
    tags. Returns (codename, SHA or None)."""
    client, root = plan.client, plan.root
    name = codenames.make_unique(client, run_id, root)
    if plan.no_commit:
        sha = git.head_sha(root)
        dirty = git.is_dirty(root)
        if dirty:
            run_tags.log_text(client, run_id, uncommitted_diff(root),
                              run_tags.UNCOMMITTED_DIFF_ARTIFACT)
        tags = run_tags.git_tags(root, sha, dirty, codename=None)
    else:
        with model_commit.commit_lock(root):
            name = codenames.make_unique(client, run_id, root)  # again, now that we hold the lock
            message = model_commit.render_message(
                root, codename=name, run_id=run_id, experiment_id=experiment_id,
                experiment_name=plan.experiment_name, config=plan.config,
                config_path=plan.config_path, overrides=plan.overrides)
            sha = model_commit.commit_and_tag(root, message, name)
        tags = run_tags.git_tags(root, sha, dirty=False, codename=name)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return name, sha


def uncommitted_diff(root: Path) -> str:
    """`git diff HEAD` plus the names of untracked files (their content is not in a diff)."""
    untracked = [path for code, path in git.status_porcelain(root) if code == "??"]
    header = "".join(f"# untracked: {path}\n" for path in untracked)
    return header + git.diff_head(root)


def train(plan: preflight.Plan, echo: Callable[[str], None] = print) -> Outcome:
    """Steps 2-5 of the module docstring for a new model (or a --no-commit scratch run)."""
    import mlflow

    kind = tracking.KIND_SCRATCH if plan.no_commit else tracking.KIND_MODEL
    client = plan.client
    run_id, experiment_id = create_or_adopt_run(plan, kind)
    with run_guard(client, run_id):
        name, sha = record_code(plan, run_id, experiment_id)
        echo(f"Model {name} (run {run_id}) at commit {sha or '(none)'}: training...")
        run_tags.log_environment(client, run_id)
        train_model = _trainer()
        mlflow.set_tracking_uri(plan.tracking_uri)
        with mlflow.start_run(run_id=run_id), Heartbeat(client, run_id) as beat:
            train_model(plan.config, plan.data_root, cache_dir=plan.cache_dir,
                        resume_from=None, on_epoch=lambda *_: beat.beat())
        # leaving start_run's block ended the run FINISHED
    return Outcome(name, run_id, experiment_id, sha, kind, plan.tracking_uri)


# --- resume ------------------------------------------------------------------------------------


def find_run(client, name: str):
    """The one model (or scratch) run a codename or run ID names (see nf1prov.resolve)."""
    from nf1prov.resolve import resolve_model

    return resolve_model(client, name).run


def check_resumable(root: Path, run) -> str | None:
    """Refuse a run that cannot be continued; returns its commit SHA (None if unknown)."""
    tags, name = run.data.tags, run.info.run_name
    state = liveness.run_state(run)
    if state == "FINISHED":
        raise UserError(f"Model {name} already FINISHED: nothing to resume. Train a new model.")
    if state == "RUNNING":
        raise UserError(f"Model {name} is still RUNNING (host {tags.get(tracking.HOST)}, pid "
                        f"{tags.get(tracking.PID)}): wait for it, or stop that process first.")
    sha = tags.get(tracking.GIT_COMMIT)
    if tags.get(tracking.GIT_DIRTY) == "true":
        raise UserError(f"Model {name} was trained with --no-commit on a dirty tree, so its "
                        "code cannot be verified: train a new model instead.")
    if not sha or not git.SHA_RE.match(sha) or not git.commit_exists(root, sha):
        raise UserError(f"Model {name}'s commit {sha or '(none)'} is not in the repository "
                        f"{root}: fetch it (git fetch --tags) and retry.")
    differing = git.paths_differing_from(root, sha)
    if differing:
        shown = ", ".join(differing[:10]) + (" ..." if len(differing) > 10 else "")
        raise UserError(f"The working tree differs from model {name}'s commit {sha[:12]} in: "
                        f"{shown}. Resuming must run the same code: `git checkout {sha[:12]}` "
                        f"(or `nf1prov checkout {name}`), or undo those changes, then retry.")
    return sha


def download(client, run_id: str, artifact: str, dest: Path) -> Path | None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(client.download_artifacts(run_id, artifact, str(dest)))
    except Exception:  # noqa: BLE001 - a missing artifact surfaces as various MLflow errors
        return None


def prepare_resume(*, name: str, config_path: str | None, overrides=(), data_root=None,
                   tracking_uri=None, start=".") -> tuple[preflight.Plan, object, Path, Path]:
    """Preflight of `--resume`: (plan, run, checkpoint path, temp dir to delete afterwards).

    The config is the run's logged `config/config.toml` unless --config is given; `--set`
    overrides apply on top (e.g. more epochs)."""
    root = git.repo_root(start)
    uri = tracking.resolve_tracking_uri(tracking_uri, root)
    client = tracking.client(uri)
    run = find_run(client, name)
    check_resumable(root, run)
    tmp = Path(tempfile.mkdtemp(prefix="nf1prov-resume-"))
    try:
        checkpoint = download(client, run.info.run_id, "checkpoints/last.pt", tmp)
        if checkpoint is None:
            raise UserError(f"Model {name} has no checkpoints/last.pt (it ended before its "
                            "first epoch finished): nothing to resume; train a new model.")
        if config_path is None:
            config_path = download(client, run.info.run_id, "config/config.toml", tmp)
            if config_path is None:
                raise UserError(f"Model {name} has no logged config/config.toml: pass --config.")
        config = load_config(config_path, tuple(overrides))
        data_path = preflight.resolve_data_root(root, config, data_root)
        fields = preflight.check_data(config, data_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    plan = preflight.Plan(root=root, config=config, config_path=str(config_path),
                          overrides=tuple(overrides), data_root=data_path, tracking_uri=uri,
                          client=client,
                          experiment_name=client.get_experiment(run.info.experiment_id).name,
                          no_commit=run.data.tags.get(tracking.KIND) == tracking.KIND_SCRATCH,
                          fields=fields)
    return plan, run, checkpoint, tmp


def resume(plan: preflight.Plan, run, checkpoint: Path,
           echo: Callable[[str], None] = print) -> Outcome:
    """Continue ``run`` from ``checkpoint`` in the same run (status back to RUNNING)."""
    import mlflow

    client, run_id = plan.client, run.info.run_id
    train_model = _trainer()
    mlflow.set_tracking_uri(plan.tracking_uri)
    with run_guard(client, run_id):
        if tracking.FAILURE in run.data.tags:
            client.delete_tag(run_id, tracking.FAILURE)
        resumed = json.loads(run.data.tags.get(RESUMED_AT, "[]")) + [round(time.time(), 3)]
        client.set_tag(run_id, RESUMED_AT, json.dumps(resumed))
        run_tags.log_environment(client, run_id)
        echo(f"Resuming model {run.info.run_name} (run {run_id}) from its last checkpoint...")
        with mlflow.start_run(run_id=run_id), Heartbeat(client, run_id) as beat:  # RUNNING again
            train_model(plan.config, plan.data_root, cache_dir=plan.cache_dir,
                        resume_from=checkpoint, on_epoch=lambda *_: beat.beat())
    return Outcome(run.info.run_name, run_id, run.info.experiment_id,
                   run.data.tags.get(tracking.GIT_COMMIT), run.data.tags.get(tracking.KIND),
                   plan.tracking_uri, resumed=True)


def fail_adopted_run(run_id: str, tracking_uri: str | None, reason: str) -> None:
    """Best effort: end the run `mlflow run` started FAILED with ``reason`` (preflight refused)."""
    try:
        uri = tracking.resolve_tracking_uri(tracking_uri, None)
        end_run(tracking.client(uri), git.validate_run_id(run_id), "FAILED", reason)
    except Exception:  # noqa: BLE001 - the store may be the very thing that failed
        pass


def adopted_run_id() -> str | None:
    """MLFLOW_RUN_ID as set by `mlflow run`, removed from the environment so that nested runs
    started later (Optuna trials) do not adopt it too."""
    value = os.environ.pop("MLFLOW_RUN_ID", None)
    return value or None
