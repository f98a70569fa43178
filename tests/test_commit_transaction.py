"""Commit and tag are one step (DESIGN 3.2): whatever fails or interrupts the model commit, the
result is either nothing (no commit, no tag, index and work tree as they were, a run that names
no commit) or everything (commit, tag, and a run tagged with that commit).

Faults are injected at each step of the transaction: an exception, a real SIGINT (held back
until the step is done), and a real SIGKILL of the `nf1prov train` process (settled by the next
training from the journal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import git, tracking
from nf1prov.cli import cli
from nf1prov.provenance import commit, train_flow
from tests.conftest import REPO_ROOT, run_git

# (module, function) of each step of the model commit, in order.
STEPS = [
    ("git", "stage_all"),
    ("git", "run_hook"),  # pre-commit first; post-commit comes after the refs moved
    ("git", "write_tree"),
    ("git", "commit_tree"),
    ("commit", "write_journal"),
    ("git", "update_refs"),
    ("train_flow", "tag_run"),
]
MODULES = {"git": git, "commit": commit, "train_flow": train_flow}


def train(expect):
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml"])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


def repo_state(repo: Path):
    index = git.index_path(repo)
    return (git.head_sha(repo), index.read_bytes() if index.exists() else None,
            git.status_porcelain(repo), run_git(repo, "tag"))


@pytest.fixture
def prepared(project):
    """The project with a first commit, a staged change and an unstaged one."""
    git.stage_all(project)
    git.commit(project, "base\n")
    (project / "staged.py").write_text("S = 1\n")
    git.git("add", "staged.py", cwd=project)
    (project / "models" / "note.py").write_text("UNSTAGED = 1\n")
    return project


def assert_nothing(repo, before, client):
    assert repo_state(repo) == before
    assert not commit.journal_path(repo).exists()
    assert tracking.model_runs(client) == []  # no model: its run, which never got the commit,
    (run,) = deleted_runs(client)             # is deleted with its reason
    assert run.info.status in ("FAILED", "KILLED")
    assert tracking.GIT_COMMIT not in run.data.tags and tracking.GIT_TAG not in run.data.tags
    return run


def deleted_runs(client) -> list:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY)


def assert_everything(repo, client, status):
    (run,) = tracking.model_runs(client)
    assert run.info.status == status
    name = run.info.run_name
    sha = run.data.tags[tracking.GIT_COMMIT]
    assert git.tag_sha(repo, f"model/{name}") == sha == git.head_sha(repo)
    assert run.data.tags[tracking.GIT_TAG] == f"model/{name}"
    assert git.status_porcelain(repo) == []  # the index is the commit: nothing looks reverted
    assert run_git(repo, "show", f"{sha}:models/note.py") == "UNSTAGED = 1"
    assert not commit.journal_path(repo).exists()
    return run


def inject(monkeypatch, step, fault):
    """Call ``fault`` right after the first call of ``step`` (the pre-commit hook for
    run_hook); later calls (e.g. `undo` moving the refs back) work."""
    module_name, name = step
    module = MODULES[module_name]
    original = getattr(module, name)
    fired = []

    def faulty(*args, **kwargs):
        value = original(*args, **kwargs)
        if fired or (name == "run_hook" and args[1] != "pre-commit"):
            return value
        fired.append(True)
        fault()
        return value

    monkeypatch.setattr(module, name, faulty)


@pytest.mark.parametrize("step", STEPS, ids=[name for _, name in STEPS])
def test_an_exception_at_any_step_leaves_nothing(prepared, tracking_uri, monkeypatch, step):
    client = tracking.client(tracking_uri)
    before = repo_state(prepared)

    def fault():
        raise RuntimeError(f"injected after {step[1]}")

    inject(monkeypatch, step, fault)
    result = train(expect=1)
    assert f"injected after {step[1]}" in result.output or result.exception
    run = assert_nothing(prepared, before, client)
    assert f"injected after {step[1]}" in run.data.tags[tracking.FAILURE]


@pytest.mark.parametrize("step", STEPS, ids=[name for _, name in STEPS])
def test_ctrl_c_at_any_step_waits_for_the_whole_commit(prepared, tracking_uri, monkeypatch,
                                                       step):
    client = tracking.client(tracking_uri)
    inject(monkeypatch, step, lambda: os.kill(os.getpid(), signal.SIGINT))
    result = train(expect=130)
    run = assert_everything(prepared, client, status="KILLED")
    assert run.data.tags[tracking.FAILURE] == "interrupted by Ctrl-C (SIGINT)"
    # It came before the training started, so there is no checkpoint to resume from.
    assert "run the same `nf1prov train` command again" in result.output


def test_post_commit_hook_failure_is_too_late_to_refuse(prepared, tracking_uri):
    """As with `git commit`: the commit stands; only pre-commit and commit-msg can refuse."""
    hook = prepared / ".git" / "hooks" / "post-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    client = tracking.client(tracking_uri)
    train(expect=0)
    assert_everything(prepared, client, status="FINISHED")


def test_a_hook_that_changes_the_subject_is_refused(prepared, tracking_uri):
    hook = prepared / ".git" / "hooks" / "commit-msg"
    hook.write_text('#!/bin/sh\nsed -i "1s/^/[JIRA-1] /" "$1"\n')
    hook.chmod(0o755)
    before = repo_state(prepared)
    result = train(expect=2)
    assert "changed the model commit's subject" in result.output
    assert_nothing(prepared, before, tracking.client(tracking_uri))


def test_a_tag_named_model_is_refused_before_any_run(prepared, tracking_uri):
    run_git(prepared, "tag", "model")
    before = repo_state(prepared)
    client = tracking.client(tracking_uri)
    result = train(expect=2)
    assert "refs/tags/model" in result.output and "git tag -d model" in result.output
    assert repo_state(prepared) == before
    assert tracking.search_runs_all(client) == []


# --- SIGKILL: the process dies between two steps; the next training settles it ---------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from nf1prov import git
    from nf1prov.provenance import commit, train_flow
    modules = {"git": git, "commit": commit, "train_flow": train_flow}
    module, name, when = sys.argv[1], sys.argv[2], sys.argv[3]
    original = getattr(modules[module], name)
    def killed(*args, **kwargs):
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        value = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(modules[module], name, killed)
    from nf1prov.cli import main
    main(["train", "--config", "configs/tiny.toml"])
""")


def killed_training(repo: Path, tracking_uri: str, module: str, name: str, when: str):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, module, name, when], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("module,name,when,committed", [
    ("git", "update_refs", "before", False),
    ("git", "update_refs", "after", True),  # the index is not yet the commit's
    ("train_flow", "tag_run", "before", True),
    ("train_flow", "tag_run", "after", True),
])
def test_sigkill_between_steps_is_settled(prepared, tracking_uri, module, name, when, committed):
    client = tracking.client(tracking_uri)
    before = repo_state(prepared)
    killed_training(prepared, tracking_uri, module, name, when)
    (run,) = tracking.model_runs(client)
    assert run.info.status == "RUNNING"  # killed without a word: `list` shows it CRASHED
    codename = run.info.run_name
    tag_sha = git.tag_sha(prepared, f"model/{codename}")
    assert (tag_sha is not None) == committed
    if committed:
        assert git.head_sha(prepared) == tag_sha  # HEAD and tag moved together
    else:
        assert repo_state(prepared) == before

    with commit.commit_lock(prepared):  # what the next training does first
        train_flow.settle_interrupted_commit(prepared)
    assert not commit.journal_path(prepared).exists()
    run = client.get_run(run.info.run_id)
    if committed:
        assert run.data.tags[tracking.GIT_COMMIT] == tag_sha
        assert run.data.tags[tracking.GIT_TAG] == f"model/{codename}"
        assert git.status_porcelain(prepared) == []  # nothing looks reverted
    else:
        assert repo_state(prepared) == before
        assert tracking.GIT_COMMIT not in run.data.tags
    leftovers = [p.name for p in git.index_path(prepared).parent.iterdir()
                 if "nf1prov-" in p.name and p.name != "nf1prov-commit.lock"]
    assert leftovers == []


def test_the_next_training_settles_a_killed_commit(prepared, tracking_uri):
    client = tracking.client(tracking_uri)
    killed_training(prepared, tracking_uri, "git", "update_refs", "after")
    journal = json.loads(commit.journal_path(prepared).read_text())
    train(expect=0)
    killed = client.get_run(journal["run_id"])
    assert killed.data.tags[tracking.GIT_COMMIT] == journal["sha"]
    assert not commit.journal_path(prepared).exists()
    new = [r for r in tracking.model_runs(client) if r.info.run_id != journal["run_id"]][0]
    # The new model's commit follows the killed one's: nothing of it was reverted.
    assert run_git(prepared, "rev-parse", f"{new.data.tags[tracking.GIT_COMMIT]}^") == \
        journal["sha"]
    assert git.changed_files(prepared, journal["sha"], new.data.tags[tracking.GIT_COMMIT]) == []
