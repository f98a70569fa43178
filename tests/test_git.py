"""nf1prov.git against real temporary repositories."""

from __future__ import annotations

import threading
import time

import pytest

from nf1prov import git
from nf1prov.errors import UserError
from tests.conftest import run_git


def write(path, text="x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad", ["--upload-pack=evil", "-x-y-1", "Fearless-eel-1", "eel-1",
                                 "fearless-eel", "fearless-eel-1 ", "", None])
def test_validate_codename_rejects(bad):
    with pytest.raises(UserError):
        git.validate_codename(bad)


def test_validate_names_accept_good_values():
    assert git.validate_codename("fearless-eel-256") == "fearless-eel-256"
    assert git.validate_run_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2
    assert git.model_tag("fearless-eel-256") == "model/fearless-eel-256"
    for bad in ("-" + "a" * 31, "A" * 32, "a" * 31):
        with pytest.raises(UserError):
            git.validate_run_id(bad)
    with pytest.raises(UserError):
        git.validate_sha("--all")
    assert git.validate_sha("a" * 64) == "a" * 64  # a SHA-256 repository's commit
    with pytest.raises(UserError):
        git.validate_sha("a" * 65)


def test_dash_names_never_reach_git(git_repo):
    write(git_repo / "a.txt")
    git.stage_all(git_repo)
    sha = git.commit(git_repo, "first\n")
    with pytest.raises(UserError):
        git.create_tag(git_repo, "--force", sha)
    with pytest.raises(UserError):
        git.commit_exists(git_repo, "--all")
    with pytest.raises(UserError):
        git.changed_files(git_repo, "--output=/tmp/x", sha)
    with pytest.raises(UserError):
        git.paths_differing_from(git_repo, "-p")
    assert git.tag_sha(git_repo, "--help") is None
    assert git.is_ignored(git_repo, "-x") is False


def test_repo_root_from_subdirectory_and_outside(git_repo, tmp_path):
    sub = git_repo / "a" / "b"
    sub.mkdir(parents=True)
    assert git.repo_root(sub) == git_repo.resolve()
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    with pytest.raises(UserError, match="not inside a git work tree"):
        git.repo_root(outside)


def test_a_repository_owned_by_another_user_says_so_and_gives_gits_fix(git_repo, monkeypatch):
    """git's safe.directory refusal ("detected dubious ownership"), made without root through
    git's own test switch: the message names the repository and `git config ... safe.directory`,
    not "not inside a git work tree" and `git init`."""
    from click.testing import CliRunner

    from nf1prov.cli import cli

    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    probe = git.subprocess.run(["git", "rev-parse"], cwd=git_repo, capture_output=True,
                               text=True)
    if "dubious ownership" not in probe.stderr:
        pytest.skip("this git ignores GIT_TEST_ASSUME_DIFFERENT_OWNER (git < 2.35.2), and "
                    "another owner needs root")
    sub = git_repo / "sub"
    sub.mkdir()
    fix = f"git config --global --add safe.directory {git_repo}"
    with pytest.raises(UserError) as error:
        git.repo_root(sub)
    assert "owned by another user" in str(error.value) and fix in str(error.value)
    with pytest.raises(UserError, match="owned by another user"):
        git.head_sha(git_repo)  # an unchecked call too: no git command works there
    monkeypatch.chdir(sub)
    result = CliRunner().invoke(cli, ["catalog", "--check"])
    assert result.exit_code == 2 and fix in result.output, result.output
    assert "git init" not in result.output and "Traceback" not in result.output


def test_empty_repo_then_first_commit(git_repo):
    assert git.head_sha(git_repo) is None
    assert git.current_branch(git_repo) == "main"
    assert git.log_subjects(git_repo) == []
    assert not git.index_path(git_repo).exists()
    sha = git.commit(git_repo, "empty first commit\n")  # --allow-empty works with no commits
    assert git.head_sha(git_repo) == sha and len(sha) == 40
    assert [s for _, s, _ in git.log_subjects(git_repo)] == ["empty first commit"]


def test_identity_and_remote(git_repo, monkeypatch):
    assert git.identity(git_repo) == ("Test Committer", "committer@example.com")
    assert git.remote_url(git_repo) is None
    run_git(git_repo, "remote", "add", "origin", "https://example.org/lab/project.git")
    assert git.remote_url(git_repo) == "https://example.org/lab/project.git"
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var)
    run_git(git_repo, "config", "user.useConfigOnly", "true")
    assert git.identity(git_repo) is None


def test_status_stage_commit_and_diff(git_repo):
    write(git_repo / "keep.txt", "1\n")
    write(git_repo / "old.txt", "old\n")
    write(git_repo / ".gitignore", "ignored/\n")
    git.stage_all(git_repo)
    first = git.commit(git_repo, "first\n")
    write(git_repo / "keep.txt", "2\n")
    (git_repo / "old.txt").unlink()
    write(git_repo / "new" / "deep.txt")
    write(git_repo / "ignored" / "big.bin")
    codes = dict((path, code) for code, path in git.status_porcelain(git_repo))
    assert codes == {"keep.txt": " M", "old.txt": " D", "new/deep.txt": "??"}
    assert sorted(p.name for p in git.files_to_commit(git_repo)) == ["deep.txt", "keep.txt"]
    assert git.paths_differing_from(git_repo, first) == ["keep.txt", "new/deep.txt", "old.txt"]
    git.stage_all(git_repo)
    second = git.commit(git_repo, "second\n")
    assert not git.is_dirty(git_repo)
    assert git.changed_files(git_repo, first, second) == ["M\tkeep.txt", "A\tnew/deep.txt",
                                                          "D\told.txt"]
    assert git.paths_differing_from(git_repo, second) == []
    assert git.is_ignored(git_repo, git_repo / "ignored" / "x")
    assert git.is_ignored(git_repo, "ignored/not-yet-created")
    assert not git.is_ignored(git_repo, "keep.txt")


def test_rename_is_one_entry(git_repo):
    write(git_repo / "a.txt", "content that stays the same\n" * 5)
    git.stage_all(git_repo)
    git.commit(git_repo, "a\n")
    run_git(git_repo, "mv", "a.txt", "b.txt")
    assert git.status_porcelain(git_repo) == [("R ", "b.txt")]


def test_tags(git_repo):
    sha = git.commit(git_repo, "one\n")
    git.create_tag(git_repo, git.model_tag("brave-owl-1"), sha)
    assert git.tag_sha(git_repo, "model/brave-owl-1") == sha
    assert git.tag_sha(git_repo, "model/missing-tag-2") is None
    with pytest.raises(git.GitError):  # an existing tag is never moved
        git.create_tag(git_repo, "model/brave-owl-1", git.commit(git_repo, "two\n"))
    run_git(git_repo, "tag", "-a", "-m", "annotated", "model/calm-cat-2")
    assert git.tag_sha(git_repo, "model/calm-cat-2") == git.head_sha(git_repo)  # peeled
    run_git(git_repo, "tag", "--delete", "model/brave-owl-1")
    assert git.tag_sha(git_repo, "model/brave-owl-1") is None


def test_detached_head(git_repo):
    first = git.commit(git_repo, "one\n")
    git.commit(git_repo, "two\n")
    git.checkout_detached(git_repo, first)
    assert git.current_branch(git_repo) is None
    third = git.commit(git_repo, "three on a detached head\n")
    assert git.head_sha(git_repo) == third
    assert "main" not in run_git(git_repo, "branch", "--all", "--contains", third)


def test_worktree_shares_common_dir_but_not_index(git_repo, tmp_path):
    sha = git.commit(git_repo, "one\n")
    wt = tmp_path / "wt"
    git.add_worktree(git_repo, wt, sha)
    assert git.repo_root(wt) == wt.resolve()
    assert git.common_dir(wt) == git.common_dir(git_repo) == (git_repo / ".git").resolve()
    assert git.git_dir(wt) != git.git_dir(git_repo)
    assert git.index_path(wt) != git.index_path(git_repo)
    write(wt / "only-in-worktree.txt")
    git.stage_all(wt)
    wt_sha = git.commit(wt, "in worktree\n")
    git.create_tag(wt, "model/tidy-fox-3", wt_sha)
    assert git.tag_sha(git_repo, "model/tidy-fox-3") == wt_sha  # tags are shared
    git.remove_worktree(git_repo, wt)
    assert not wt.exists()


def test_index_lock_is_retried(git_repo):
    write(git_repo / "a.txt")
    lock = git_repo / ".git" / "index.lock"
    lock.write_text("")

    def release():
        time.sleep(0.4)
        lock.unlink()

    thread = threading.Thread(target=release)
    thread.start()
    git.stage_all(git_repo)  # waits for the other "process" to let go of the index
    thread.join()
    assert git.status_porcelain(git_repo) == [("A ", "a.txt")]


def test_index_lock_held_too_long_fails(git_repo, monkeypatch):
    monkeypatch.setattr(git, "INDEX_LOCK_RETRY_S", 0.2)
    write(git_repo / "a.txt")
    (git_repo / ".git" / "index.lock").write_text("")
    with pytest.raises(git.GitError, match="index.lock"):
        git.stage_all(git_repo)


def test_failing_hook_raises_with_its_output(git_repo):
    hook = git_repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'lint says no' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(git.GitError, match="lint says no"):
        git.commit(git_repo, "refused\n")
    assert git.head_sha(git_repo) is None


def test_unmerged_paths(git_repo):
    write(git_repo / "f.txt", "base\n")
    git.stage_all(git_repo)
    git.commit(git_repo, "base\n")
    run_git(git_repo, "checkout", "-q", "-b", "other")
    write(git_repo / "f.txt", "other\n")
    git.stage_all(git_repo)
    git.commit(git_repo, "other\n")
    run_git(git_repo, "checkout", "-q", "main")
    write(git_repo / "f.txt", "main\n")
    git.stage_all(git_repo)
    git.commit(git_repo, "main\n")
    assert git.git("merge", "other", cwd=git_repo, check=False).returncode != 0
    assert git.unmerged_paths(git_repo) == ["f.txt"]
