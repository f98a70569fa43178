"""The `nf1prov train` flow, ordered so that a failure leaves nothing half-done.

1. `preflight` (caller): every check, nothing created.
2. The MLflow run is created (or the run `mlflow run` started is adopted) with the description,
   kind, host, pid and a first heartbeat; its generated name becomes the codename, made unique.
3. Under the commit lock, with Ctrl-C and SIGTERM held back: the codename is checked again,
   every change git does not ignore is committed with the contract message and tagged
   `model/<codename>` in one step (`commit.ModelCommit`), and the run gets the git tags (the
   commit SHA overwrites anything MLflow guessed). If tagging the run fails, the commit is
   taken back: there is either nothing, or a commit, its tag and a run that names it.
4. The training process (`worker`) trains inside the run from a copy of the commit's own code
   (`code_snapshot`), records the environment, and ends the run FINISHED, FAILED or KILLED.

From step 2 on, any exception ends the run FAILED (Ctrl-C or SIGTERM: KILLED) with a one-line
`nf1prov.failure`, and is re-raised. A commit that fails (a pre-commit hook, a locked index)
leaves no commit, no tag and the index as it was, and its run, which is no model, is then
deleted (MLflow's soft delete: its reason stays readable there; docs/provenance.md); a
training that fails after the commit keeps the commit and tag (that code did run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nf1prov import git, outbox, tracking
from nf1prov.config import load_config
from nf1prov.errors import Nf1provError, UserError
from nf1prov.provenance import (
    code_snapshot,
    liveness,
    preflight,
    run_end,
    run_tags,
    signals,
    training,
)
from nf1prov.provenance import codename as codenames
from nf1prov.provenance import commit as model_commit
from nf1prov.provenance.run_end import end_run, run_guard

RESUMED_AT = training.RESUMED_AT
Interrupted = signals.Interrupted
sigterm_as_exception = signals.sigterm_as_exception


class LoggingPending(Nf1provError):
    """The model trained and is committed, but the store stopped answering: some of its
    logging (and the run's end) waits in the outbox for `nf1prov sync`. Exit 2."""

    def __init__(self, message: str, spool: Path):
        super().__init__(message)
        self.spool = spool


class TrainingFailed(Nf1provError):
    """Training failed after the run was created: the run is FAILED; exit 1."""

    exit_code = 1


@dataclass
class Outcome:
    codename: str
    run_id: str
    experiment_id: str
    sha: str | None
    kind: str
    tracking_uri: str
    resumed: bool = False


@dataclass
class Progress:
    """What exists so far, filled in as the flow goes: after an interrupt or a failure the
    command tells the user exactly what there is and what can be done with it."""

    run_id: str | None = None
    codename: str | None = None
    sha: str | None = None  # the model commit (or, with --no-commit, HEAD)
    resumable: bool = False  # the run has a commit whose code `--resume` can run again
    discarded: bool = False  # the run never got its commit and was deleted: nothing exists
    dirty: bool = False  # --no-commit on a dirty tree: the code is `sha` plus the logged diff


def create_or_adopt_run(plan: preflight.Plan, kind: str) -> tuple[str, str]:
    """(run_id, experiment_id): a new run, or the one `mlflow run` started (MLFLOW_RUN_ID)."""
    client = plan.client
    tags = run_tags.creation_tags(kind, plan.config["description"])
    if plan.adopt_run_id:
        run = client.get_run(plan.adopt_run_id)
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)
        if tracking.GIT_COMMIT in run.data.tags:  # MLflow's guess of HEAD, not a model commit
            client.delete_tag(run.info.run_id, tracking.GIT_COMMIT)
        return run.info.run_id, run.info.experiment_id
    experiment_id = tracking.ensure_experiment(client, plan.experiment_name, plan.tracking_uri)
    run = client.create_run(experiment_id, tags=tags)  # MLflow generates the run name
    return run.info.run_id, experiment_id


def tag_run(client, run_id: str, tags: dict[str, str], sha: str) -> None:
    """The git tags of DESIGN 3.3 in one write, so the store never holds half of them."""
    tracking.log_tags(client, run_id, {**tags, tracking.GIT_COMMIT: sha})


def untag_run(client, run_id: str) -> None:
    """Best effort: the commit was taken back, so the run must not name it (a store write may
    have landed before its error reached us)."""
    for key in (tracking.GIT_COMMIT, tracking.GIT_TAG):
        with contextlib.suppress(Exception):
            client.delete_tag(run_id, key)


def settle_interrupted_commit(root: Path) -> None:
    """Finish the model commit a killed training left between its ref transaction and its run
    tags (see `commit.recover`); warn and leave the journal if its store cannot be reached."""
    transaction = model_commit.recover(root)
    if transaction is None:
        return
    try:
        client = tracking.client(transaction.tracking_uri)
        tag_run(client, transaction.run_id, transaction.run_tags, transaction.sha)
    except Exception as exc:  # noqa: BLE001 - this training must not fail for an older one
        print(f"nf1prov: warning: model {transaction.codename} (commit {transaction.sha[:12]}) "
              f"was committed by a training that was killed, and its run {transaction.run_id} "
              f"could not be tagged with the commit ({exc}); the next training retries.",
              file=sys.stderr)
        return
    transaction.finish()
    print(f"nf1prov: note: recorded commit {transaction.sha[:12]} on run "
          f"{transaction.run_id} of model {transaction.codename}, whose training was killed "
          "right after committing.", file=sys.stderr)


def record_code(plan: preflight.Plan, run_id: str, experiment_id: str,
                progress: Progress) -> None:
    """Make the codename unique and (unless --no-commit) the model commit and tag; set the git
    tags and MLflow's Source and Created by (`run_tags.source_tags`). Fills in ``progress`` as
    each thing comes to exist."""
    client, root = plan.client, plan.root
    progress.codename = codenames.make_unique(client, run_id, root)
    if plan.no_commit:
        sha = git.head_sha(root)
        dirty = git.is_dirty(root)
        if dirty:
            run_tags.log_text(client, run_id, uncommitted_diff(root),
                              run_tags.UNCOMMITTED_DIFF_ARTIFACT)
        tracking.log_tags(client, run_id, {**run_tags.git_tags(root, sha, dirty, codename=None),
                                           **run_tags.source_tags(root)})
        progress.sha, progress.resumable, progress.dirty = sha, sha is not None and not dirty, dirty
        return
    with model_commit.commit_lock(root):
        settle_interrupted_commit(root)
        name = codenames.make_unique(client, run_id, root)  # again, now that we hold the lock
        progress.codename = name
        message = model_commit.render_message(
            root, codename=name, run_id=run_id, experiment_id=experiment_id,
            experiment_name=plan.experiment_name, config=plan.config,
            config_path=plan.config_path, overrides=plan.overrides)
        tags = {**run_tags.git_tags(root, None, dirty=False, codename=name),
                **run_tags.source_tags(root)}
        transaction = model_commit.ModelCommit(root, name, run_id, plan.tracking_uri, tags)
        with signals.deferred():  # an interrupt waits until commit, tag and run tags agree
            try:
                sha = transaction.commit(message)
                tag_run(client, run_id, tags, sha)
            except BaseException:
                if transaction.refs_moved:
                    transaction.undo()
                    untag_run(client, run_id)
                raise
            transaction.finish()
            progress.sha, progress.resumable = sha, True


@contextlib.contextmanager
def discarded_without_commit(plan: preflight.Plan, progress: Progress):
    """A model run that ends (`run_guard`: FAILED or KILLED, with its reason) before its
    commit exists is no model: delete it, so that `list`, the catalogue and the MLflow UI
    never show it (MLflow keeps deleted runs until `mlflow gc`, reason included). A run that
    `mlflow run` made stays: that tool ends it itself."""
    try:
        yield
    except BaseException:
        if progress.sha is None and not plan.no_commit and not plan.adopt_run_id:
            with contextlib.suppress(Exception):  # the store may be what failed
                plan.client.delete_run(progress.run_id)
                progress.discarded = True
        raise


def uncommitted_diff(root: Path) -> str:
    """Every uncommitted change, untracked files' content included, as one patch that
    `checkout --worktree` and `reproduce` apply to the base commit (`scratch_code.make_diff`)."""
    from nf1prov.provenance import scratch_code

    return scratch_code.make_diff(root)


def training_spec(plan: preflight.Plan, run_id: str, code_root: Path,
                  resume_from: Path | None = None) -> training.Spec:
    return training.Spec(run_id=run_id, tracking_uri=plan.tracking_uri, config=plan.config,
                       data_root=str(plan.data_root), cache_dir=str(plan.cache_dir),
                       code_root=str(code_root), argv=sys.argv[1:], parent_pid=os.getpid(),
                       resume_from=str(resume_from) if resume_from else None)


def run_training(plan: preflight.Plan, run_id: str, code_sha: str | None,
                 resume_from: Path | None = None) -> None:
    """Train in the training process, from a snapshot of commit ``code_sha`` (None: the work
    tree itself, for --no-commit); raise Interrupted or TrainingFailed as it ended."""
    client = plan.client
    with contextlib.ExitStack() as stack:
        with run_guard(client, run_id):
            code_root = plan.root if code_sha is None else stack.enter_context(
                code_snapshot.snapshot(plan.root, code_sha))
            spec = training_spec(plan, run_id, code_root, resume_from)
        returncode = training.launch(spec, client)
    if returncode == 0:
        return
    if returncode == training.LOGGING_PENDING_EXIT:
        spool = outbox.spool_dir(plan.cache_dir, run_id)
        raise LoggingPending(
            f"The model trained, but the tracking store {plan.tracking_uri} stopped answering "
            f"before everything was logged. Nothing is lost: {outbox.describe_saved(spool)} "
            f"wait in {spool}, and the run stays RUNNING until they arrive. Once the store "
            f"answers again, run `nf1prov sync` in {plan.root} to log them.", spool)
    run = client.get_run(run_id)
    failure = run.data.tags.get(tracking.FAILURE, "no reason recorded")
    if returncode in run_end.INTERRUPT_EXITS:
        raise Interrupted(failure, 128 + run_end.INTERRUPT_EXITS[returncode])
    if run.info.status == "RUNNING":  # the store took no write (a full disk): said above
        raise TrainingFailed(f"training failed (the training process said why, above), and "
                             f"the store could not record it: run {run.info.run_name} stays "
                             "RUNNING until `nf1prov list --reap` can mark it FAILED.")
    raise TrainingFailed(f"training failed: {failure.rstrip('.')}. The run is marked "
                         f"{run.info.status} (nf1prov.failure); `nf1prov show "
                         f"{run.info.run_name}` has the details.")


def train(plan: preflight.Plan, echo: Callable[[str], None] = print,
          progress: Progress | None = None,
          after_commit: Callable[[Progress], None] | None = None) -> Outcome:
    """Steps 2-4 of the module docstring for a new model (or a --no-commit scratch run);
    ``after_commit`` runs once the model commit and tag exist, before the training (`--push`)."""
    progress = progress if progress is not None else Progress()
    kind = tracking.KIND_SCRATCH if plan.no_commit else tracking.KIND_MODEL
    client = plan.client
    run_id, experiment_id = create_or_adopt_run(plan, kind)
    progress.run_id = run_id
    with discarded_without_commit(plan, progress), run_guard(client, run_id):
        record_code(plan, run_id, experiment_id, progress)
        name, sha = progress.codename, progress.sha
        changes = (f" plus its uncommitted changes (logged as "
                   f"{run_tags.UNCOMMITTED_DIFF_ARTIFACT})" if progress.dirty else "")
        echo(f"Model {name} (run {run_id}) at commit {sha or '(none)'}{changes}: training...")
    if after_commit is not None and not plan.no_commit:
        after_commit(progress)
    run_training(plan, run_id, None if plan.no_commit else sha)
    return Outcome(name, run_id, experiment_id, sha, kind, plan.tracking_uri)


# --- resume ------------------------------------------------------------------------------------


def find_run(client, name: str):
    """The one model (or scratch) run a codename or run ID names
    (`nf1prov.provenance.resolve`)."""
    from nf1prov.provenance.resolve import resolve_model

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
    # The training runs from a snapshot of that commit, whatever the work tree holds now.
    code_snapshot.check_commit_holds_code(root, sha, name)
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
        preflight.check_ranks(config)
        data_path = preflight.resolve_data_root(root, config, data_root)
        preflight.check_data(config, data_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    plan = preflight.Plan(root=root, config=config, config_path=str(config_path),
                          overrides=tuple(overrides), data_root=data_path, tracking_uri=uri,
                          client=client,
                          experiment_name=client.get_experiment(run.info.experiment_id).name,
                          no_commit=run.data.tags.get(tracking.KIND) == tracking.KIND_SCRATCH)
    return plan, run, checkpoint, tmp


def resume(plan: preflight.Plan, run, checkpoint: Path,
           echo: Callable[[str], None] = print, progress: Progress | None = None) -> Outcome:
    """Continue ``run`` from ``checkpoint`` in the same run (status back to RUNNING), with the
    code of the run's own commit."""
    progress = progress if progress is not None else Progress()
    run_id, tags = run.info.run_id, run.data.tags
    sha = tags.get(tracking.GIT_COMMIT)
    progress.run_id, progress.codename, progress.sha = run_id, run.info.run_name, sha
    progress.resumable = True
    echo(f"Resuming model {run.info.run_name} (run {run_id}) from its last checkpoint, with "
         f"the code of commit {sha[:12]}...")
    run_training(plan, run_id, sha, resume_from=checkpoint)
    return Outcome(run.info.run_name, run_id, run.info.experiment_id, sha,
                   tags.get(tracking.KIND), plan.tracking_uri, resumed=True)


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
