"""Sharing a model's commit: `train --push` sends model/<codename> to a git remote, and a
collaborator's `checkout` fetches a tag its clone lacks."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from nf1prov import tracking
from nf1prov.cli import cli
from tests.conftest import run_git


def nf1prov(cwd, tracking_uri, *args, expect=0):
    """`nf1prov ARGS` run in ``cwd`` by this process's CLI (a fresh interpreter would spend
    2-3 s importing mlflow first); the training itself still runs in its own process."""
    import mlflow

    here = os.getcwd()
    os.chdir(cwd)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        result = CliRunner().invoke(cli, list(args), env={"MLFLOW_TRACKING_URI": tracking_uri})
    finally:
        os.chdir(here)
    assert result.exit_code == expect, (args, result.stdout[-2000:], result.stderr[-3000:],
                                        result.exception)
    return result


@pytest.fixture
def shared(project, tmp_path):
    """The project pushed to a bare 'lab' remote, and a collaborator's clone made now (so it
    has none of the model tags made later)."""
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    lab = tmp_path / "lab.git"
    run_git(tmp_path, "init", "--quiet", "--bare", str(lab))
    run_git(project, "remote", "add", "origin", str(lab))
    run_git(project, "push", "--quiet", "-u", "origin", "HEAD:main")
    colleague = tmp_path / "colleague"
    run_git(tmp_path, "clone", "--quiet", str(lab), str(colleague))
    return project, lab, colleague


def test_push_then_a_collaborator_checks_the_model_out(shared, tracking_uri):
    project, lab, colleague = shared
    out = nf1prov(project, tracking_uri, "train", "--config", "configs/tiny.toml", "--push").stdout
    client = tracking.client(tracking_uri)
    (run,) = tracking.model_runs(client)
    codename, sha = run.info.run_name, run.data.tags[tracking.GIT_COMMIT]
    assert f"pushed:     model/{codename} to origin" in out
    # pushed once committed, before the training (others can fetch the code while it trains)
    assert out.index("training...") < out.index("pushed:") < out.index("codename:")
    assert run_git(lab, "rev-parse", f"refs/tags/model/{codename}^{{commit}}") == sha
    listed = nf1prov(project, tracking_uri, "list", "--format", "json").stdout
    assert [(m["codename"], m["remote"]) for m in json.loads(listed)] == [(codename, "origin")]

    assert run_git(colleague, "tag", "--list") == ""  # cloned before: no tag, no commit
    checked = nf1prov(colleague, tracking_uri, "checkout", codename, "--worktree",
                      str(colleague.parent / "wt")).stdout
    assert sha in checked
    assert run_git(colleague.parent / "wt", "rev-parse", "HEAD") == sha
    assert run_git(colleague, "tag", "--list") == f"model/{codename}"


def test_push_refusals_come_before_anything_exists(project, tracking_uri):
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    head = run_git(project, "rev-parse", "HEAD")
    err = nf1prov(project, tracking_uri, "train", "--config", "configs/tiny.toml", "--push",
                  expect=2).stderr
    assert "has none: add one with `git remote add origin URL`" in err
    err = nf1prov(project, tracking_uri, "train", "--config", "configs/tiny.toml", "--push",
                  "--no-commit", expect=2).stderr
    assert "--no-commit makes none" in err
    run_git(project, "remote", "add", "lab", "/nonexistent/lab.git")
    err = nf1prov(project, tracking_uri, "train", "--config", "configs/tiny.toml", "--push",
                  "--remote", "origin", expect=2).stderr
    assert "No git remote 'origin'" in err and "lab" in err
    assert run_git(project, "rev-parse", "HEAD") == head
    assert tracking.model_runs(tracking.client(tracking_uri)) == []


def test_a_push_that_fails_keeps_the_model_and_says_how_to_push(project, tracking_uri):
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    run_git(project, "remote", "add", "lab", str(project.parent / "no-such-remote.git"))
    proc = nf1prov(project, tracking_uri, "train", "--config", "configs/tiny.toml", "--push",
                   expect=1)
    (run,) = tracking.model_runs(tracking.client(tracking_uri))
    assert run.info.status == "FINISHED"
    codename = run.info.run_name
    assert f"git push lab model/{codename}" in proc.stderr
    assert run_git(project, "tag", "--list") == f"model/{codename}"
    listed = nf1prov(project, tracking_uri, "list")
    assert "the remote(s) lab did not answer" in listed.stderr
    assert listed.stdout.splitlines()[1].split()[-2] == "none"  # on no remote: not shared


def test_a_refused_push_reports_every_line_git_printed(git_repo, tmp_path, monkeypatch):
    """A pre-push hook's stdout is part of git's answer: none of it is dropped."""
    from nf1prov.commands.train import push_model

    run_git(git_repo, "commit", "--quiet", "--allow-empty", "-m", "model")
    run_git(git_repo, "tag", "model/brave-owl-1")
    run_git(tmp_path, "init", "--quiet", "--bare", str(tmp_path / "lab.git"))
    run_git(git_repo, "remote", "add", "lab", str(tmp_path / "lab.git"))
    hook = git_repo / ".git" / "hooks" / "pre-push"
    hook.write_text("#!/bin/sh\necho 'pre-push: model tags need a review (stdout)'\n"
                    "echo 'pre-push: see CONTRIBUTING.md (stderr)' >&2\nexit 1\n")
    hook.chmod(0o755)
    monkeypatch.chdir(git_repo)
    failure = push_model("brave-owl-1", "lab")
    for line in ("pre-push: model tags need a review (stdout)",
                 "pre-push: see CONTRIBUTING.md (stderr)", "error: failed to push some refs"):
        assert line in failure, failure
    assert "git push lab model/brave-owl-1" in failure
