"""The code of a `--no-commit` run trained on a dirty tree: its base commit plus the logged diff.

Such a run has no commit of its own. Its code was HEAD (``mlflow.source.git.commit``) plus every
uncommitted change, which `train` logs as the artifact ``git/uncommitted.diff``:
`make_diff` writes ``git diff --binary HEAD`` through a temporary index in which the untracked
files are added intent-to-add (``git add -N``), so their content is in the patch too (the real
index is never touched). Its first line says whether the patch is complete:

    # nf1prov: complete diff against <sha> (untracked files included)
    # nf1prov: incomplete diff against <sha>: <why>

`checkout --worktree` and `reproduce` rebuild the code with `apply_diff` (``git apply``) on a
new worktree at the base commit, and refuse (exit 2) when the diff is missing, incomplete or
does not apply; they never present the base commit alone as the run's code. Runs logged before
this format named untracked files as ``# untracked: <path>`` lines without their content: they
cannot be rebuilt and are refused, naming those files.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from nf1prov import git, tracking
from nf1prov.errors import UserError
from nf1prov.provenance.run_tags import UNCOMMITTED_DIFF_ARTIFACT as DIFF_ARTIFACT

COMPLETE = "# nf1prov: complete diff against"
INCOMPLETE = "# nf1prov: incomplete diff against"
MAX_UNTRACKED_BYTES = 20 * 1024 * 1024  # larger untracked files (data, not code) stay out
# git's own configuration must not change the patch: no colour, prefixes, external tools.
DIFF_OPTIONS = ("-c", "color.diff=false", "-c", "diff.noprefix=false",
                "-c", "diff.mnemonicPrefix=false", "-c", "diff.relative=false")


def is_dirty_scratch(run) -> bool:
    """A `--no-commit` run trained on a dirty tree: its code is not a commit."""
    tags = run.data.tags
    return (tags.get(tracking.KIND) == tracking.KIND_SCRATCH
            and tags.get(tracking.GIT_DIRTY) == "true")


# --- logging the diff (train --no-commit) ---------------------------------------------------

def make_diff(root: Path) -> str:
    """Every change of ``root``'s work tree against HEAD, untracked files included, as one patch
    with the header line of the module docstring ("" before the first commit)."""
    head = git.head_sha(root)
    if head is None:
        return ""
    untracked = [path for code, path in git.status_porcelain(root) if code == "??"]
    too_big = [p for p in untracked if (root / p).is_file() and not (root / p).is_symlink()
               and (root / p).stat().st_size > MAX_UNTRACKED_BYTES]
    with tempfile.TemporaryDirectory(prefix="nf1prov-diff-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_LITERAL_PATHSPECS": "1"}
        index = git.index_path(root)
        if index.is_file():
            shutil.copyfile(index, env["GIT_INDEX_FILE"])
        included = [p for p in untracked if p not in too_big]
        added = git.git("add", "--intent-to-add", "--pathspec-from-file=-",
                        "--pathspec-file-nul", cwd=root, env=env, check=False,
                        input="\0".join(included) + "\0") if included else None
        patch = git.git(*DIFF_OPTIONS, "diff", "--binary", "--no-ext-diff", "--no-textconv",
                        "--no-renames", "HEAD", "--", cwd=root, env=env, text=False).stdout
    problems = [f"untracked file {p} is over {MAX_UNTRACKED_BYTES // 2**20} MB, so only its "
                "name is recorded" for p in too_big]
    if added is not None and added.returncode != 0:
        problems.append(f"git could not add the untracked files ({added.stderr.strip()})")
    try:
        text = patch.decode("utf-8")
    except UnicodeDecodeError:
        text = patch.decode("utf-8", "replace")
        problems.append("a changed file is not UTF-8 text, so the logged text is not its bytes")
    if re.search(r"^Subproject commit ", text, re.MULTILINE):
        problems.append("a submodule moved, and a patch does not hold a submodule's files")
    names = "".join(f"# untracked, not included: {p}\n" for p in too_big)
    if problems:
        return f"{INCOMPLETE} {head}: {'; '.join(problems)}\n{names}{text}"
    return f"{COMPLETE} {head} (untracked files included)\n{text}"


# --- rebuilding the code (checkout --worktree, reproduce) ------------------------------------

def incomplete_reason(diff: str) -> str | None:
    """Why ``diff`` cannot rebuild the run's code, or None when it can."""
    first = diff.split("\n", 1)[0]
    if first.startswith(INCOMPLETE):
        return first.split(": ", 2)[-1]
    if first.startswith(COMPLETE):
        return None
    # Logged before the header existed: plain `git diff HEAD` plus untracked names.
    untracked = re.findall(r"^# untracked: (.*)$", diff, re.MULTILINE)
    if untracked:
        shown = ", ".join(untracked[:10]) + (f" and {len(untracked) - 10} more"
                                             if len(untracked) > 10 else "")
        return (f"it names untracked files without their content ({shown}): nf1prov "
                "logged untracked files' content only from later versions on")
    if re.search(r"^Binary files .* differ$", diff, re.MULTILINE):
        return "binary files changed and the diff does not hold their content"
    return None


def fetch_diff(client, model) -> bytes:
    """The run's logged diff, checked complete; UserError naming the run otherwise."""
    with tempfile.TemporaryDirectory(prefix="nf1prov-diff-") as tmp:
        try:
            diff = Path(client.download_artifacts(model.run_id, DIFF_ARTIFACT, tmp)).read_bytes()
        except Exception:  # noqa: BLE001 (MLflow raises several types for a missing file)
            diff = None
    what = (f"{model.codename} (run {model.run_id}) was trained with --no-commit on a dirty "
            f"tree: its code was commit {model.sha} plus uncommitted changes")
    if diff is None:
        raise UserError(f"{what}, and it logged no {DIFF_ARTIFACT}, so that code cannot be "
                        "rebuilt. Nothing was changed.")
    reason = incomplete_reason(diff.decode("utf-8", "replace"))
    if reason:
        raise UserError(f"{what}, and its logged {DIFF_ARTIFACT} is incomplete ({reason}), so "
                        "that code cannot be rebuilt and checking out the commit alone would "
                        "give other code. Nothing was changed. Retrain it from a commit (train "
                        "without --no-commit) to get a model whose code can be checked out.")
    return diff


def changed_paths(diff: bytes) -> list[str]:
    """The paths a patch changes (its ``diff --git a/<path> b/<path>`` lines)."""
    text = diff.decode("utf-8", "replace")  # git quotes unusual names: "b/na\303\257ve.py"
    return re.findall(r'^diff --git "?a/.*"? "?b/(.*?)"?$', text, re.MULTILINE)


def apply_diff(tree: Path, diff: bytes, model) -> list[str]:
    """Apply the run's diff to ``tree`` (a new worktree at its base commit), leaving the changes
    uncommitted; returns the paths changed. UserError when git cannot apply it whole."""
    proc = git.git("apply", "--binary", "--whitespace=nowarn", "-", cwd=tree, input=diff,
                   text=False, check=False)
    if proc.returncode != 0:
        error = proc.stderr.decode("utf-8", "replace").strip()
        raise UserError(f"The logged {DIFF_ARTIFACT} of {model.codename} (run {model.run_id}) "
                        f"does not apply to its base commit {model.sha} ({error}), so the code "
                        "it trained with cannot be rebuilt. Nothing was kept.")
    return changed_paths(diff)
