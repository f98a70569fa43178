"""The model commit: stage every change git does not ignore, commit with the message rendered
from ``commit_message.txt.j2`` (DESIGN 3.2), tag ``model/<codename>``.

Stage, commit and tag run under an exclusive file lock (``filelock``: flock on POSIX, msvcrt on
Windows) on a file in the repository's common git directory, so two trainings started at once
(in one repository or in two worktrees of it) never interleave. `ModelCommit` makes commit and
tag one step: everything is prepared aside (a copy of the index, the commit object) and HEAD and
the tag move in one git ref transaction, so a failure (a pre-commit hook refused, a clashing ref)
or an interrupt leaves the work tree, the index and the refs as they were. A journal in the git
directory lets the next training settle a commit whose process was killed between the ref
transaction and the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from nf1prov import git
from nf1prov.errors import UserError
from nf1prov.resources import shipped_dir

TEMPLATE_NAME = "commit_message.txt.j2"
PACKAGE_TEMPLATES = shipped_dir("templates")
LOCK_NAME = "nf1prov-commit.lock"
LOCK_TIMEOUT_S = 300.0
WAIT_NOTICE_S = 1.0  # seconds of waiting for the commit lock before saying so
MODEL_COMMIT_ENV = "NF1PROV_MODEL_COMMIT"  # in the hooks' environment: the model's codename


def subject(codename: str, run_id: str, experiment_id: str) -> str:
    """The contract subject line (DESIGN 3.2)."""
    return f"Model run codename: {codename} Run ID: {run_id} Experiment ID: {experiment_id}"


def template_path(root: Path) -> Path:
    """The repository's templates/commit_message.txt.j2 when present (users may edit it), else
    the copy shipped inside the package."""
    own = Path(root) / "templates" / TEMPLATE_NAME
    return own if own.is_file() else PACKAGE_TEMPLATES / TEMPLATE_NAME


def render_message(root: Path, *, codename: str, run_id: str, experiment_id: str,
                   experiment_name: str, config: dict, config_path: str,
                   overrides: tuple[str, ...] | list[str] = ()) -> str:
    """Render the commit message; raises UserError when the template is broken or its first
    line is not exactly the contract subject."""
    path = template_path(root)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    try:
        template = env.from_string(path.read_text(encoding="utf-8"))
        message = template.render(
            codename=codename, run_id=run_id, experiment_id=experiment_id,
            experiment_name=experiment_name, config=config, config_path=config_path,
            overrides=list(overrides), subject=subject(codename, run_id, experiment_id),
        )
    except jinja2.TemplateError as exc:
        raise UserError(f"Commit message template {path} failed to render: {exc}. Fix the "
                        f"template, or delete it to use nf1prov's default.") from None
    expected = subject(codename, run_id, experiment_id)
    first = message.lstrip("\n").split("\n", 1)[0]
    if first != expected:
        raise UserError(
            f"Commit message template {path} must render the subject line exactly as "
            f"'Model run codename: <codename> Run ID: <run_id> Experiment ID: <experiment_id>' "
            f"(DESIGN 3.2), but its first line is {first!r}. Fix the template's first line."
        )
    return message.lstrip("\n").rstrip() + "\n"


@contextlib.contextmanager
def commit_lock(root: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on <common git dir>/nf1prov-commit.lock (released on exit or death).
    Past `WAIT_NOTICE_S` of waiting, one line on stderr says whose commit we wait for (the
    holder's pid and host, from the ``.owner`` file beside the lock)."""
    from filelock import FileLock, Timeout

    path = git.common_dir(root) / LOCK_NAME
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(path, mode=0o644)
    try:
        try:
            lock.acquire(timeout=min(timeout, WAIT_NOTICE_S), poll_interval=0.05)
        except Timeout:
            if timeout <= WAIT_NOTICE_S:
                raise
            print(f"nf1prov: waiting for another training's model commit ({lock_holder(owner)}"
                  f", lock {path})...", file=sys.stderr, flush=True)
            lock.acquire(timeout=timeout - WAIT_NOTICE_S, poll_interval=0.05)
    except Timeout:
        raise UserError(f"Another nf1prov train held {path} for {timeout:.0f} s ("
                        f"{lock_holder(owner)}). Wait for it to commit, then retry.") from None
    try:
        with contextlib.suppress(OSError):  # only the waiting message needs it
            owner.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink(missing_ok=True)
        lock.release()


def lock_holder(owner: Path) -> str:
    """'pid N on HOST' of the process holding the commit lock, as its ``.owner`` file says."""
    try:
        pid, host = owner.read_text(encoding="utf-8").split()
    except (OSError, ValueError):
        return "its process is unknown"
    return f"pid {pid} on {host}"


@dataclass
class ModelCommit:
    """A model commit made as one transaction, with the journal that lets a later `train`
    finish or undo it if this process dies half-way (SIGKILL, power loss).

    Steps: stage everything into a copy of the index; run the pre-commit, prepare-commit-msg and
    commit-msg hooks as `git commit` would; write the commit object; move HEAD and create
    ``model/<codename>`` in one ref transaction (both or neither); make the staged copy the
    index. Until then the work tree, index and refs are untouched, so a failure or an interrupt
    leaves nothing. `tag_run` then records the commit on the MLflow run, and `finish` drops the
    journal. `undo` takes a commit back (refs, index) when tagging the run failed.
    """

    root: Path
    codename: str
    run_id: str = ""
    tracking_uri: str = ""
    run_tags: dict[str, str] = field(default_factory=dict)  # for the run, once committed
    sha: str | None = None
    parent: str | None = None
    refs_moved: bool = False  # HEAD and the tag point at the commit: `undo` or `finish` it

    @property
    def tag_ref(self) -> str:
        return "refs/tags/" + git.model_tag(self.codename)

    @functools.cached_property
    def index(self) -> Path:
        return git.index_path(self.root)

    @property
    def staged(self) -> Path:
        return self.index.with_name(self.index.name + ".nf1prov-staged")

    @property
    def backup(self) -> Path:
        return self.index.with_name(self.index.name + ".nf1prov-backup")

    def check_refs(self) -> None:
        clashes = git.refs_clashing_with(self.root, self.tag_ref)
        if clashes:
            raise UserError(refs_clash_message(self.root, self.tag_ref, clashes))

    def commit(self, message: str) -> str:
        """Stage, run the hooks, commit and tag; returns the SHA. Raises GitError (a hook
        refused) or UserError having changed nothing, unless ``refs_moved`` is set: then the
        caller must `undo` (or `finish`)."""
        self.check_refs()
        self.parent = git.head_sha(self.root)
        # Hooks see the staged copy of the index, and know a model commit is being made
        # (`catalog --check` as a pre-commit hook lets it through: it cannot list itself).
        env = {"GIT_INDEX_FILE": str(self.staged), MODEL_COMMIT_ENV: self.codename}
        try:
            if self.index.exists():
                shutil.copy2(self.index, self.staged)
                shutil.copy2(self.index, self.backup)
            git.stage_all(self.root, env=env)
            message = self.run_hooks(message, env)
            tree = git.write_tree(self.root, env)
            self.sha = git.commit_tree(self.root, tree, self.parent, message,
                                       sign=git.config_bool(self.root, "commit.gpgSign"))
            write_journal(self.root, self.journal_data())
            git.update_refs(self.root, [("HEAD", self.sha, self.parent or git.ZERO_SHA),
                                        (self.tag_ref, self.sha, git.ZERO_SHA)],
                            reason=f"commit: {message.splitlines()[0]}")
        except BaseException:
            if self.sha and git.tag_sha(self.root, git.model_tag(self.codename)) == self.sha:
                self.refs_moved = True  # git was done when the exception came: `undo` it
            else:
                self.staged.unlink(missing_ok=True)
                self.backup.unlink(missing_ok=True)
                journal_path(self.root).unlink(missing_ok=True)
            raise
        self.refs_moved = True
        if self.staged.exists():
            os.replace(self.staged, self.index)
        with contextlib.suppress(git.GitError):  # as with `git commit`: too late to refuse
            git.run_hook(self.root, "post-commit")
        return self.sha

    def run_hooks(self, message: str, env: dict[str, str]) -> str:
        """pre-commit, prepare-commit-msg and commit-msg, with the message in COMMIT_EDITMSG;
        returns the message as the hooks left it (its subject must still be the contract)."""
        git.run_hook(self.root, "pre-commit", env=env)
        git.stage_all(self.root, env=env)  # what a formatter hook changed and staged
        path = git.git_path(self.root, "COMMIT_EDITMSG")
        path.write_text(message, encoding="utf-8")
        git.run_hook(self.root, "prepare-commit-msg", str(path), "message", env=env)
        git.run_hook(self.root, "commit-msg", str(path), env=env)
        edited = path.read_text(encoding="utf-8")
        expected, first = message.split("\n", 1)[0], edited.lstrip("\n").split("\n", 1)[0]
        if first != expected:
            raise UserError(f"A commit-msg or prepare-commit-msg hook of {self.root} changed "
                            f"the model commit's subject to {first!r}; it must stay {expected!r} "
                            "(DESIGN 3.2). Let the hook leave lines starting with 'Model run "
                            "codename:' alone.")
        return edited.lstrip("\n")

    def journal_data(self) -> dict:
        return {"root": str(self.root), "codename": self.codename, "sha": self.sha,
                "parent": self.parent, "run_id": self.run_id,
                "tracking_uri": self.tracking_uri, "run_tags": self.run_tags}

    def undo(self) -> None:
        """Take the commit back: HEAD to its parent, no tag, the index as it was before."""
        git.update_refs(self.root, [("HEAD", self.parent or git.ZERO_SHA, self.sha),
                                    (self.tag_ref, git.ZERO_SHA, self.sha)],
                        reason=f"nf1prov: undo model commit {self.codename}")
        self.refs_moved = False
        if self.backup.exists():
            os.replace(self.backup, self.index)
        else:
            self.index.unlink(missing_ok=True)
        self.staged.unlink(missing_ok=True)
        self.finish()

    def finish(self) -> None:
        """Drop the journal and the index backup: the commit is settled."""
        with contextlib.suppress(OSError):
            self.backup.unlink(missing_ok=True)
            journal_path(self.root).unlink(missing_ok=True)


def refs_clash_message(root: Path, ref: str, clashes: list[str]) -> str:
    shown = ", ".join(clashes[:5])
    first = clashes[0].removeprefix("refs/tags/")
    return (f"The model tag {ref.removeprefix('refs/tags/')} cannot be created in {root}: "
            f"the existing ref(s) {shown} clash with it (git cannot hold a ref and refs "
            f"beneath it of the same name). Rename it, e.g. `git tag {first}-old {first} && "
            f"git tag -d {first}` for a tag, then train again.")


def commit_and_tag(root: Path, message: str, codename: str) -> str:
    """Stage all, commit (even with nothing changed), tag ``model/<codename>``; returns the SHA.

    Must be called under `commit_lock`. Either all of it happens or nothing does."""
    transaction = ModelCommit(root, codename)
    sha = transaction.commit(message)
    transaction.finish()
    return sha


# --- the journal: finishing what a killed training left half-done ------------------------------

JOURNAL_NAME = "nf1prov-commit.journal"


def journal_path(root: Path) -> Path:
    return git.common_dir(root) / JOURNAL_NAME


def write_journal(root: Path, data: dict) -> None:
    path = journal_path(root)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def read_journal(root: Path) -> dict | None:
    try:
        return json.loads(journal_path(root).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:  # torn write: the refs were never moved (the journal comes first)
        journal_path(root).unlink(missing_ok=True)
        return None


def recover(root: Path) -> ModelCommit | None:
    """Settle the model commit a killed training left half-done (its journal), under the commit
    lock. Returns the commit when its refs had moved, so the caller still owes its run the
    tags (``run_tags`` plus the SHA) and must then call `finish`; None when there was nothing
    or the refs never moved (then nothing was committed, and the leftovers are removed)."""
    data = read_journal(root)
    if data is None:
        return None
    transaction = ModelCommit(Path(data["root"]), data["codename"], data["run_id"],
                              data["tracking_uri"], data["run_tags"], data["sha"],
                              data["parent"])
    if not transaction.root.is_dir():  # its worktree is gone: only the refs remain to check
        transaction.root = Path(root)
    committed = git.tag_sha(root, git.model_tag(transaction.codename)) == transaction.sha
    index_moved = git.head_sha(transaction.root) == transaction.sha
    if committed and index_moved and transaction.staged.exists():
        os.replace(transaction.staged, transaction.index)
    transaction.staged.unlink(missing_ok=True)
    if committed:
        return transaction
    transaction.finish()
    return None
