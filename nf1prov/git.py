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
# Object names: 40 hex digits (SHA-1), or 64 in a `git init --object-format=sha256` repository;
# abbreviated ones have at least 4.
SHA_RE = re.compile(r"^[0-9a-f]{4,64}$")
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
        raise UserError(f"{sha!r} is not a git commit SHA (4 to 64 lowercase hex digits: 40 "
                        "for SHA-1, 64 for SHA-256 repositories).")
    return sha


def model_tag(codename: str) -> str:
    """The git tag that marks a model commit: ``model/<codename>``."""
    return MODEL_TAG_PREFIX + validate_codename(codename)


def git(*args: str, cwd: Path | str, check: bool = True, input: str | bytes | None = None,
        env: dict[str, str] | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """Run ``git <args>`` in ``cwd`` and return the completed process (text mode, or bytes in
    and out with ``text=False``: text mode turns CRLF into LF).

    Raises GitError with git's stderr when ``check`` and git exits non-zero.
    """
    # GIT_OPTIONAL_LOCKS=0: read-only commands such as status never rewrite the index.
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"}
    if env:
        full_env.update(env)
    proc = subprocess.run(
        ["git", *map(str, args)], cwd=str(cwd), capture_output=True, text=text,
        input=input, env=full_env,
    )
    if proc.returncode != 0:
        stderr, stdout = (proc.stderr, proc.stdout) if text else (
            proc.stderr.decode("utf-8", "replace"), proc.stdout.decode("utf-8", "replace"))
        refuse_dubious_ownership(stderr)  # whether checked or not: no git command would work
        if check:
            output = stderr.strip() or stdout.strip()
            raise GitError(f"git {' '.join(args[:2])} failed in {cwd}: {output}")
    return proc


DUBIOUS_OWNERSHIP_RE = re.compile(r"detected dubious ownership in repository at '(?P<path>.*)'")
SAFE_DIRECTORY_RE = re.compile(r"^\s*(?P<command>git config --global --add safe\.directory .+)$",
                               re.MULTILINE)


def refuse_dubious_ownership(stderr: str) -> None:
    """Raise GitError when git refused a repository owned by another user (its safe.directory
    check), naming the repository and git's own fix; otherwise return."""
    match = DUBIOUS_OWNERSHIP_RE.search(stderr)
    if not match:
        return
    path = match["path"]
    fix = SAFE_DIRECTORY_RE.search(stderr)
    command = fix["command"].strip() if fix else f"git config --global --add safe.directory {path}"
    raise GitError(
        f"The git repository at {path} is owned by another user, so git refuses to work in it "
        "(git's safe.directory check against repositories planted by someone else). If you "
        f"trust it, mark it safe with git's own fix: `{command}`, then retry; or work in a "
        "clone of your own.")


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


def remotes(root: Path) -> list[str]:
    """The repository's remote names, in git's order."""
    return git("remote", cwd=root).stdout.split()


def push_remote(root: Path, name: str | None = None) -> str:
    """The remote ``--push`` sends model tags to: ``name`` when given (it must exist), else
    the current branch's upstream remote, else ``origin``, else the only remote. Raises
    UserError naming the remotes there are when none fits."""
    names = remotes(root)
    if name is not None:
        if name not in names:
            raise UserError(f"No git remote {name!r} in {root} (remotes: "
                            f"{', '.join(names) or 'none'}). Add it with `git remote add {name} "
                            "URL`, or pass --remote with one of those.")
        return name
    branch = current_branch(root)
    if branch:
        upstream = git("config", f"branch.{branch}.remote", cwd=root, check=False).stdout.strip()
        if upstream in names:
            return upstream
    if "origin" in names:
        return "origin"
    if len(names) == 1:
        return names[0]
    raise UserError(f"--push needs a git remote to send the model's tag to, and {root} has "
                    + (f"several ({', '.join(names)}): pass --remote NAME." if names else
                       "none: add one with `git remote add origin URL`."))


def push_model_tag(root: Path, remote: str, codename: str) -> None:
    """Push ``model/<codename>`` (and so its commit) to ``remote``; GitError on failure, with
    every line git printed (a pre-push hook's stdout too, which `git` alone would drop)."""
    ref = f"refs/tags/{model_tag(codename)}"
    proc = git("push", "--quiet", remote, f"{ref}:{ref}", cwd=root, check=False)
    if proc.returncode != 0:
        said = [text.strip() for text in (proc.stdout, proc.stderr) if text.strip()]
        output = "\n".join(said) or f"exit {proc.returncode}"
        raise GitError(f"git push {remote} failed in {root}:\n{output}")


def fetch_model_tag(root: Path, codename: str) -> str | None:
    """Fetch ``model/<codename>`` (and its commit) from the first remote that has it; the
    commit's SHA, or None when no remote has it (or none answers)."""
    ref = f"refs/tags/{model_tag(codename)}"
    for remote in remotes(root):
        proc = git("fetch", "--quiet", "--no-tags", remote, f"{ref}:{ref}", cwd=root,
                   check=False)
        if proc.returncode == 0:
            return tag_sha(root, model_tag(codename))
    return None


def remote_model_tags(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({remote: model tag names it holds}, [remotes that did not answer]), one
    ``git ls-remote`` per remote."""
    found: dict[str, set[str]] = {}
    failed: list[str] = []
    for remote in remotes(root):
        proc = git("ls-remote", "--tags", "--refs", remote, f"refs/tags/{MODEL_TAG_PREFIX}*",
                   cwd=root, check=False)
        if proc.returncode != 0:
            failed.append(remote)
            continue
        found[remote] = {line.split("refs/tags/", 1)[1] for line in proc.stdout.splitlines()
                         if "refs/tags/" in line}
    return found, failed


def identity(root: Path, author: bool = False) -> tuple[str, str] | None:
    """(name, email) git would commit with (``author``: write as the author, which
    GIT_AUTHOR_NAME/EMAIL may set apart from the committer), or None when no identity is
    configured."""
    proc = git("var", "GIT_AUTHOR_IDENT" if author else "GIT_COMMITTER_IDENT", cwd=root,
               check=False)
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


def paths_under(root: Path, rel: str) -> list[str]:
    """Files under folder ``rel`` that are tracked or would be committed (not ignored)."""
    if rel.startswith("-"):
        raise UserError(f"refusing path {rel!r}: it starts with '-'.")
    out = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", rel,
              cwd=root).stdout
    return [path for path in out.split("\0") if path]


def ignored_files(root: Path, rels: list[str]) -> list[str]:
    """Untracked files under ``rels`` that git ignores."""
    if any(rel.startswith("-") for rel in rels):
        raise UserError(f"refusing paths {rels!r}: one starts with '-'.")
    out = git("ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--", *rels,
              cwd=root).stdout
    return [path for path in out.split("\0") if path]


def ignore_rule(root: Path, rel: str) -> str:
    """'<file>:<line>: <pattern>' of the rule that ignores ``rel`` (git check-ignore -v)."""
    proc = git("check-ignore", "-v", "--no-index", "--", rel, cwd=root, check=False)
    source, _, _ = proc.stdout.partition("\t")
    return f"'{source}'" if source else "an ignore rule"


def tracked_paths_under(root: Path, rel: str) -> list[str]:
    if rel.startswith("-"):
        raise UserError(f"refusing path {rel!r}: it starts with '-'.")
    out = git("ls-files", "-z", "--cached", "--", rel, cwd=root).stdout
    return [path for path in out.split("\0") if path]


def stage_all(root: Path, env: dict[str, str] | None = None) -> None:
    """Stage every change git does not ignore (new, modified and deleted files); ``env`` may
    name another index file (GIT_INDEX_FILE)."""
    _with_index_lock_retry(root, "add", "--all", "--", ".", env=env)


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


def checkout_detached(root: Path, sha: str) -> None:
    git("checkout", "--quiet", "--detach", validate_sha(sha), cwd=root)


def add_worktree(root: Path, path: Path, sha: str) -> None:
    path = Path(path).resolve()
    git("worktree", "add", "--detach", str(path), validate_sha(sha), cwd=root)


def remove_worktree(root: Path, path: Path) -> None:
    """Remove the worktree and its files; prune the bookkeeping of one already gone."""
    git("worktree", "remove", "--force", str(Path(path).resolve()), cwd=root, check=False)
    git("worktree", "prune", cwd=root, check=False)


def _with_index_lock_retry(root: Path, *args: str, input: str | None = None,
                           env: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + INDEX_LOCK_RETRY_S
    delay = 0.05
    while True:
        proc = git(*args, cwd=root, check=False, input=input, env=env)
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
    return git_path(root, "index")


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


def git_path(root: Path, name: str) -> Path:
    """``git rev-parse --git-path name`` as an absolute path (per worktree where git says so)."""
    out = git("rev-parse", "--git-path", name, cwd=root).stdout.strip()
    path = Path(out)
    return path if path.is_absolute() else (Path(root) / path).resolve()


# --- the model commit as one transaction (provenance.commit) -----------------------------------

# "No such ref" for update_refs; it stands for the repository's own null object name, as
# long as its object names (40 zeros, or 64 in a SHA-256 repository).
ZERO_SHA = "0" * 40

# Operations that leave git waiting for the user; a model commit in their middle would conclude
# or swallow them. (file or folder under the git dir, what it is, how to finish it)
OPERATIONS = (
    ("MERGE_HEAD", "a merge", "git merge --continue (or --abort)"),
    ("rebase-merge", "a rebase", "git rebase --continue (or --abort)"),
    ("rebase-apply", "a rebase or git am", "git rebase --continue / git am --continue "
                                           "(or --abort)"),
    ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --continue (or --abort)"),
    ("REVERT_HEAD", "a revert", "git revert --continue (or --abort)"),
    ("sequencer", "a cherry-pick or revert sequence", "git cherry-pick --continue / "
                                                      "git revert --continue (or --quit)"),
    ("BISECT_LOG", "a bisect", "git bisect reset"),
)



def operation_in_progress(root: Path) -> tuple[str, str] | None:
    """(what, how to finish it) of a merge, rebase, cherry-pick, revert or bisect in progress."""
    for name, what, finish in OPERATIONS:
        if git_path(root, name).exists():
            return what, finish
    return None


def refs_clashing_with(root: Path, ref: str) -> list[str]:
    """Existing refs that make ``ref`` impossible to create: one of its parent paths is a ref
    (a tag ``model`` blocks ``refs/tags/model/x``), or refs already live beneath it."""
    parts = ref.split("/")
    parents = ["/".join(parts[:i]) for i in range(2, len(parts))]
    clashes = []
    for parent in parents:
        proc = git("show-ref", "--verify", "--quiet", parent, cwd=root, check=False)
        if proc.returncode == 0:
            clashes.append(parent)
    below = git("for-each-ref", "--format=%(refname)", f"{ref}/", cwd=root).stdout.split()
    return clashes + below


def tree_paths(root: Path, sha: str, paths: list[str]) -> list[str]:
    """Those of ``paths`` (top-level names) that exist in commit ``sha``'s tree."""
    out = git("ls-tree", "--name-only", validate_sha(sha), "--", *paths, cwd=root).stdout
    return [line for line in out.splitlines() if line]


def file_in_tree(root: Path, sha: str, path: str) -> bool:
    if path.startswith("-"):
        return False
    proc = git("cat-file", "-e", f"{validate_sha(sha)}:{path}", cwd=root, check=False)
    return proc.returncode == 0


def extract_tree(root: Path, sha: str, paths: list[str], destination: Path) -> None:
    """Write the files ``paths`` (folders included) hold at commit ``sha`` into ``destination``:
    the commit's own bytes, whatever the work tree holds now."""
    import io
    import tarfile

    present = tree_paths(root, sha, paths)
    if not present:
        return
    archive = subprocess.run(["git", "archive", "--format=tar", validate_sha(sha), "--",
                              *present], cwd=str(root), capture_output=True, check=False)
    if archive.returncode != 0:
        raise GitError(f"git archive failed in {root}: {archive.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")


def embedded_repositories(root: Path) -> list[str]:
    """Untracked folders that are git repositories or worktrees of their own: `git add` would
    record them as a gitlink (a bare commit pointer), not their files."""
    out = git("status", "--porcelain=v1", "-z", "--untracked-files=normal", cwd=root).stdout
    found = []
    for field in out.split("\0"):
        if field.startswith("?? ") and field.endswith("/"):
            if (Path(root) / field[3:] / ".git").exists():
                found.append(field[3:].rstrip("/"))
    return found


def dirty_submodules(root: Path) -> list[tuple[str, list[str]]]:
    """[(path, what)] for each submodule whose work tree differs from its own checked-out
    commit: 'modified files' and/or 'untracked files' (`git status --porcelain=v2`, whatever
    the submodule's `ignore` setting). A submodule merely at another commit is not listed."""
    out = git("status", "--porcelain=v2", "-z", "--ignore-submodules=none",
              "--untracked-files=normal", cwd=root).stdout
    fields = out.split("\0")
    found = []
    i = 0
    while i < len(fields):
        field = fields[i]
        i += 1
        kind = field[:2]
        if kind not in ("1 ", "2 "):
            continue
        parts = field.split(" ", 8 if kind == "1 " else 9)
        if kind == "2 ":
            i += 1  # a rename's original path follows in the next field
        state, path = parts[2], parts[-1]
        if state.startswith("S"):
            what = [name for flag, name in ((state[2], "modified files"),
                                            (state[3], "untracked files")) if flag != "."]
            if what:
                found.append((path, what))
    return found


def head_blobs(root: Path, paths: list[str]) -> dict[str, bytes]:
    """{path: its content in HEAD} for those of ``paths`` that HEAD holds as a file, read in
    one `git cat-file --batch`."""
    asked = [p for p in paths if "\n" not in p]
    if not asked or head_sha(root) is None:
        return {}
    out = _git_bytes(root, "cat-file", "--batch",
                     input="".join(f"HEAD:{p}\n" for p in asked).encode())
    blobs, offset = {}, 0
    for path in asked:
        end = out.index(b"\n", offset)
        header = out[offset:end].split()
        offset = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            blobs[path] = out[offset:offset + size]
            offset += size + 1  # the content, then a newline
    return blobs


def run_hook(root: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Run the repository's ``name`` hook as `git commit` would (core.hooksPath respected);
    raises GitError with its output when it fails. A missing hook is fine."""
    proc = git("hook", "run", "--ignore-missing", name, "--", *args, cwd=root, check=False,
               env=env)
    if proc.returncode != 0:
        output = (proc.stderr + proc.stdout).strip() or f"exit {proc.returncode}"
        raise GitError(f"the {name} hook refused the model commit in {root}: {output}")


def config_bool(root: Path, key: str) -> bool:
    proc = git("config", "--type=bool", "--get", key, cwd=root, check=False)
    return proc.stdout.strip() == "true"


def write_tree(root: Path, env: dict[str, str]) -> str:
    return git("write-tree", cwd=root, env=env).stdout.strip()


def commit_tree(root: Path, tree: str, parent: str | None, message: str,
                sign: bool = False) -> str:
    """A commit object for ``tree`` (no ref moves); returns its SHA."""
    args = ["commit-tree", validate_sha(tree)]
    if parent:
        args += ["-p", validate_sha(parent)]
    if sign:
        args.append("-S")
    return git(*args, cwd=root, input=message).stdout.strip()


def update_refs(root: Path, updates: list[tuple[str, str, str]], reason: str) -> None:
    """Move every ref in ``updates`` [(ref, new SHA, expected old SHA)] in one transaction:
    all of them or none (ZERO_SHA as new deletes, as old means "must not exist yet")."""
    zero = null_sha(root)

    def oid(sha: str) -> str:
        return zero if sha == ZERO_SHA else validate_sha(sha)

    lines = []
    for ref, new, old in updates:
        if ref.startswith("-") or any(c.isspace() for c in ref):
            raise UserError(f"refusing git ref {ref!r}.")
        lines.append(f"update {ref} {oid(new)} {oid(old)}")
    git("update-ref", "-m", reason, "--stdin", cwd=root, input="\n".join(lines) + "\n")


def object_format(root: Path) -> str:
    """The repository's object hash: ``sha1`` or ``sha256``."""
    proc = git("rev-parse", "--show-object-format", cwd=root, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "sha1"


def null_sha(root: Path) -> str:
    """The all-zero object name git uses for "no object" in this repository."""
    return "0" * (64 if object_format(root) == "sha256" else 40)


def symbolic_head(root: Path) -> str | None:
    """The branch ref HEAD points at (``refs/heads/main``), or None on a detached HEAD."""
    proc = git("symbolic-ref", "--quiet", "HEAD", cwd=root, check=False)
    return proc.stdout.strip() or None


# --- catalogue helpers ---
# Bytes in and out (git() is text mode, which turns CRLF into LF), one blob at a time: the
# catalogue commits README.md's catalogue block alone, through a temporary index.


def _git_bytes(root: Path, *args: str, input: bytes | None = None,
               env: dict[str, str] | None = None) -> bytes:
    """``git <args>`` in ``root`` with bytes in and out; GitError with git's stderr on failure."""
    return git(*args, cwd=root, input=input, env=env, text=False).stdout


def _repo_path(path: str) -> str:
    """``path`` checked as a path relative to the work tree root (posix form, no options)."""
    if (not path or path.startswith(("-", "/")) or any(c in path for c in "\0\n\r")
            or ".." in path.split("/")):
        raise UserError(f"refusing repository path {path!r}: not a plain path inside the "
                        "work tree.")
    return path


def blob_in_head(root: Path, path: str) -> tuple[str, str] | None:
    """(mode, blob SHA) of ``path`` in HEAD's tree; None without HEAD or without that file."""
    if head_sha(root) is None:
        return None
    out = _git_bytes(root, "--literal-pathspecs", "ls-tree", "-z", "HEAD", "--",
                     _repo_path(path)).decode()
    for entry in out.split("\0"):
        meta, _, name = entry.partition("\t")
        parts = meta.split()
        if name == path and len(parts) == 3 and parts[1] == "blob":
            return parts[0], parts[2]
    return None


def blob_in_index(root: Path, path: str) -> tuple[str, str] | None:
    """(mode, blob SHA) of ``path`` staged in the index (stage 0); None when not in the index.

    A path with merge conflicts is a UserError: it has no single staged version.
    """
    out = _git_bytes(root, "--literal-pathspecs", "ls-files", "--stage", "-z", "--",
                     _repo_path(path)).decode()
    found = {}
    for entry in out.split("\0"):
        meta, _, name = entry.partition("\t")
        parts = meta.split()
        if name == path and len(parts) == 3:
            found[parts[2]] = (parts[0], parts[1])
    if set(found) - {"0"}:
        raise UserError(f"{path} has unresolved merge conflicts: resolve them and `git add` "
                        "it first.")
    return found.get("0")


def read_blob(root: Path, sha: str) -> bytes:
    return _git_bytes(root, "cat-file", "blob", validate_sha(sha))


def write_blob(root: Path, data: bytes, path: str) -> str:
    """Store ``data`` as a blob, converted as `git add` would convert ``path`` (autocrlf,
    clean filters); returns its SHA."""
    out = _git_bytes(root, "hash-object", "-w", "--stdin", f"--path={_repo_path(path)}",
                     input=data)
    return out.decode().strip()


def stage_blob(root: Path, path: str, mode: str, sha: str) -> None:
    """Point the index entry of ``path`` at blob ``sha`` (the work tree is not touched)."""
    if mode not in ("100644", "100755"):
        raise UserError(f"refusing index mode {mode!r} for {path}: not a regular file.")
    _with_index_lock_retry(root, "update-index", "--add", "--cacheinfo",
                           f"{mode},{validate_sha(sha)},{_repo_path(path)}")


def commit_blob(root: Path, path: str, mode: str, sha: str, message: str) -> str:
    """Commit HEAD's tree with ``path`` alone set to blob ``sha``; returns the new HEAD SHA.

    Goes through a temporary index, so the real index (the user's other staged changes) and
    the work tree stay as they are. Hooks run as for any `git commit`; a refusing hook raises
    GitError and nothing is committed.
    """
    import tempfile

    if mode not in ("100644", "100755"):
        raise UserError(f"refusing index mode {mode!r} for {path}: not a regular file.")
    with tempfile.TemporaryDirectory(dir=git_dir(root), prefix="nf1prov-catalog-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if head_sha(root) is not None:
            _git_bytes(root, "read-tree", "HEAD", env=env)
        _git_bytes(root, "update-index", "--add", "--cacheinfo",
                   f"{mode},{validate_sha(sha)},{_repo_path(path)}", env=env)
        _git_bytes(root, "commit", "--quiet", "--file", "-", input=message.encode(), env=env)
    new = head_sha(root)
    assert new is not None
    return new
