"""A thin wrapper over the git CLI.

Every value that reaches git from outside (codenames, run IDs, refs, paths) is validated here
first: nothing that starts with ``-`` is ever passed as an argument, so user text can never turn
into a git option such as ``--upload-pack``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from nf1prov.errors import UserError

CODENAME_RE = re.compile(r"^[a-z]+-[a-z]+-[0-9]+$")
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SHA_RE = re.compile(r"^[0-9a-f]{4,40}$")
MODEL_TAG_PREFIX = "model/"

# How long to keep retrying when another process holds .git/index.lock (two trainings committing
# at the same moment).
INDEX_LOCK_RETRY_S = 10.0


class GitError(UserError):
    """git refused or failed; the message carries git's own stderr."""


def validate_codename(codename: str) -> str:
    if not isinstance(codename, str) or not CODENAME_RE.match(codename):
        raise UserError(
            f"{codename!r} is not a model codename: codenames look like 'fearless-eel-256' "
            "(lowercase words joined by '-', ending in a number). Check the spelling, or run "
            "`nf1prov list` to see the known models."
        )
    return codename


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise UserError(
            f"{run_id!r} is not an MLflow run ID: a run ID is 32 lowercase hex digits. "
            "Copy it from `nf1prov list --format csv` or the MLflow UI."
        )
    return run_id


def validate_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise UserError(f"{sha!r} is not a git commit SHA (4 to 40 lowercase hex digits).")
    return sha


def model_tag(codename: str) -> str:
    """The git tag that marks a model commit: ``model/<codename>``."""
    return MODEL_TAG_PREFIX + validate_codename(codename)


def git(*args: str, cwd: Path | str, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``git <args>`` in ``cwd`` and return the completed process (text mode).

    Raises GitError with git's stderr when ``check`` and git exits non-zero.
    """
    # GIT_OPTIONAL_LOCKS=0: read-only commands such as status never rewrite the index.
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
    if env:
        full_env.update(env)
    proc = subprocess.run(
        ["git", *map(str, args)], cwd=str(cwd), capture_output=True, text=True,
        input=input, env=full_env,
    )
    if check and proc.returncode != 0:
        output = proc.stderr.strip() or proc.stdout.strip()
        raise GitError(f"git {' '.join(args[:2])} failed in {cwd}: {output}")
    return proc


def repo_root(path: Path | str = ".") -> Path:
    """The top of the git work tree holding ``path`` (from subdirectories and worktrees too)."""
    proc = git("rev-parse", "--show-toplevel", cwd=path, check=False)
    if proc.returncode != 0:
        raise UserError(
            f"{Path(path).resolve()} is not inside a git work tree. nf1prov records every model "
            "as a git commit: run it inside your project's repository (or `git init` one first)."
        )
    return Path(proc.stdout.strip())


def git_dir(root: Path) -> Path:
    """The git directory of this work tree (differs from root/.git in a linked worktree)."""
    out = git("rev-parse", "--absolute-git-dir", cwd=root).stdout.strip()
    return Path(out)


def head_sha(root: Path) -> str | None:
    """Full SHA of HEAD, or None in a repository with no commits yet."""
    proc = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}", cwd=root, check=False)
    return proc.stdout.strip() or None


def current_branch(root: Path) -> str | None:
    """Branch name, or None on a detached HEAD. Works before the first commit."""
    proc = git("symbolic-ref", "--quiet", "--short", "HEAD", cwd=root, check=False)
    return proc.stdout.strip() or None


def remote_url(root: Path, name: str = "origin") -> str | None:
    proc = git("remote", "get-url", name, cwd=root, check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def identity(root: Path) -> tuple[str, str] | None:
    """(name, email) git would commit with, or None when no identity is configured."""
    proc = git("var", "GIT_COMMITTER_IDENT", cwd=root, check=False)
    if proc.returncode != 0:
        return None
    match = re.match(r"^(.*) <(.*)> \d+ [+-]\d{4}$", proc.stdout.strip())
    return (match.group(1), match.group(2)) if match else None


def status_porcelain(root: Path) -> list[tuple[str, str]]:
    """[(two-letter status, path)] for every change git does not ignore, paths relative to root."""
    out = git("status", "--porcelain=v1", "-z", "--untracked-files=all", cwd=root).stdout
    entries: list[tuple[str, str]] = []
    fields = out.split("\0")
    i = 0
    while i < len(fields):
        field = fields[i]
        if not field:
            i += 1
            continue
        code, path = field[:2], field[3:]
        entries.append((code, path))
        # Renames and copies carry the original path in the next field.
        i += 2 if code[0] in "RC" else 1
    return entries


def is_dirty(root: Path) -> bool:
    return bool(status_porcelain(root))


def files_to_commit(root: Path) -> list[Path]:
    """Files `stage_all` would add or modify (not deletions), as absolute paths."""
    paths = []
    for code, path in status_porcelain(root):
        if "D" in code:
            continue
        candidate = root / path
        if candidate.is_file():
            paths.append(candidate)
    return paths


def stage_all(root: Path) -> None:
    """Stage every change git does not ignore (new, modified and deleted files)."""
    _with_index_lock_retry(root, "add", "--all", "--", ".")


def commit(root: Path, message: str) -> str:
    """Commit the index (allowing an empty commit) with ``message``; returns the new full SHA.

    Hooks run as usual: a failing pre-commit hook raises GitError with the hook's output.
    """
    _with_index_lock_retry(root, "commit", "--allow-empty", "--quiet", "--file", "-", input=message)
    sha = head_sha(root)
    assert sha is not None
    return sha


def commit_paths(root: Path, paths: list[str], message: str) -> str | None:
    """Commit ``paths`` alone (``git commit --only -- paths``); other staged changes stay staged.

    Untracked paths are added first. Returns the new SHA, or None when the paths have no change.
    """
    if not paths or any(str(p).startswith("-") for p in paths):
        raise UserError(f"refusing to commit paths {paths!r}: none given, or one starts with '-'.")
    if not git("status", "--porcelain=v1", "--", *paths, cwd=root).stdout.strip():
        return None
    _with_index_lock_retry(root, "add", "--", *paths)
    _with_index_lock_retry(root, "commit", "--quiet", "--only", "--file", "-", "--", *paths,
                           input=message)
    return head_sha(root)


def create_tag(root: Path, name: str, sha: str) -> None:
    """Lightweight tag ``name`` at ``sha`` (refuses to move an existing tag)."""
    if name.startswith("-"):
        raise UserError(f"refusing git tag name {name!r}: it starts with '-'.")
    git("tag", name, validate_sha(sha), cwd=root)


def delete_tag(root: Path, name: str) -> None:
    git("tag", "--delete", "--", name, cwd=root, check=False)


def tag_sha(root: Path, name: str) -> str | None:
    """The commit a tag points at, or None."""
    if name.startswith("-"):
        return None
    proc = git("rev-parse", "--verify", "--quiet", f"refs/tags/{name}^{{commit}}", cwd=root,
               check=False)
    return proc.stdout.strip() or None


def commit_exists(root: Path, sha: str) -> bool:
    proc = git("cat-file", "-e", f"{validate_sha(sha)}^{{commit}}", cwd=root, check=False)
    return proc.returncode == 0


def diff_head(root: Path) -> str:
    """The uncommitted diff against HEAD (tracked files), for --no-commit runs on a dirty tree."""
    if head_sha(root) is None:
        return ""
    return git("diff", "HEAD", "--", cwd=root).stdout


def changed_files(root: Path, old_sha: str, new_sha: str) -> list[str]:
    """Paths changed between two commits (``git diff --name-status``), as 'M\tpath' lines."""
    out = git("diff", "--name-status", validate_sha(old_sha), validate_sha(new_sha), "--",
              cwd=root).stdout
    return [line for line in out.splitlines() if line]


def log_subjects(root: Path, all_refs: bool = True) -> list[tuple[str, str, int]]:
    """[(sha, subject, committer unix time)] of every commit reachable from all refs (or HEAD)."""
    if head_sha(root) is None:
        return []
    args = ["log", "--format=%H%x00%s%x00%ct"]
    args.append("--all" if all_refs else "HEAD")
    out = git(*args, cwd=root).stdout
    rows = []
    for line in out.splitlines():
        sha, subject, ctime = line.split("\0")
        rows.append((sha, subject, int(ctime)))
    return rows


def branches_containing(root: Path, sha: str) -> list[str]:
    out = git("branch", "--all", "--format=%(refname:short)", "--contains", validate_sha(sha),
              cwd=root, check=False).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def checkout_detached(root: Path, sha: str) -> None:
    git("checkout", "--quiet", "--detach", validate_sha(sha), cwd=root)


def add_worktree(root: Path, path: Path, sha: str) -> None:
    path = Path(path).resolve()
    git("worktree", "add", "--detach", str(path), validate_sha(sha), cwd=root)


def remove_worktree(root: Path, path: Path) -> None:
    """Remove the worktree and its files; prune the bookkeeping of one already gone."""
    git("worktree", "remove", "--force", str(Path(path).resolve()), cwd=root, check=False)
    git("worktree", "prune", cwd=root, check=False)


def _with_index_lock_retry(root: Path, *args: str, input: str | None = None) -> None:
    deadline = time.monotonic() + INDEX_LOCK_RETRY_S
    delay = 0.05
    while True:
        proc = git(*args, cwd=root, check=False, input=input)
        if proc.returncode == 0:
            return
        message = (proc.stderr + proc.stdout).strip()
        if "index.lock" in message and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        raise GitError(f"git {args[0]} failed in {root}: {message}")


# --- additions for the `train` flow (provenance) --------------------------------------------


def common_dir(root: Path) -> Path:
    """The git directory shared by every worktree of the repository (refs, tags, objects)."""
    out = git("rev-parse", "--git-common-dir", cwd=root).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else (Path(root) / path).resolve()


def index_path(root: Path) -> Path:
    """This work tree's index file (per worktree; may not exist before the first `git add`)."""
    out = git("rev-parse", "--git-path", "index", cwd=root).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else (Path(root) / path).resolve()


def is_ignored(root: Path, path: Path | str, directory: bool = False) -> bool:
    """True when git ignores ``path`` (which need not exist; ``directory``: match it as a
    folder, so that patterns like ``cache/`` apply). Paths outside the work tree: False."""
    path = Path(path)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            return False
    text = path.as_posix()
    if text in ("", ".") or text.startswith("-"):
        return False
    if directory:
        text += "/"
    return git("check-ignore", "--quiet", "--no-index", "--", text, cwd=root,
               check=False).returncode == 0


def unmerged_paths(root: Path) -> list[str]:
    """Paths with unresolved merge conflicts (a commit would fail on them)."""
    return [path for code, path in status_porcelain(root)
            if code in ("DD", "AU", "UD", "UA", "DU", "AA", "UU")]


def paths_differing_from(root: Path, sha: str) -> list[str]:
    """Work-tree paths (tracked, or untracked and not ignored) whose content differs from commit
    ``sha``: what committing now would change compared with that commit."""
    validate_sha(sha)
    changed = set(git("diff", "--name-only", "-z", sha, "--", cwd=root).stdout.split("\0"))
    others = git("ls-files", "--others", "--exclude-standard", "-z", cwd=root).stdout.split("\0")
    changed.update(others)
    changed.discard("")
    return sorted(changed)


def tags_with_prefix(root: Path, prefix: str = MODEL_TAG_PREFIX) -> dict[str, str]:
    """{tag name: commit SHA} of every tag starting with ``prefix`` (default ``model/``)."""
    if prefix.startswith("-"):
        raise UserError(f"refusing git tag prefix {prefix!r}: it starts with '-'.")
    out = git("for-each-ref", "--format=%(refname:short)%00%(objectname)%00%(*objectname)",
              f"refs/tags/{prefix}", cwd=root).stdout
    tags = {}
    for line in out.splitlines():
        name, obj, peeled = line.split("\0")
        tags[name] = peeled or obj
    return tags
