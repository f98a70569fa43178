"""`nf1prov demo`: the whole loop end to end (--fast, as a real subprocess started from inside
another repository, which must stay untouched), and the workspace safety rules, which run
`prepare_workspace` directly on real folders and real git repositories."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import demo, git
from nf1prov.cli import cli
from nf1prov.errors import UserError
from tests.conftest import run_git

SUBJECT = re.compile(r"^Model run codename: ([a-z]+-[a-z]+-[0-9]+) Run ID: [0-9a-f]{32} "
                     r"Experiment ID: [0-9]+$")


def tree_snapshot(root: Path):
    """Every path under ``root`` (.git included) with its size, HEAD and git status."""
    files = sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                   for p in root.rglob("*"))
    return files, git.head_sha(root), git.status_porcelain(root)


def user_repo(git_repo: Path) -> Path:
    (git_repo / "analysis.py").write_text("print('mine')\n")
    run_git(git_repo, "add", "analysis.py")
    run_git(git_repo, "commit", "--quiet", "-m", "my work")
    (git_repo / "wip.txt").write_text("uncommitted\n")
    return git_repo


def test_fast_demo_runs_the_loop_and_leaves_the_users_repo_alone(git_repo, tmp_path):
    repo = user_repo(git_repo)
    before = tree_snapshot(repo)
    workspace = tmp_path / "ws"
    user_store = tmp_path / "user-store.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{user_store}",  # the user's own store: unused
           "MLFLOW_EXPERIMENT_NAME": "users-experiment"}
    proc = subprocess.run([sys.executable, "-m", "nf1prov", "demo", str(workspace), "--fast"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert tree_snapshot(repo) == before
    assert not user_store.exists()

    assert run_git(workspace, "rev-list", "--count", "HEAD") == "3"
    subjects = run_git(workspace, "log", "-2", "--format=%s").splitlines()
    second, first = (SUBJECT.match(s).group(1) for s in subjects)
    first_sha = run_git(workspace, "rev-parse", "HEAD~1")
    assert run_git(workspace, "rev-parse", f"model/{first}") == first_sha
    assert run_git(workspace, "diff", "--name-only", "HEAD~1", "HEAD") == "configs/demo.toml"
    assert "+learning_rate = 3e-4" in run_git(workspace, "show", "HEAD", "--", "configs")

    readme = (workspace / "README.md").read_text()
    assert readme.count("**Codename:**") == 2
    assert f"**Codename:** {first}" in readme and f"**Codename:** {second}" in readme
    # evaluate ran before the catalogue: model 1's entry (the older, listed last) has its scores
    older_entry = readme.split(f"**Codename:** {first}", 1)[1]
    assert "- **Holdout Dice:**" in older_entry
    assert "- **Holdout Dice:**" not in readme.split(f"**Codename:** {first}", 1)[0]

    checkout = workspace / "checkouts" / first
    assert git.head_sha(checkout) == first_sha
    assert (checkout / ".nf1prov" / "models" / first / "model").is_dir()
    assert "learning_rate = 1e-3" in (checkout / "configs" / "demo.toml").read_text()

    out = proc.stdout
    assert f"[3/{demo.STEPS}] Train model 1: nf1prov train --config configs/demo.toml" in out
    assert "-learning_rate = 1e-3\n" in out and "+learning_rate = 3e-4\n" in out
    assert "README.md now lists 2 models" in out
    assert "Logged" in out and "holdout metrics" in out  # evaluate ran and logged to the run
    assert f"model 1: {first}  commit {first_sha}" in out
    assert (workspace / "mlflow.db").is_file() and (workspace / "mlartifacts").is_dir()


# --- the workspace: what may be used, replaced or must be refused -------------------------------


def test_non_demo_folder_is_refused_and_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious\n")
    for replace in (False, True):
        with pytest.raises(UserError, match="was not made by `nf1prov demo`") as exc:
            demo.prepare_workspace(folder, replace=replace, echo=lambda _: None)
        assert str(folder) in str(exc.value)
    result = CliRunner().invoke(cli, ["demo", "mine", "--replace"])
    assert result.exit_code == 2 and "was not made by `nf1prov demo`" in result.output
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "precious\n"


def test_earlier_demo_workspace_needs_replace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workspace = demo.prepare_workspace("ws", echo=lambda _: None)
    assert workspace == tmp_path / "ws"
    assert (workspace / demo.MARKER).is_file()
    assert not git.status_porcelain(workspace)  # set up clean: the marker is ignored
    assert run_git(workspace, "log", "--format=%s") == "Demo workspace"
    assert (workspace / "models" / "unet.py").is_file()
    assert (workspace / "configs" / "demo.toml").is_file()
    assert (workspace / "templates" / "catalog.md.j2").is_file()
    assert not list(workspace.rglob("__pycache__"))
    (workspace / "junk.txt").write_text("left over\n")

    with pytest.raises(UserError, match="--replace"):
        demo.prepare_workspace(workspace, echo=lambda _: None)
    assert (workspace / "junk.txt").exists()

    lines: list[str] = []
    demo.prepare_workspace(workspace, replace=True, echo=lines.append)
    assert not (workspace / "junk.txt").exists()
    assert run_git(workspace, "rev-list", "--count", "HEAD") == "1"
    assert any("removed the earlier demo workspace" in line for line in lines)


def test_empty_folder_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    workspace = demo.prepare_workspace(tmp_path / "empty", echo=lambda _: None)
    assert git.repo_root(workspace) == workspace


def test_current_repository_and_its_parents_are_refused(git_repo, monkeypatch):
    (git_repo / demo.MARKER).write_text("even a marker does not make it throwaway\n")
    sub = git_repo / "src"
    sub.mkdir()
    monkeypatch.chdir(sub)
    before = sorted(p.name for p in git_repo.iterdir())
    for target in (git_repo, git_repo.parent, sub):
        with pytest.raises(UserError, match="your current folder or repository"):
            demo.prepare_workspace(target, replace=True, echo=lambda _: None)
    assert sorted(p.name for p in git_repo.iterdir()) == before


def test_local_identity_is_set_only_when_git_has_none(tmp_path, monkeypatch):
    config = tmp_path / "gitconfig"
    config.write_text("[user]\n\tuseConfigOnly = true\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    workspace = demo.prepare_workspace("ws", echo=lines.append)
    assert any("no git identity configured" in line for line in lines)
    assert run_git(workspace, "config", "--local", "user.email") == "demo@nf1prov.invalid"
    assert run_git(workspace, "log", "--format=%an") == "nf1prov demo"
    assert "demo@nf1prov.invalid" not in config.read_text()


def test_failing_step_names_the_step_command_and_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workspace = demo.prepare_workspace("ws", echo=lambda _: None)
    steps = demo.Steps(workspace, echo=lambda _: None)
    with pytest.raises(UserError) as exc:
        steps.run("Train model 1", ["train", "--config", "configs/nowhere.toml"])
    message = str(exc.value)
    assert f"step 1/{demo.STEPS} (Train model 1)" in message
    assert "exit code 2" in message
    assert "`nf1prov train --config configs/nowhere.toml`" in message
    assert "nowhere.toml does not exist" in message  # the last lines of the step's stderr


def test_note_when_the_workspace_lies_unignored_inside_a_repository(git_repo, tmp_path):
    note = demo.outer_repository_note(git_repo / "deep" / "ws")
    assert note and "deep/ws/ as untracked" in note and str(git_repo) in note
    (git_repo / ".gitignore").write_text("deep/\n")
    assert demo.outer_repository_note(git_repo / "deep" / "ws") is None
    assert demo.outer_repository_note(tmp_path / "elsewhere" / "ws") is None
