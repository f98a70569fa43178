"""`nf1prov checkout`: put a model's code and weights in front of the user, destroying nothing.

The work tree is switched (detached HEAD) only when it is clean; otherwise the command refuses
and lists the files. ``worktree=PATH`` makes a separate git worktree instead. A `--no-commit`
run trained on a dirty tree has no commit of its own: its code is the base commit plus its
logged diff, which only a new worktree gets (`scratch_code`), or the command refuses. The run's
artifacts land in ``<tree>/.nf1prov/models/<codename>/``: downloaded into a temporary folder
beside it and renamed into place, so a failure leaves no half folder.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nf1prov import git, tracking
from nf1prov.errors import UserError
from nf1prov.provenance import scratch_code
from nf1prov.provenance.models import write_run_record
from nf1prov.provenance.resolve import ResolvedModel

MODELS_DIR = Path(".nf1prov") / "models"
DEFAULT_ARTIFACTS = ("model", "config", "manifest")


@dataclass(frozen=True)
class CheckedOut:
    tree: Path  # the work tree now at the model commit
    artifacts: Path  # <tree>/.nf1prov/models/<codename>
    files: list[str]  # artifact paths downloaded, relative to ``artifacts``
    applied: list[str] | None = None  # a dirty scratch run's diff: the paths it changed


def safe_artifact_path(path: str) -> PurePosixPath:
    """An artifact path from the store, refused unless it is relative and free of '..'."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or pure.is_absolute() or any(p in ("..", "") for p in pure.parts):
        raise UserError(f"Refusing artifact path {path!r} from the tracking store: it is absolute "
                        "or climbs out of the model folder with '..'. The store may be "
                        "corrupted or tampered with; inspect the run in the MLflow UI.")
    return pure


@dataclass(frozen=True)
class ArtifactSource:
    """Where a group of artifacts comes from. MLflow 3 keeps a run's own files under the run
    and each model logged by the run as a separate "logged model" with its own listing."""

    prefix: str  # destination sub-folder ("" for the run's own files)
    list: Callable[[str | None], list]  # path -> FileInfo entries beneath it
    fetch: Callable[[str, str], str]  # (path, destination dir) -> downloaded local path


def artifact_sources(client, run) -> list[ArtifactSource]:
    run_id = run.info.run_id
    sources = [ArtifactSource("", lambda p: client.list_artifacts(run_id, p),
                              lambda p, d: client.download_artifacts(run_id, p, d))]
    outputs = getattr(run, "outputs", None)
    for output in getattr(outputs, "model_outputs", None) or []:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            logged = client.get_logged_model(output.model_id)
        except MlflowException:  # deleted: replaced by a later upload (log_logged_model)
            continue
        sources.append(ArtifactSource(
            str(safe_artifact_path(logged.name)),
            lambda p, m=logged.model_id: client.list_logged_model_artifacts(m, p),
            lambda p, d, root=logged.artifact_location.rstrip("/"):
                mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{p}", dst_path=d),
        ))
    return sources


def list_artifact_files(source: ArtifactSource,
                        roots: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """[(path in the source, path in the destination)] for every file under ``roots``."""
    files: list[tuple[str, str]] = []
    pending: list[str | None] = [None]
    while pending:
        for info in source.list(pending.pop()):
            path = str(safe_artifact_path(info.path))
            destination = f"{source.prefix}/{path}" if source.prefix else path
            top = destination.split("/", 1)[0]
            if roots is not None and top not in roots:
                continue
            (pending if info.is_dir else files).append(
                path if info.is_dir else (path, destination))
    return sorted(files, key=lambda pair: pair[1])


def download_artifacts(client, run, destination: Path,
                       roots: tuple[str, ...] | None = DEFAULT_ARTIFACTS) -> list[str]:
    """Download the run's artifacts into ``destination`` (replaced atomically); returns the
    paths written, relative to ``destination``. Every path is checked before anything is
    fetched."""
    # MLflow 3 lists a run's logged model under the run's own listing too: one file per
    # destination, the logged model's winning (as MLflow's own download does)
    plan = list({dest: (source, path, dest) for source in artifact_sources(client, run)
                 for path, dest in list_artifact_files(source, roots)}.values())
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        base = staging.resolve()
        for source, path, dest in plan:
            target = (staging / dest).resolve()
            if base not in target.parents:
                raise UserError(f"Refusing artifact path {dest!r}: it resolves outside "
                                f"{destination}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=staging) as scratch:
                shutil.move(source.fetch(path, scratch), target)
        old = destination.with_name(destination.name + ".old")
        if destination.exists():
            destination.rename(old)
        staging.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [dest for _, _, dest in plan]


def refuse_dirty_tree(root: Path) -> None:
    changes = git.status_porcelain(root)
    if changes:
        listing = ", ".join(path for _, path in changes[:20])
        more = f" and {len(changes) - 20} more" if len(changes) > 20 else ""
        raise UserError(
            f"The work tree {root} has uncommitted changes ({listing}{more}); checkout would put "
            "them at risk, so nothing was changed. Commit or stash them yourself, or use "
            "`nf1prov checkout CODENAME --worktree PATH` to get the model in a separate folder."
        )


def ignore_models_dir(tree: Path) -> None:
    """Make sure .nf1prov/ is ignored in ``tree`` (old commits may lack the .gitignore line)."""
    if git.is_ignored(tree, MODELS_DIR / "x", directory=False):
        return
    exclude = git.git_path(tree, "info/exclude")
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as handle:
        handle.write("\n# nf1prov: downloaded models and caches\n/.nf1prov/\n")


def checkout_model(root: Path, client, model: ResolvedModel, worktree: Path | None = None,
                   roots: tuple[str, ...] | None = DEFAULT_ARTIFACTS) -> CheckedOut:
    """Bring ``model``'s commit and artifacts into ``root`` (or a new worktree at ``worktree``).

    ``roots``: the top-level artifact folders to download (None: all of them)."""
    if model.sha is None:
        raise UserError(f"Model {model.codename} records no commit to check out.")
    diff = scratch_code.fetch_diff(client, model) if scratch_code.is_dirty_scratch(model.run) \
        else None
    if worktree is None and diff is not None:
        raise UserError(f"{model.codename} (run {model.run_id}) was trained with --no-commit on a "
                        f"dirty tree: its code was commit {model.sha} plus the changes in its "
                        f"{scratch_code.DIFF_ARTIFACT}, not that commit alone. Nothing was "
                        f"changed. Use `nf1prov checkout {model.run_id} --worktree PATH`: the "
                        "new worktree gets the commit with the diff applied.")
    if worktree is None:
        refuse_dirty_tree(root)
        ignore_models_dir(root)
        # Download first: a failed download leaves the tree where it was.
        destination = root / MODELS_DIR / model.codename
        files = download_artifacts(client, model.run, destination, roots)
        record_run(destination, model)
        if git.head_sha(root) != model.sha or git.current_branch(root) is not None:
            git.checkout_detached(root, model.sha)
            ignore_models_dir(root)  # the model commit's .gitignore may predate .nf1prov/
        return CheckedOut(root, destination, files)

    worktree = Path(os.path.normpath(Path(worktree).absolute()))
    inside = worktree.resolve() == Path(root).resolve() or Path(root).resolve() in \
        worktree.resolve().parents
    if inside and not git.is_ignored(root, worktree, directory=True):
        raise UserError(f"{worktree} lies inside the repository {root} and is not git-ignored: "
                        "the next model commit would record that worktree as a gitlink. Choose "
                        f"a folder outside the repository, e.g. --worktree ../{model.codename}, "
                        "or git-ignore the folder first.")
    if worktree.exists() and any(worktree.iterdir()):
        raise UserError(f"{worktree} exists and is not empty: choose a new folder for the "
                        "worktree.")
    git.add_worktree(root, worktree, model.sha)
    try:
        applied = None if diff is None else scratch_code.apply_diff(worktree, diff, model)
        ignore_models_dir(worktree)
        destination = worktree / MODELS_DIR / model.codename
        files = download_artifacts(client, model.run, destination, roots)
        record_run(destination, model)
    except BaseException:
        git.remove_worktree(root, worktree)
        raise
    return CheckedOut(worktree, destination, files, applied)


def record_run(destination: Path, model: ResolvedModel) -> None:
    """`models.RUN_RECORD` in the artifacts folder: predictions from its model/ name the run."""
    write_run_record(destination, codename=model.codename, run_id=model.run_id, sha=model.sha,
                     experiment_id=model.experiment_id)


def retrain_command(model: ResolvedModel, checked_out: CheckedOut, root: Path,
                    tracking_uri: str) -> str:
    """The exact shell line that retrains this model from its logged config, run inside the
    checked-out tree: that tree's code is what trains (see provenance.code_snapshot), the data
    is the folder the model was trained on (a relative data.root is resolved against ``root``,
    the repository checkout ran in) and the store is the one checkout read."""
    config = checked_out.artifacts.relative_to(checked_out.tree) / "config" / "config.toml"
    data_root = model.run.data.params.get("data.root", "")
    experiment = model.run.data.params.get("experiment.name", "")
    parts = ["nf1prov", "train", "--config", str(config)]
    if data_root:
        parts += ["--data-root", str((Path(root) / data_root).resolve())]
    if experiment:
        parts += ["--experiment", experiment]
    parts += ["--tracking-uri", tracking_uri]
    return f"cd {shlex.quote(str(checked_out.tree))} && {shlex.join(parts)}"


def shown_paths(paths: list[str], limit: int = 5) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more"
                                       if len(paths) > limit else "")


def describe(model: ResolvedModel, checked_out: CheckedOut, root: Path,
             tracking_uri: str) -> str:
    tags = model.run.data.tags
    lines = [f"Checked out {model.codename} (run {model.run_id}) at commit {model.sha} in "
             f"{checked_out.tree} (detached HEAD)."]
    if checked_out.applied is not None:
        lines[0] = (f"Checked out {model.codename} (run {model.run_id}), a --no-commit run: its "
                    f"code was commit {model.sha} plus its logged {scratch_code.DIFF_ARTIFACT}, "
                    f"both now in {checked_out.tree} (detached HEAD, the diff applied as "
                    f"uncommitted changes to {len(checked_out.applied)} file(s): "
                    f"{shown_paths(checked_out.applied)}).")
    lines += [
        f"Artifacts ({len(checked_out.files)} files) in {checked_out.artifacts}",
        f"Status: {model.run.info.status}"
        + (f" ({tags[tracking.FAILURE]})" if tracking.FAILURE in tags else ""),
        "Retrain it with:",
        f"  {retrain_command(model, checked_out, root, tracking_uri)}",
    ]
    if (checked_out.artifacts / "model").is_dir():
        lines += ["Load the model in Python (model.predict(stack) gives probabilities):",
                  "  from nf1prov.provenance.models import load_model; "
                  f"model = load_model('{checked_out.artifacts / 'model'}')"]
    return "\n".join(lines)
