"""The model commit: stage every change git does not ignore, commit with the message rendered
from ``commit_message.txt.j2`` (DESIGN 3.2), tag ``model/<codename>``.

Stage, commit and tag run under an exclusive ``fcntl.flock`` on a file in the repository's
common git directory, so two trainings started at once (in one repository or in two worktrees
of it) never interleave. On failure (a pre-commit hook refused, the index stayed locked) the
index is put back as it was, so the user's staging area is untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import jinja2

from nf1prov.errors import UserError
from nf1prov.provenance import git
from nf1prov.resources import shipped_dir

TEMPLATE_NAME = "commit_message.txt.j2"
PACKAGE_TEMPLATES = shipped_dir("templates")
LOCK_NAME = "nf1prov-commit.lock"
LOCK_TIMEOUT_S = 300.0


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
    """Exclusive lock on <common git dir>/nf1prov-commit.lock (released on exit or death)."""
    path = git.common_dir(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"Another nf1prov train held {path} for {timeout:.0f} s. "
                                    "Wait for it to commit, then retry.") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def commit_and_tag(root: Path, message: str, codename: str) -> str:
    """Stage all, commit (even with nothing changed), tag ``model/<codename>``; returns the SHA.

    Must be called under `commit_lock`. If staging or committing fails, the index is restored
    and GitError raised; nothing is committed.
    """
    tag = git.model_tag(codename)
    index = git.index_path(root)
    backup = index.with_name(index.name + ".nf1prov-backup")
    had_index = index.exists()
    if had_index:
        shutil.copy2(index, backup)
    try:
        git.stage_all(root)
        sha = git.commit(root, message)
    except BaseException:
        if had_index:
            os.replace(backup, index)
        else:
            index.unlink(missing_ok=True)
        raise
    backup.unlink(missing_ok=True)
    git.create_tag(root, tag, sha)
    return sha
