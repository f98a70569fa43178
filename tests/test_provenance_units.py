"""The pieces of the train flow on real repositories and real sqlite stores: codenames, the
commit message and lock, the model commit, heartbeat and liveness, preflight refusals that
happen before the data layer is consulted."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nf1prov import git, tracking
from nf1prov.errors import UserError
from nf1prov.provenance import codename, commit, heartbeat, liveness, preflight, run_tags
from tests.conftest import REPO_ROOT, run_git


@pytest.fixture
def client(tracking_uri):
    return tracking.client(tracking_uri)


@pytest.fixture
def experiment_id(client, tracking_uri):
    return tracking.ensure_experiment(client, "units", tracking_uri)


def new_run(client, experiment_id, name=None, **tags):
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id


# --- codenames --------------------------------------------------------------------------------


def test_generated_names_are_codenames():
    for _ in range(50):
        assert git.CODENAME_RE.match(codename.generate())


def test_make_unique_keeps_a_free_name(client, experiment_id, git_repo):
    run_id = new_run(client, experiment_id, "brave-owl-1")
    assert codename.make_unique(client, run_id, git_repo) == "brave-owl-1"
    assert client.get_run(run_id).data.tags[tracking.CODENAME] == "brave-owl-1"


def test_make_unique_renames_on_store_or_tag_collision(client, experiment_id, git_repo,
                                                       tracking_uri):
    other_experiment = tracking.ensure_experiment(client, "elsewhere", tracking_uri)
    new_run(client, other_experiment, "brave-owl-1")  # same name, another experiment
    mine = new_run(client, experiment_id, "brave-owl-1")
    renamed = codename.make_unique(client, mine, git_repo)
    assert renamed != "brave-owl-1" and git.CODENAME_RE.match(renamed)
    run = client.get_run(mine)
    assert run.info.run_name == renamed == run.data.tags[tracking.RUN_NAME]

    sha = git.commit(git_repo, "x\n")
    git.create_tag(git_repo, "model/calm-cat-2", sha)  # a model commit made with another store
    third = new_run(client, experiment_id, "calm-cat-2")
    assert codename.make_unique(client, third, git_repo) != "calm-cat-2"


def test_make_unique_replaces_malformed_names(client, experiment_id, git_repo):
    run_id = new_run(client, experiment_id, "My Run")
    assert git.CODENAME_RE.match(codename.make_unique(client, run_id, git_repo))


# --- commit message and model commit -------------------------------------------------------


CONFIG = {"experiment": {"name": "e"}, "train": {"epochs": 1},
          "description": {"summary": "A test model."}}


def render(root, **kw):
    args = dict(codename="brave-owl-1", run_id="a" * 32, experiment_id="7",
                experiment_name="e", config=CONFIG, config_path="configs/x.toml",
                overrides=["train.epochs=1"])
    args.update(kw)
    return commit.render_message(root, **args)


def test_message_subject_is_the_contract(git_repo):
    message = render(git_repo)
    lines = message.splitlines()
    assert lines[0] == f"Model run codename: brave-owl-1 Run ID: {'a' * 32} Experiment ID: 7"
    assert lines[1] == ""
    assert "epochs = 1" in message and "train.epochs=1" in message
    assert "A test model." in message


def test_package_template_is_the_repo_template():
    assert (REPO_ROOT / "templates" / commit.TEMPLATE_NAME).read_text() == (
        commit.PACKAGE_TEMPLATES / commit.TEMPLATE_NAME).read_text()


def test_repo_template_overrides_and_is_checked(git_repo):
    assert commit.template_path(git_repo) == commit.PACKAGE_TEMPLATES / commit.TEMPLATE_NAME
    own = git_repo / "templates" / commit.TEMPLATE_NAME
    own.parent.mkdir()
    own.write_text("{{ subject }}\n\nTrained by the lab. {{ config.train.epochs }} epoch(s).\n")
    assert render(git_repo).endswith("Trained by the lab. 1 epoch(s).\n")
    own.write_text("Model {{ codename }}\n")
    with pytest.raises(UserError, match="must render the subject line exactly"):
        render(git_repo)
    own.write_text("{{ subject }} {{ no_such_variable }}\n")
    with pytest.raises(UserError, match="failed to render"):
        render(git_repo)


def test_commit_and_tag_commits_everything_even_when_nothing_changed(git_repo):
    (git_repo / "code.py").write_text("A = 1\n")
    (git_repo / "sub").mkdir()
    (git_repo / "sub" / "new.py").write_text("B = 2\n")
    with commit.commit_lock(git_repo):
        first = commit.commit_and_tag(git_repo, render(git_repo), "brave-owl-1")
    assert git.tag_sha(git_repo, "model/brave-owl-1") == first
    assert not git.is_dirty(git_repo)
    assert run_git(git_repo, "show", f"{first}:sub/new.py") == "B = 2"
    with commit.commit_lock(git_repo):
        second = commit.commit_and_tag(git_repo, render(git_repo, codename="calm-cat-2"),
                                       "calm-cat-2")
    assert second != first and git.changed_files(git_repo, first, second) == []
    subject = run_git(git_repo, "log", "-1", "--format=%s", second)
    assert subject.startswith("Model run codename: calm-cat-2 Run ID: ")


def test_failing_hook_leaves_index_and_tree_as_they_were(git_repo):
    (git_repo / "staged.txt").write_text("s\n")
    git.git("add", "staged.txt", cwd=git_repo)
    (git_repo / "unstaged.txt").write_text("u\n")
    before = git.status_porcelain(git_repo)
    hook = git_repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'hook refused' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(git.GitError, match="hook refused"):
        commit.commit_and_tag(git_repo, render(git_repo), "brave-owl-1")
    assert git.status_porcelain(git_repo) == before
    assert git.head_sha(git_repo) is None
    assert git.tag_sha(git_repo, "model/brave-owl-1") is None


LOCK_HOLDER = """\
import sys
from pathlib import Path
from nf1prov.provenance import commit

repo, events = Path(sys.argv[1]), Path(sys.argv[2])

def event(text):
    with open(events, "a") as handle:
        handle.write(text + "\\n")

with commit.commit_lock(repo):
    event("child acquired")
    print("held", flush=True)
    sys.stdin.readline()  # wait for the parent's go
    event("child releasing")
event("child released")
"""


@contextlib.contextmanager
def lock_holder(repo: Path, events: Path):
    """A child process that holds the commit lock until it reads a line (`release`)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(repo), str(events)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert proc.stdout.readline() == "held\n", proc.stderr.read()  # the child holds it
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def release(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_commit_lock_excludes_other_processes(git_repo, tmp_path):
    """Proved by handshakes and the order of recorded events, never by elapsed time: while a
    child process holds the lock, this process cannot take it; a waiting acquire gets it only
    after the child has let go."""
    events = tmp_path / "events"

    def event(text: str) -> None:
        with open(events, "a") as handle:  # O_APPEND: lines from both processes stay whole
            handle.write(text + "\n")

    with lock_holder(git_repo, events) as proc:
        with pytest.raises(UserError, match="Another nf1prov train held"):
            with commit.commit_lock(git_repo, timeout=0):
                event("parent acquired while the child held the lock")
        event("parent refused")

        started = threading.Event()

        def acquire() -> None:
            started.set()
            with commit.commit_lock(git_repo):
                event("parent acquired")

        waiter = threading.Thread(target=acquire, daemon=True)
        waiter.start()
        started.wait()
        release(proc)
        waiter.join(timeout=120)  # a guard against a hang, not a measurement
        assert not waiter.is_alive(), "the waiting acquire never got the lock"
        assert proc.wait(timeout=120) == 0, proc.stderr.read()

    lines = events.read_text().splitlines()
    assert lines[:3] == ["child acquired", "parent refused", "child releasing"], lines
    assert sorted(lines[3:]) == ["child released", "parent acquired"], lines


def test_a_training_waiting_for_the_commit_lock_says_whose_it_is(git_repo, tmp_path, capfd):
    """After about a second of waiting, one line: another training is committing, its pid,
    the lock file (so a user can tell a stuck process from a slow hook)."""
    def acquire() -> None:
        with commit.commit_lock(git_repo):
            pass

    with lock_holder(git_repo, tmp_path / "events") as proc:
        waiter = threading.Thread(target=acquire, daemon=True)
        waiter.start()
        said = ""
        deadline = time.monotonic() + 60  # a guard against a hang, not a measurement
        while "waiting" not in said and time.monotonic() < deadline:
            time.sleep(0.1)
            said += capfd.readouterr().err
        release(proc)
        waiter.join(timeout=60)
        assert not waiter.is_alive()
    lock = git.common_dir(git_repo) / commit.LOCK_NAME
    assert said == (f"nf1prov: waiting for another training's model commit (pid {proc.pid} on "
                    f"{socket.gethostname()}, lock {lock})...\n")


# --- heartbeat, liveness, tags ------------------------------------------------------------------


def test_heartbeat_refreshes_and_liveness_reads_it(client, experiment_id):
    run_id = new_run(client, experiment_id, "brave-owl-1")
    beats = threading.Condition()
    count = [0]

    class Observed(heartbeat.Heartbeat):  # the real loop; the test only counts the beats
        def beat(self) -> None:
            super().beat()
            with beats:
                count[0] += 1
                beats.notify_all()

    with Observed(client, run_id, interval=0.1):
        first = liveness.last_heartbeat(client.get_run(run_id))
        with beats:
            # The second beat from now began after `first` was read (the first may have been
            # under way): its timestamp is later. The timeout only guards against a hang.
            target = count[0] + 2
            assert beats.wait_for(lambda: count[0] >= target, timeout=120), "no heartbeat"
        run = client.get_run(run_id)
        assert liveness.last_heartbeat(run) > first
        assert run.data.tags[tracking.PID] == str(os.getpid())
        assert liveness.run_state(run) == "RUNNING"


def test_dead_pid_on_this_host_is_crashed(client, experiment_id):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    tags = heartbeat.identity_tags() | {tracking.PID: proc.stdout.strip()}
    run = client.get_run(new_run(client, experiment_id, "brave-owl-1", **tags))
    assert liveness.run_state(run) == liveness.CRASHED


def test_stale_heartbeat_on_another_host_is_crashed(client, experiment_id):
    old = time.time() - 10 * liveness.STALE_AFTER_S
    run = client.get_run(new_run(client, experiment_id, "brave-owl-1", **{
        tracking.HOST: "some-other-host", tracking.PID: "1", tracking.HEARTBEAT: str(old)}))
    assert liveness.run_state(run) == liveness.CRASHED
    assert liveness.run_state(run, now=old + 1) == "RUNNING"
    assert "process ended without finishing (last heartbeat " in liveness.crash_reason(run)


def test_environment_and_failure_line(client, experiment_id):
    tags = run_tags.environment_tags()
    assert tags[run_tags.ENV_PYTHON].count(".") == 2 and tags[run_tags.ENV_TORCH]
    freeze = run_tags.pip_freeze()
    assert any(line.lower().startswith("mlflow==") for line in freeze.splitlines())
    assert run_tags.failure_line("ValueError: x\n\n  detail\nmore\nand more") == (
        "ValueError: x | detail | more")


def test_git_tags(git_repo):
    sha = git.commit(git_repo, "x\n")
    tags = run_tags.git_tags(git_repo, sha, dirty=False, codename="brave-owl-1")
    assert tags == {tracking.GIT_DIRTY: "false", tracking.GIT_COMMIT: sha,
                    tracking.GIT_BRANCH: "main", tracking.GIT_TAG: "model/brave-owl-1"}
    run_git(git_repo, "remote", "add", "origin", "git@example.org:lab/p.git")
    run_git(git_repo, "checkout", "-q", "--detach")
    tags = run_tags.git_tags(git_repo, sha, dirty=True, codename=None)
    assert tags == {tracking.GIT_DIRTY: "true", tracking.GIT_COMMIT: sha,
                    tracking.GIT_REPO_URL: "git@example.org:lab/p.git"}


def test_source_tags_name_the_project_and_who_trains(git_repo, monkeypatch):
    """MLflow's UI shows Source (an MLflow PROJECT: its name, branch and commit) and Created by
    (`mlflow.user`) from these tags (DESIGN 3.3)."""
    import getpass

    root = git.repo_root(git_repo)
    assert run_tags.source_tags(root) == {
        tracking.SOURCE_TYPE: "PROJECT", tracking.SOURCE_NAME: str(root),
        tracking.USER: "Test Author <author@example.com>"}  # the author, not the committer
    run_git(git_repo, "remote", "add", "origin", "https://bob:t0ken@git.example.org/lab/p.git")
    tags = run_tags.source_tags(root)
    assert tags[tracking.SOURCE_NAME] == "https://git.example.org/lab/p.git"
    assert "t0ken" not in json.dumps(tags)
    git_tags = run_tags.git_tags(root, None, False, None)
    assert git_tags[tracking.GIT_REPO_URL] == "https://git.example.org/lab/p.git"
    # no git identity at all: the OS login
    run_git(git_repo, "config", "user.useConfigOnly", "true")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                "EMAIL"):
        monkeypatch.delenv(var, raising=False)
    assert run_tags.source_tags(root)[tracking.USER] == getpass.getuser()


ML = tracking.ML_PAGES


def test_run_page_url_for_a_server_and_for_a_local_store():
    rid = "ab" * 16
    assert ML == "?workflowType=machine_learning"  # MLflow 3 UI: the model training pages
    assert tracking.run_url("https://bob:pw@mlflow.lab:8443/base/?x=1", "7", rid) == (
        f"https://mlflow.lab:8443/base/#/experiments/7/runs/{rid}{ML}")
    assert tracking.run_url("http://lab:5000", "7", rid) == (
        f"http://lab:5000/#/experiments/7/runs/{rid}{ML}")
    # a sqlite (or any other) store: where `mlflow ui --backend-store-uri ...` serves it
    assert tracking.run_url("sqlite:////tmp/x/mlflow.db", "7", rid) == (
        f"http://127.0.0.1:5000/#/experiments/7/runs/{rid}{ML}")


def test_train_prints_and_records_the_run_page(client, experiment_id, tracking_uri, capsys):
    from nf1prov.commands.train import outcome_record, print_outcome
    from nf1prov.provenance.train_flow import Outcome

    run_id = new_run(client, experiment_id, "brave-owl-1")
    local = outcome_record(Outcome("brave-owl-1", run_id, experiment_id, "ab" * 20, "model",
                                   tracking_uri), client)
    page = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}{ML}"
    assert local["run_url"] == page
    print_outcome(local)
    lines = capsys.readouterr().out.splitlines()
    ui = lines.index(f"MLflow UI:  {tracking.ui_hint(tracking_uri)}")
    assert lines[ui + 1] == f"run page:   {page} (while that `mlflow ui` runs)"
    served = outcome_record(Outcome("brave-owl-1", run_id, experiment_id, "ab" * 20, "model",
                                    "https://bob:pw@mlflow.lab/"), client)
    print_outcome(served)
    page = f"https://mlflow.lab/#/experiments/{experiment_id}/runs/{run_id}{ML}"
    assert served["run_url"] == page
    assert f"run page:   {page}" in capsys.readouterr().out.splitlines()


def test_creation_tags_describe_the_run():
    tags = run_tags.creation_tags("model", {"task": "Segment", "data": ["a", ["b"]]})
    assert tags[tracking.KIND] == "model"
    assert tags[tracking.DESCRIPTION_PREFIX + "task"] == "Segment"
    assert json.loads(tags[tracking.DESCRIPTION_PREFIX + "data"]) == ["a", ["b"]]
    assert "**Task:** Segment" in tags[tracking.NOTE_CONTENT]
    assert tags[tracking.PID] == str(os.getpid())


# --- preflight checks that need no data --------------------------------------------------------


def test_runtime_files_must_be_ignored(git_repo):
    uri = tracking.default_tracking_uri(git_repo)
    with pytest.raises(UserError) as caught:  # every missing line at once, not one per try
        preflight.check_runtime_files_ignored(git_repo, uri)
    assert str(caught.value).startswith(".nf1prov/, mlflow.db and mlartifacts/ lie inside the "
                                        "repository")
    assert str(caught.value).endswith(".gitignore:\n  .nf1prov/\n  mlflow.db\n  mlartifacts/")
    (git_repo / ".gitignore").write_text(".nf1prov/\nmlartifacts/\n")
    with pytest.raises(UserError, match="^mlflow.db lies inside the repository"):
        preflight.check_runtime_files_ignored(git_repo, uri)
    (git_repo / ".gitignore").write_text(".nf1prov/\nmlflow.db\nmlartifacts/\n")
    preflight.check_runtime_files_ignored(git_repo, uri)
    preflight.check_runtime_files_ignored(git_repo, "http://server:5000")


def test_file_size_limit(git_repo):
    (git_repo / "weights.pt").write_bytes(b"\0" * 2_100_000)
    (git_repo / "small.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"weights\.pt \(2\.1 MB\).*\.gitignore.*--max-file-mb"):
        preflight.check_file_sizes(git_repo, 2.0)
    preflight.check_file_sizes(git_repo, 3.0)
    (git_repo / ".gitignore").write_text("*.pt\n")
    preflight.check_file_sizes(git_repo, 2.0)


@pytest.mark.parametrize("returncode,status,reason", [
    (130, "KILLED", "interrupted by Ctrl-C (SIGINT)"),
    (-15, "KILLED", "killed by SIGTERM"),
    (143, "KILLED", "killed by SIGTERM"),
    (-9, "FAILED", "the training process was killed by SIGKILL"),
    (1, "FAILED", "the training process ended (exit 1) without ending its run"),
])
def test_a_run_its_process_left_running_is_ended(client, experiment_id, returncode, status,
                                                 reason):
    """A training process interrupted before it could end its run (the first second of it)."""
    from nf1prov.provenance import run_end

    run_id = new_run(client, experiment_id)
    run_end.end_if_running(client, run_id, returncode, "the training process")
    run = client.get_run(run_id)
    assert run.info.status == status and run.data.tags[tracking.FAILURE] == reason
