"""Checks `nf1prov train` makes before it creates anything (no run, no commit, no file).

Every failure is a UserError (exit 2) naming the file or value and the fix. `preflight` returns
a `Plan`: everything the rest of the flow needs, resolved once.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nf1prov import git, tracking
from nf1prov.config import load_config, override_key
from nf1prov.errors import UserError
from nf1prov.provenance import code_snapshot, commit, own_output, secret_scan, uncommittable

CACHE_DIR = ".nf1prov/cache"


@dataclass
class Plan:
    root: Path
    config: dict
    config_path: str
    overrides: tuple[str, ...]
    data_root: Path
    tracking_uri: str
    client: object
    experiment_name: str
    no_commit: bool
    adopt_run_id: str | None = None  # MLFLOW_RUN_ID: the run `mlflow run` started

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR


def check_identity(root: Path) -> None:
    if git.identity(root) is None:
        raise UserError(
            f"git has no identity to commit the model with in {root}. Set one: "
            "`git config --global user.name 'Your Name'` and "
            "`git config --global user.email you@example.org` (or use --no-commit)."
        )


def check_repo_state(root: Path) -> None:
    """No conflicts and no operation in progress: the model commit would conclude a merge under
    the model's message, or swallow the commit a rebase is replaying."""
    unmerged = git.unmerged_paths(root)
    if unmerged:
        raise UserError(f"{root} has unresolved merge conflicts ({', '.join(unmerged[:5])}): "
                        "resolve and commit them before training a model.")
    operation = git.operation_in_progress(root)
    if operation:
        what, finish = operation
        raise UserError(f"{root} is in the middle of {what}: a model commit now would become "
                        f"part of it. Finish it first ({finish}), then train again (or train "
                        "with --no-commit, which commits nothing).")


def check_model_tags_possible(root: Path) -> None:
    """A ref that clashes with ``model/<codename>`` (e.g. a plain tag ``model``) would fail the
    tag after the run exists: refuse it now."""
    probe = "refs/tags/" + git.model_tag("preflight-check-0")
    clashes = git.refs_clashing_with(root, probe)
    if clashes:
        raise UserError(commit.refs_clash_message(root, "refs/tags/model/<codename>", clashes))


def check_signing(root: Path) -> None:
    """With ``commit.gpgSign``, git signs the model commit as it signs any commit (gpg.format,
    user.signingKey, gpg.program): sign a throwaway commit now, in an object folder of its own
    that is deleted after, so that a missing key or program is refused before any run exists."""
    if not git.config_bool(root, "commit.gpgSign"):
        return
    with tempfile.TemporaryDirectory(prefix="nf1prov-signing-") as objects:
        env = {"GIT_OBJECT_DIRECTORY": objects}
        tree = git.git("mktree", cwd=root, input="", env=env).stdout.strip()
        proc = git.git("commit-tree", "-S", tree, cwd=root, input="nf1prov: signing check\n",
                       env=env, check=False)
    if proc.returncode == 0:
        return
    said = " ".join((proc.stderr + proc.stdout).split()) or f"exit {proc.returncode}"
    kind = git.git("config", "gpg.format", cwd=root, check=False).stdout.strip() or "openpgp"
    raise UserError(
        f"commit.gpgSign is true in the git config of {root}, so the model commit must be "
        f"signed, and git cannot sign here (gpg.format {kind}): {said}. Set up your signing "
        "key (user.signingKey; `git commit --allow-empty -S -m test` in a scratch repository "
        "shows when it works), or stop signing in this repository with `git config "
        "commit.gpgSign false` (or train with --no-commit).")


def setting_source(key: str, config_path, overrides=()) -> str:
    """Where ``key``'s value came from, for a message: its last ``--set``, else the file."""
    given = [f"--set {item}" for item in overrides if override_key(item) == key]
    return (given or [str(config_path)])[-1]


def check_device(config: dict, source: str) -> None:
    """``train.device = cuda`` needs a CUDA GPU here: refused now, not by the training after
    the model commit. torch is imported for this only (preflight otherwise never does)."""
    if config["train"]["device"] != "cuda":
        return
    from nf1prov.devices import pick_device

    try:
        pick_device("cuda", setting="train.device")
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def check_nothing_unsafe_to_commit(root: Path) -> None:
    """No file the command line's own redirect is writing, no dirty submodule, no new or
    changed file that looks like a secret, no new file that looks like data, and no embedded
    repository."""
    entries = git.status_porcelain(root)
    new = [path for code, path in entries if code == "??" or code[0] in "ACR"]
    changed = [path for code, path in entries  # modified tracked files (not submodules)
               if not (code == "??" or code[0] in "ACR" or "D" in code)
               and (root / path).is_file()]
    staged = {path for code, path in entries if code[0] in "ACR"}
    check_no_own_output_committed(root, new + changed)
    check_submodules_clean(root)
    secrets = secret_scan.find_secrets(root, new=new, changed=changed)
    if secrets:
        raise UserError(secret_scan.refusal_message(root, secrets, staged))
    data = uncommittable.data_among(new)
    if data:
        raise UserError(refusal_message(root, data, "look like data or weights", staged))
    embedded = git.embedded_repositories(root)
    if embedded:
        raise UserError(
            f"{', '.join(embedded[:5])} inside {root} is a git repository or worktree of its "
            "own: the model commit would record it as a bare gitlink, not its files. Move it "
            f"out of the repository, or add '/{embedded[0]}/' to {root / '.gitignore'}."
        )


def check_no_own_output_committed(root: Path, rels: list[str]) -> None:
    """The user's own `> model.json` or `| tee train.log` inside the repository would put a
    half-written file into the model commit and leave the tree dirty after: refuse it."""
    written = own_output.being_written(root, rels)
    if written:
        names = ", ".join(written[:5])
        raise UserError(
            f"{names} inside {root} is being written by this command's own output (a shell "
            "redirect such as `> model.json` or a pipe to `tee`): the model commit would take "
            "it half-written and leave the tree dirty afterwards. Nothing was created. Write "
            "it outside the repository (e.g. `--json > ../model.json`, `| tee /tmp/train.log`)"
            f" or to a git-ignored path (add '/{written[0]}' to {root / '.gitignore'}), and "
            "delete the file the shell created there.")


def check_submodules_clean(root: Path) -> None:
    """A submodule's uncommitted edits would run but the model commit records only its commit
    (a gitlink): refuse them like a dirty tree. A submodule at another commit is fine: the
    model commit records that commit."""
    dirty = git.dirty_submodules(root)
    if dirty:
        listing = "; ".join(f"{path} ({' and '.join(what)})" for path, what in dirty[:5])
        path = dirty[0][0]
        raise UserError(
            f"The submodule{'s' if len(dirty) > 1 else ''} {listing} in {root} "
            "has changes of its own: the model commit "
            "records only the submodule's commit, not its uncommitted files, so the code that "
            f"runs would differ from the commit. Nothing was created. Commit inside the "
            f"submodule first (`git -C {path} add -A && git -C {path} commit`), or drop the "
            f"edits (`git submodule update --force -- {path}`; untracked files: `git -C {path} "
            "clean -n` lists them, or git-ignore them inside the submodule).")


def refusal_message(root: Path, found: list[tuple[str, str]], what: str,
                    staged: set[str]) -> str:
    listing = "; ".join(f"{path} ({why})" for path, why in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    lines = "".join(f"\n  {path}" for path, _ in found[:10])
    unstage_text = uncommittable.unstage_advice([path for path, _ in found], staged)
    return (f"The model commit would include new files that {what}: {listing}{more}. Nothing "
            f"was created. Add them (or their folder) to {root / '.gitignore'}:{lines}\n"
            f"{unstage_text} If one belongs in git (e.g. a small test image), commit it "
            "yourself once (`git add PATH && git commit`): files "
            "already committed are never refused.")


def check_data_not_committed(root: Path, data_root: Path) -> None:
    """A data root inside the repository must be git-ignored: the dataset never goes into a
    model commit."""
    try:
        rel = data_root.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return  # outside the repository
    if rel == ".":
        raise UserError(f"The data root {data_root} is the repository itself: keep the data in "
                        "a folder of its own (git-ignored) or outside the repository.")
    exposed = git.paths_under(root, rel)
    if exposed:
        tracked = git.tracked_paths_under(root, rel)
        untrack = (f" and stop tracking it (`git rm -r --cached {rel}`)" if tracked else "")
        raise UserError(
            f"The data root {rel}/ lies inside the repository {root} and is not git-ignored "
            f"({len(exposed)} files, e.g. {exposed[0]}), so the model commit would hold the "
            f"dataset. Add the line '/{rel}/' to {root / '.gitignore'}{untrack}, or keep the "
            "data outside the repository."
        )


def check_runtime_files_ignored(root: Path, tracking_uri: str) -> None:
    """Files nf1prov itself writes inside the repository must be git-ignored, or the next model
    commit would swallow a database or a cache."""
    candidates = [(root / ".nf1prov", True)]
    db = tracking.sqlite_path(tracking_uri)
    if db is not None:
        candidates += [(db, False), (db.parent / "mlartifacts", True)]
    missing = []  # all of them in one message: a user fixes them in one go
    for path, directory in candidates:
        try:
            path.resolve().relative_to(root.resolve())
        except ValueError:
            continue
        if not git.is_ignored(root, path, directory):
            missing.append(path.resolve().relative_to(root.resolve()).as_posix()
                           + ("/" if directory else ""))
    if missing:
        names = (", ".join(missing[:-1]) + " and " if len(missing) > 1 else "") + missing[-1]
        one = len(missing) == 1
        lines = "".join(f"\n  {rel}" for rel in missing)
        raise UserError(
            f"{names} {'lies' if one else 'lie'} inside the repository {root} but "
            f"{'is' if one else 'are'} not git-ignored, so the model commit would include "
            f"{'it' if one else 'them'}. Add {'this line' if one else 'these lines'} to "
            f"{root / '.gitignore'}:{lines}")


def check_file_sizes(root: Path, max_file_mb: float) -> None:
    limit = max_file_mb * 1024 * 1024
    big = [(p, p.stat().st_size) for p in git.files_to_commit(root) if p.stat().st_size > limit]
    if big:
        listing = ", ".join(f"{p.relative_to(root)} ({size / 1e6:.1f} MB)" for p, size in big[:5])
        raise UserError(
            f"The model commit would include files larger than {max_file_mb:g} MB: {listing}. "
            f"Data and weights do not belong in git: add them to {root / '.gitignore'}, or raise "
            "the limit with --max-file-mb N (config experiment.max_commit_file_mb)."
        )


def resolve_data_root(root: Path, config: dict, data_root: str | None) -> Path:
    """The data folder to train on: --data-root (relative to the current directory), else
    config data.root (relative to the repository root). A --data-root is written into
    ``config`` as an absolute path, so that the run's params and logged config record the data
    the model was really trained on (what `checkout` prints and `evaluate` defaults to)."""
    path = Path(data_root) if data_root else Path(config["data"]["root"])
    if not data_root and not path.is_absolute():
        path = root / path
    path = path.resolve()
    if not path.is_dir():
        source = "--data-root" if data_root else "config data.root (relative to the repo root)"
        raise UserError(f"Data folder {path} ({source}) does not exist. Create it with "
                        "`nf1prov demo-data DIR`, or point --data-root at your data.")
    if data_root:
        config["data"]["root"] = str(path)
    return path


def check_data(config: dict, data_root: Path) -> list:
    """Validate every stack under the data root, the holdout patients' too (`evaluate` reads
    them later); returns the fields of view training will use."""
    from nf1prov.data.layout import discover_fields, is_held_out, select_fields, validate_fields

    holdout = config["data"]["holdout_patients"]
    every_field = discover_fields(data_root, ())
    fields = select_fields([f for f in every_field if not is_held_out(f.patient, holdout)],
                           config["data"]["fields"], data_root)
    if not fields:
        raise UserError(f"No fields of view found under {data_root}"
                        + (f" once the holdout patients {', '.join(holdout)} are left out"
                           if every_field else "")
                        + ": expected <patient>/zstack_images/<well>-<site>/<well>-<site>"
                        "_TRANS.tif (DESIGN 3.5). Check --data-root / data.root and "
                        "data.holdout_patients.")
    patients = {f.patient for f in every_field}
    absent = [p for p in holdout if not any(is_held_out(patient, [p]) for patient in patients)]
    if absent:  # allowed (labs keep holdout data elsewhere), but never silently
        print(f"nf1prov: note: holdout patient(s) {', '.join(absent)} have no folder under "
              f"{data_root}: nothing is held out for them here. Check data.holdout_patients "
              "if that is a typo.", file=sys.stderr)
    if config["data"]["fields"]:  # a chosen subset (reproduce): not the fields left out
        every_field = fields + [f for f in every_field if is_held_out(f.patient, holdout)]
    d = config["data"]
    validate_fields(every_field, d["input_slices"], d["crop_size"],
                    normalisation=d["normalisation"], edge_slices=d["edge_slices"])
    return fields


def check_ranks(config: dict) -> None:
    """``train.nproc`` processes can run here (one GPU each on CUDA) and share each batch."""
    t = config["train"]
    nproc = t["nproc"]
    if nproc == 1:
        return
    if t["trials"] > 1:
        raise UserError(f"train.nproc = {nproc} with train.trials = {t['trials']}: an Optuna "
                        "search trains its trials one process each (train.search_workers); "
                        "set train.nproc = 1 for a search.")
    if t["batch_size"] < nproc:
        raise UserError(f"train.batch_size = {t['batch_size']} is the global batch the "
                        f"{nproc} processes of train.nproc share: it must be at least {nproc}.")
    import torch

    here = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))  # torchrun: this machine's share
    if t["device"] == "cuda" or (t["device"] == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if here > gpus:
            raise UserError(f"train.nproc = {nproc} needs one GPU per process, and this machine "
                            f"has {gpus}: use --nproc {max(gpus, 1)} (or train.device = cpu).")
    elif here > (os.cpu_count() or 1):
        print(f"nf1prov: note: {here} training processes on {os.cpu_count()} CPU cores: they "
              "will share cores and run slower than fewer would.", file=sys.stderr)


def check_store(client, experiment_name: str) -> None:
    tracking.refuse_deleted(client.get_experiment_by_name(experiment_name), experiment_name)


def preflight(*, config_path: str | Path, overrides=(), data_root: str | None = None,
              experiment: str | None = None, tracking_uri: str | None = None,
              max_file_mb: float | None = None, no_commit: bool = False,
              adopt_run_id: str | None = None, start: Path | str = ".",
              check_template: bool = True) -> Plan:
    """Run every check; returns the Plan or raises UserError having changed nothing."""
    # Cheap, local checks first; the tracking store is opened last, since opening a sqlite
    # store that does not exist yet creates it.
    root = git.repo_root(start)
    if not no_commit:
        check_identity(root)
        check_repo_state(root)
        check_model_tags_possible(root)
        check_signing(root)
    code_snapshot.check_tree_holds_code(root)
    config = load_config(config_path, tuple(overrides))
    code_snapshot.check_architecture(
        root, config, source=setting_source("model.architecture", config_path, overrides))
    check_ranks(config)
    check_device(config, source=setting_source("train.device", config_path, overrides))
    uri = tracking.resolve_tracking_uri(tracking_uri, root)
    check_runtime_files_ignored(root, uri)
    data_path = resolve_data_root(root, config, data_root)
    check_data_not_committed(root, data_path)
    check_data(config, data_path)
    if not no_commit:
        check_nothing_unsafe_to_commit(root)
        limit = max_file_mb if max_file_mb is not None else config["experiment"][
            "max_commit_file_mb"]
        check_file_sizes(root, limit)
        if check_template:  # render with placeholders: a broken template fails here, not later
            commit.render_message(root, codename="preflight-check-0", run_id="0" * 32,
                                  experiment_id="0", experiment_name="preflight", config=config,
                                  config_path=str(config_path), overrides=tuple(overrides))
    client = tracking.client(uri)
    if config["train"]["trials"] > 1:  # the study's database must answer before a commit
        from nf1prov.train import search

        search.check_storage(config, root / CACHE_DIR, uri)
    if adopt_run_id:
        git.validate_run_id(adopt_run_id)
        run = client.get_run(adopt_run_id)
        experiment_name = client.get_experiment(run.info.experiment_id).name
    else:
        experiment_name = experiment or config["experiment"]["name"]
        check_store(client, experiment_name)
    return Plan(root=root, config=config, config_path=str(config_path),
                overrides=tuple(overrides), data_root=data_path, tracking_uri=uri,
                client=client, experiment_name=experiment_name, no_commit=no_commit,
                adopt_run_id=adopt_run_id)
