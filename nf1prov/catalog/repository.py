"""The catalogue's side of git (DESIGN 3.4): the hand-edit guard and `catalog --commit`.

**Hand edits.** The text between the markers is nf1prov's, rebuilt from MLflow. A rebuild that
would change it refuses (UserError, exit 2; ``--force`` overrides) when the README's current
block is all of:

- not blank,
- not the block of the README at HEAD (committed text is safe: it stays in git history),
- not the last block nf1prov itself wrote into that README (kept in the git directory,
  ``git rev-parse --git-path nf1prov-catalog.json``, so no file appears in the work tree and
  `catalog` can run twice in a row without a commit in between).

Blocks are compared with line endings normalised to LF. The refusal names the README lines
that differ from the nearer of those two blocks (all of the block's lines when neither
exists). Outside a git repository there is neither HEAD nor git directory: nothing is checked.

**--commit.** The commit holds the catalogue change alone: README as in HEAD with only its
block replaced, committed through a temporary index, so the user's other edits to the README
stay uncommitted in the work tree and their other staged changes stay staged. A README not yet
in HEAD is committed as written (there is no earlier version to keep apart from).

Paths: a README that is a symlink is followed; its target (inside the repository) is the file
compared with HEAD and committed.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from nf1prov.catalog import readme as catalog
from nf1prov.errors import UserError

COMMIT_SUBJECT = "Update model catalogue"
STATE_NAME = "nf1prov-catalog.json"


# --- paths ------------------------------------------------------------------------------------

def repo_path(root: Path, readme: Path) -> str | None:
    """The repository path (posix, relative to ``root``) of the file ``readme`` resolves to
    through symlinks; None when that file lies outside the work tree."""
    target = Path(os.path.realpath(readme))
    try:
        return target.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def refuse_unsafe_link(readme: Path, root: Path | None) -> None:
    """Refuse a README that is a symlink to nothing (writing would create its target wherever it
    points) or, inside a repository, one that leads out of it (writing would change a file the
    repository does not hold). UserError naming the link and its target."""
    readme = Path(readme)
    target = Path(os.path.realpath(readme))
    linked = readme.is_symlink()
    shown = os.readlink(readme) if linked else target
    if linked and not target.is_file():
        raise UserError(
            f"{readme} is a symbolic link to {shown}, which does not exist (or is not a file): "
            "nf1prov will not create a file through a dangling link. Point the link at the "
            "README, remove the link (the catalogue then creates README.md), or pass --readme "
            "PATH.")
    if root is not None and repo_path(root, readme) is None:
        what = f"a symbolic link to {shown}" if linked else f"reached through a link ({target})"
        raise UserError(
            f"{readme} is {what}, outside the repository {root}: nf1prov will not write the "
            "catalogue into a file the repository does not hold. Replace the link with the "
            "README itself, or pass --readme PATH naming the file meant.")


def nearer_readme(root: Path, folder: Path, written: Path) -> Path | None:
    """The README.md nearest above ``folder`` (itself included, ``root`` not) when it is not
    the file ``written``: in a monorepo, a sub-project's own README the user may have meant."""
    root, here = Path(root).resolve(), Path(folder).resolve()
    if root not in here.parents:
        return None
    for candidate in [here, *here.parents[:len(here.relative_to(root).parts) - 1]]:
        readme = candidate / "README.md"
        if readme.is_file():
            return None if os.path.realpath(readme) == os.path.realpath(written) else readme
    return None


def normalised(block: str) -> str:
    """``block`` with CRLF and CR line endings turned into LF."""
    return block.replace("\r\n", "\n").replace("\r", "\n")


# --- the last block nf1prov wrote -------------------------------------------------------------

def state_file(root: Path) -> Path:
    """<git dir>/nf1prov-catalog.json (per worktree): {repository path: last block written}."""
    from nf1prov import git

    return git.git_path(root, STATE_NAME)


def last_written(root: Path) -> dict[str, str]:
    """{repository path: the block (LF) nf1prov last wrote there}; empty when unreadable."""
    try:
        state = json.loads(state_file(root).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, str)}


def remember_written(root: Path | None, readme: Path, block: str) -> None:
    """Record ``block`` as the last one nf1prov wrote into ``readme`` (no-op outside git)."""
    path = repo_path(root, readme) if root is not None else None
    if path is None:
        return
    state = last_written(root) | {path: normalised(block)}
    catalog.write_atomic(state_file(root), json.dumps(state, indent=1, sort_keys=True) + "\n")


# --- hand edits -------------------------------------------------------------------------------

def head_block(root: Path, path: str) -> str | None:
    """The catalogue block of ``path`` at HEAD; None when HEAD lacks the file, its markers, or
    readable markers (then there is nothing committed to compare with)."""
    from nf1prov import git

    entry = git.blob_in_head(root, path)
    if entry is None:
        return None
    try:
        found = catalog.catalogue_block(git.read_blob(root, entry[1]).decode("utf-8"),
                                        f"HEAD:{path}")
    except (UnicodeDecodeError, UserError):
        return None
    return found[0] if found else None


def edited_lines(current: str, reference: str, first_line: int) -> list[str]:
    """Where ``current`` (a block starting at README line ``first_line``) departs from
    ``reference`` (both LF): ``["231", "240-242", "lines deleted before line 250"]``."""
    ours, theirs = current.split("\n"), reference.split("\n")
    spans = []
    matcher = difflib.SequenceMatcher(a=theirs, b=ours, autojunk=False)
    for op, _, _, lo, hi in matcher.get_opcodes():
        if op == "equal":
            continue
        if hi > lo:
            first, last = first_line + lo, first_line + hi - 1
            spans.append(str(first) if first == last else f"{first}-{last}")
        else:
            spans.append(f"lines deleted before line {first_line + lo}")
    return spans


def hand_edits(result: catalog.Rebuild, root: Path | None) -> list[str] | None:
    """The README lines of uncommitted hand edits that the rebuild would overwrite (see the
    module docstring); None when there are none."""
    found = result.old_block
    if root is None or found is None or not result.changed:
        return None
    current, first_line = normalised(found[0]), found[1]
    if not current.strip() or current == normalised(result.new_block):
        return None
    path = repo_path(root, result.readme)
    if path is None:
        return None
    known = [normalised(block) for block in (head_block(root, path), last_written(root).get(path))
             if block is not None]
    if current in known:
        return None
    lines = current.split("\n")
    nearest = max(known, default="", key=lambda block: difflib.SequenceMatcher(
        a=block.split("\n"), b=lines).ratio())
    return edited_lines(current, nearest, first_line) or [str(first_line)]


def refuse_hand_edits(result: catalog.Rebuild, root: Path | None) -> None:
    """UserError naming the lines when the rebuild would overwrite uncommitted hand edits."""
    lines = hand_edits(result, root)
    if not lines:
        return
    shown = ", ".join(lines[:8]) + (", ..." if len(lines) > 8 else "")
    label = "line" if len(lines) == 1 and lines[0].isdigit() else "lines"
    raise UserError(
        f"{result.readme}: the catalogue between the markers was edited by hand and the edit "
        f"is not committed ({label} {shown}); rebuilding would overwrite it. Commit the README "
        "first (the edit then stays in git history), move the text outside the markers (a "
        "note on a model: `nf1prov note CODENAME TEXT`), or rerun with --force to discard it."
    )


# --- --commit ---------------------------------------------------------------------------------

def _committed_text(root: Path, path: str, result: catalog.Rebuild,
                    head: tuple[str, str] | None) -> str:
    """The README as the catalogue commit records it: HEAD's text with only the block
    replaced, or (not in HEAD yet) the README as written."""
    from nf1prov import git

    if head is None:
        return result.new
    try:
        base = git.read_blob(root, head[1]).decode("utf-8")
        return catalog.splice(base, normalised(result.new_block), f"HEAD:{path}")
    except (UnicodeDecodeError, UserError) as exc:
        raise UserError(
            f"--commit: the committed {path} (HEAD) cannot take the catalogue on its own ({exc}). "
            f"Commit {path} yourself this time (git add {path}; git commit), then --commit "
            "works again."
        ) from exc


def _file_mode(readme: Path) -> str:
    target = Path(os.path.realpath(readme))
    return "100755" if target.exists() and os.access(target, os.X_OK) else "100644"


def commit_path(root: Path | None, readme: Path) -> str:
    """The repository path --commit records; UserError outside a repository."""
    if root is None:
        raise UserError(f"--commit: {readme} is not inside a git repository. Run without "
                        "--commit, or move the README into the repository.")
    path = repo_path(root, readme)
    if path is None:
        raise UserError(f"--commit: {readme} (or the file its symlink points to) is outside "
                        f"the repository {root}: run without --commit.")
    return path


def check_commit(root: Path | None, result: catalog.Rebuild) -> None:
    """Everything --commit needs, checked before the README is written (nothing committed)."""
    from nf1prov import git

    path = commit_path(root, result.readme)
    git.blob_in_index(root, path)  # refuses a conflicted README
    _committed_text(root, path, result, git.blob_in_head(root, path))


def commit_catalogue(root: Path | None, result: catalog.Rebuild) -> str | None:
    """Commit the catalogue change alone ('Update model catalogue'); returns the new SHA, or
    None when HEAD already holds this catalogue.

    Afterwards the index entry of the README is the committed one, or, when the user had
    staged their own version, that version with the new block, so their staged and unstaged
    edits stay exactly as uncommitted as before.
    """
    from nf1prov import git
    from nf1prov.provenance.commit import commit_lock

    path = commit_path(root, result.readme)
    with commit_lock(root):  # never interleave with a training's stage + commit + tag
        head = git.blob_in_head(root, path)
        text = _committed_text(root, path, result, head)
        blob = git.write_blob(root, text.encode("utf-8"), path)
        if head is not None and head[1] == blob:
            return None
        mode = head[0] if head is not None else _file_mode(result.readme)
        staged = git.blob_in_index(root, path)
        sha = git.commit_blob(root, path, mode, blob, COMMIT_SUBJECT + "\n")
        _restage(root, path, result, mode, blob, staged, head)
    return sha


def _restage(root: Path, path: str, result: catalog.Rebuild, mode: str, blob: str,
             staged: tuple[str, str] | None, head: tuple[str, str] | None) -> None:
    """Set the README's index entry after the commit (see `commit_catalogue`)."""
    from nf1prov import git

    if staged is None or staged == head:
        git.stage_blob(root, path, mode, blob)
        return
    try:
        own = git.read_blob(root, staged[1]).decode("utf-8")
        spliced = catalog.splice(own, normalised(result.new_block), f":{path}")
    except (UnicodeDecodeError, UserError):
        return  # their staged version cannot take the block: leave it exactly as staged
    git.stage_blob(root, path, staged[0], git.write_blob(root, spliced.encode("utf-8"), path))
