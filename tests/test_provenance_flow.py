"""`nf1prov train` end to end: real temp repositories, real sqlite stores, tiny real trainings
(UNet width 4, 32-pixel crops, 1 epoch). The CLI runs in-process through click's CliRunner,
or as `.venv/bin/nf1prov` / `mlflow run` subprocesses for concurrency, SIGTERM and MLflow
projects."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nf1prov import git, threads, tracking
from nf1prov.cli import cli
from nf1prov.train.health import warning_lines
from tests.conftest import run_git, tiny_config
from tests.test_commit_transaction import deleted_runs

SUBJECT = re.compile(r"^Model run codename: ([a-z]+-[a-z]+-[0-9]+) Run ID: ([0-9a-f]{32}) "
                     r"Experiment ID: ([0-9]+)$")
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def exit_code(result) -> int:
    """The exit code of the command (the cli group turns Nf1provError into its code)."""
    return result.exit_code


def invoke(*args, expect=0):
    result = CliRunner().invoke(cli, list(args))
    if expect is not None:
        assert exit_code(result) == expect, (result.output, result.exception)
    return result


def train(*args, expect=0):
    return invoke("train", "--config", "configs/tiny.toml", *args, expect=expect)


def codename_of(output: str) -> str:
    return re.search(r"codename: +([a-z]+-[a-z]+-[0-9]+)\n", output).group(1)


def subprocess_env(tracking_uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def assert_contract(client, repo: Path, run_id: str, kind: str = "model",
                    trained_in: Path | None = None) -> str:
    """DESIGN 3.2 and 3.3 for one model run (trained in ``repo``, or in its worktree
    ``trained_in``); returns its codename."""
    run = client.get_run(run_id)
    tags = run.data.tags
    name = tags[tracking.RUN_NAME]
    assert git.CODENAME_RE.match(name) and run.info.run_name == name
    assert [r.info.run_id for r in tracking.runs_by_codename(client, name)] == [run_id]
    assert tags[tracking.CODENAME] == name
    assert tags[tracking.KIND] == kind
    assert tags[tracking.GIT_TAG] == f"model/{name}"
    sha = tags[tracking.GIT_COMMIT]
    assert git.tag_sha(repo, f"model/{name}") == sha
    assert tags[tracking.GIT_DIRTY] == "false"
    subject = run_git(repo, "log", "-1", "--format=%s", sha)
    assert subject == (f"Model run codename: {name} Run ID: {run_id} "
                       f"Experiment ID: {run.info.experiment_id}")
    assert "- **Architecture:** UNet (width 4)" in tags[tracking.NOTE_CONTENT]
    assert tags[tracking.DESCRIPTION_PREFIX + "architecture"] == "UNet (width 4)"
    assert tags[tracking.HOST] and tags[tracking.PID] and float(tags[tracking.HEARTBEAT]) > 0
    assert_source(tags, trained_in or repo)
    return name


def assert_source(tags: dict, repo: Path) -> None:
    """MLflow's UI shows Source (the project, its branch and commit) and Created by."""
    assert tags[tracking.SOURCE_TYPE] == "PROJECT"
    # the `origin` it can be fetched from, else the folder it trained in
    assert tags[tracking.SOURCE_NAME] == (git.remote_url(repo) or str(git.repo_root(repo)))
    assert tags[tracking.USER] == "Test Author <author@example.com>"  # conftest's identity


def store_snapshot(client) -> list:
    runs = tracking.search_runs_all(client)
    return sorted((r.info.run_id, r.info.status) for r in runs) + [
        e.name for e in client.search_experiments()]


def repo_snapshot(repo: Path):
    index = git.index_path(repo)
    return (git.head_sha(repo), index.read_bytes() if index.exists() else None,
            git.status_porcelain(repo), run_git(repo, "tag"))


# --- the main path ------------------------------------------------------------------------------


def test_two_trainings_two_commits_each_holding_its_code(project, tracking_uri):
    client = tracking.client(tracking_uri)
    (project / "models" / "note.py").write_text("VERSION = 1\n")
    first = train()
    assert "mlflow ui --backend-store-uri " + tracking_uri in first.output
    (first_run,) = tracking.model_runs(client)
    assert (f"run page:   http://127.0.0.1:5000/#/experiments/{first_run.info.experiment_id}"
            f"/runs/{first_run.info.run_id}{tracking.ML_PAGES}") in first.output
    (project / "models" / "note.py").write_text("VERSION = 2\n")
    sub = project / "models"
    os.chdir(sub)  # from a subdirectory: the config path is relative to it
    second = invoke("train", "--config", "../configs/tiny.toml")

    runs = tracking.model_runs(client)
    assert len(runs) == 2
    new, old = runs
    names = [assert_contract(client, project, r.info.run_id) for r in (old, new)]
    assert names == [codename_of(first.output), codename_of(second.output)]
    old_sha, new_sha = (r.data.tags[tracking.GIT_COMMIT] for r in (old, new))
    assert run_git(project, "show", f"{old_sha}:models/note.py") == "VERSION = 1"
    assert run_git(project, "show", f"{new_sha}:models/note.py") == "VERSION = 2"
    assert run_git(project, "rev-list", "--count", "HEAD") == "2"  # first commit, then one
    assert not git.is_dirty(project)
    for run in runs:
        assert run.info.status == "FINISHED" and tracking.FAILURE not in run.data.tags
        assert "best_val_dice_inner-cell" in run.data.metrics
        assert run.data.tags["nf1prov.env.torch"] == torch.__version__
        # the training process started with OMP_NUM_THREADS (`project` sets it) and waits so
        # as to share the machine (nf1prov.threads)
        assert run.data.tags["nf1prov.env.torch_threads"] == "1"
        assert run.data.tags["nf1prov.env.openmp"] == threads.openmp_settings(
            {"OMP_NUM_THREADS": "1", **threads.WAIT_SETTING})
        freeze = client.download_artifacts(run.info.run_id, "environment/pip-freeze.txt")
        assert "mlflow==" in Path(freeze).read_text().lower()
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
            "plots/learning_curve.png"]
    # 1 epoch: still improving; the verdict is printed last, with what to do
    verdict = old.data.tags[tracking.HEALTH]
    assert verdict.startswith("warning: ") and "still improving at the last epoch" in verdict
    assert "health:     warning (below)" in first.output
    assert first.output.rstrip("\n").splitlines()[-len(warning_lines(verdict)):] == \
        warning_lines(verdict)

    # nothing changed since: the next model still gets its own (empty) commit
    os.chdir(project)
    third = train("--threads", "2")  # the setting wins over OMP_NUM_THREADS
    sha3 = git.tag_sha(project, f"model/{codename_of(third.output)}")
    assert sha3 != new_sha and git.changed_files(project, new_sha, sha3) == []
    run3 = tracking.model_runs(client)[0]
    assert run3.data.tags["nf1prov.env.torch_threads"] == run3.data.params["train.threads"] == "2"


def test_detached_head_and_worktree(project, tracking_uri, tmp_path):
    client = tracking.client(tracking_uri)
    git.stage_all(project)
    base = git.commit(project, "base\n")
    run_git(project, "checkout", "-q", "--detach")
    train()
    run = tracking.model_runs(client)[0]
    assert tracking.GIT_BRANCH not in run.data.tags  # no branch on a detached HEAD
    assert_contract(client, project, run.info.run_id)

    wt = tmp_path / "wt"
    git.add_worktree(project, wt, base)
    (wt / "worktree_only.py").write_text("X = 1\n")
    os.chdir(wt)
    invoke("train", "--config", str(project / "configs/tiny.toml"))
    run = tracking.model_runs(client)[0]
    sha = run.data.tags[tracking.GIT_COMMIT]
    # the tag is visible from the main tree; Source names the worktree that trained it
    assert_contract(client, project, run.info.run_id, trained_in=wt)
    assert run_git(project, "show", f"{sha}:worktree_only.py") == "X = 1"


# --- refusals and failures ------------------------------------------------------------------


def _no_identity(repo, monkeypatch):
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME",
                "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var)
    run_git(repo, "config", "user.useConfigOnly", "true")
    return [], "no identity"


def _big_file(repo, monkeypatch):
    (repo / "weights.bin").write_bytes(b"\0" * 1_200_000)
    return ["--max-file-mb", "1"], "weights.bin (1.2 MB)"


def _unknown_key(repo, monkeypatch):
    return ["--set", "train.epoch=3"], "unknown key train.epoch"


def _missing_data(repo, monkeypatch):
    return ["--data-root", str(repo / "nowhere")], "does not exist"


def _db_not_ignored(repo, monkeypatch):
    (repo / ".gitignore").write_text(".nf1prov/\n")  # every missing line in one message
    return (["--tracking-uri", tracking.default_tracking_uri(repo)],
            "mlflow.db and mlartifacts/ lie inside")


def _broken_template(repo, monkeypatch):
    (repo / "templates" / "commit_message.txt.j2").write_text("Model {{ codename }}\n")
    return [], "must render the subject line exactly"


def _unreachable_store(repo, monkeypatch):
    # no MLFLOW_HTTP_REQUEST_* settings: nf1prov's own first contact gives up quickly
    return ["--tracking-uri", "http://127.0.0.1:9"], "The MLflow server http://127.0.0.1:9 does not"


def _bad_data(repo, monkeypatch):
    (repo.parent / "bad-data" / "NF0001").mkdir(parents=True)
    return ["--data-root", str(repo.parent / "bad-data")], "bad-data"


def _signing_without_a_key(repo, monkeypatch):
    run_git(repo, "config", "commit.gpgSign", "true")
    run_git(repo, "config", "gpg.format", "ssh")  # and no user.signingKey
    return [], "commit.gpgSign is true"


def _cuda_without_a_gpu(repo, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return ["--set", "train.device=cuda"], "train.device is cuda but no CUDA device"


@pytest.mark.parametrize("setup", [_no_identity, _big_file, _unknown_key, _missing_data,
                                   _db_not_ignored, _broken_template, _unreachable_store,
                                   _bad_data, _signing_without_a_key, _cuda_without_a_gpu])
def test_preflight_failure_changes_nothing(project, tracking_uri, monkeypatch, setup):
    client = tracking.client(tracking_uri)
    (project / "staged.py").write_text("S = 1\n")
    git.git("add", "staged.py", cwd=project)
    (project / "unstaged.py").write_text("U = 1\n")
    args, message = setup(project, monkeypatch)
    before_repo, before_store = repo_snapshot(project), store_snapshot(client)
    result = train(*args, expect=2)
    assert result.exit_code == 2
    assert message in result.output
    assert repo_snapshot(project) == before_repo
    assert store_snapshot(client) == before_store
    assert not (project / "mlflow.db").exists()


def break_forward(repo: Path, message: str = "loss is NaN\nsecond line") -> None:
    """Make the repository's own UNet raise in forward() (the committed code is what runs)."""
    with open(repo / "models" / "unet.py", "a") as handle:
        handle.write(f"\n\ndef _broken(self, x):\n    raise RuntimeError({message!r})\n\n\n"
                     "UNet.forward = _broken\n")


def diverge_forward(repo: Path) -> None:
    """Make the repository's own UNet diverge as a too-high learning rate does: from its second
    call on, its logits overflow to inf (the committed code is what runs)."""
    with open(repo / "models" / "unet.py", "a") as handle:
        handle.write("\n\n_forward = UNet.forward\n\n\ndef _diverging(self, x):\n"
                     "    self.calls = getattr(self, 'calls', 0) + 1\n"
                     "    return _forward(self, x) * (1.0 if self.calls == 1 else float('inf'))\n"
                     "\n\nUNet.forward = _diverging\n")


def test_a_diverging_training_fails_the_run_in_one_line_and_keeps_commit(project, tracking_uri,
                                                                         capfd):
    diverge_forward(project)
    result = train(expect=1)
    client = tracking.client(tracking_uri)
    (run,) = tracking.model_runs(client)
    reason = ("the loss became NaN/inf at epoch 1, batch 2: lower train.learning_rate "
              "(now 0.003)")
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE] == reason  # not "no epoch was trained"
    assert reason in result.output
    assert "FAILED" in result.output and f"nf1prov show {run.info.run_name}" in result.output
    err = capfd.readouterr().err  # the training process's own output
    assert "Traceback" not in err + result.output and reason not in err  # said once, by train
    assert_contract(client, project, run.info.run_id)  # commit and tag stay: that code ran


def test_a_refusing_pre_commit_hook_leaves_no_commit_and_no_model(project, tracking_uri):
    hook = project / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'black would reformat models/unet.py' >&2\nexit 1\n")
    hook.chmod(0o755)
    (project / "staged.py").write_text("S = 1\n")
    git.git("add", "staged.py", cwd=project)
    before = repo_snapshot(project)
    client = tracking.client(tracking_uri)
    for _ in range(2):  # every try: no model is left behind
        result = train(expect=2)
        assert "black would reformat" in result.output and "Nothing was created" in result.output
    assert repo_snapshot(project) == before  # no commit, no tag, index as it was
    assert json.loads(invoke("list", "--json").output) == []
    assert tracking.model_runs(client) == []
    # The runs are MLflow-deleted (their reason kept for whoever looks), not left as models.
    runs = deleted_runs(client)
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    assert all("black would reformat" in r.data.tags[tracking.FAILURE] for r in runs)
    (project / "README.md").write_text("# Project\n")  # and the catalogue holds no model
    assert "0 models, written" in invoke("catalog").output
    assert "No models recorded yet" in (project / "README.md").read_text()


def test_no_commit_makes_a_scratch_run(project, tracking_uri, tmp_path, data_root):
    base = git.commit(project, "base\n")  # an empty commit: every project file is untracked
    (project / "experiment.py").write_text("TRY = 1\n")
    (project / "lookup.bin").write_bytes(b"\0\1\2 not text")
    # --data-root (relative) wins over the config's data.root and is recorded absolute
    relative = os.path.relpath(data_root, project)
    result = train("--no-commit", "--set", 'data.root="not-here"', "--data-root", relative)
    assert "scratch" in result.output
    assert f"at commit {base} plus its uncommitted changes (logged as" in result.output
    client = tracking.client(tracking_uri)
    assert tracking.model_runs(client) == []  # never a catalogued model
    (run,) = tracking.model_runs(client, (tracking.KIND_SCRATCH,))
    tags = run.data.tags
    assert tags[tracking.KIND] == "scratch" and tags[tracking.GIT_COMMIT] == base
    assert tags[tracking.GIT_DIRTY] == "true" and tracking.GIT_TAG not in tags
    assert_source(tags, project)
    diff = Path(client.download_artifacts(run.info.run_id, "git/uncommitted.diff")).read_text()
    assert diff.startswith(f"# nf1prov: complete diff against {base}")
    assert "+TRY = 1" in diff  # untracked files' content, not only their names
    assert git.head_sha(project) == base and run_git(project, "tag") == ""
    # Its code is the base commit plus that diff: only a new worktree gets both.
    refused = invoke("checkout", run.info.run_id, expect=2).output
    assert "--no-commit" in refused and "--worktree" in refused
    tree = tmp_path / "scratch-code"
    output = invoke("checkout", run.info.run_id, "--worktree", str(tree)).output
    assert f"its code was commit {base} plus its logged git/uncommitted.diff" in output
    assert git.head_sha(tree) == base
    assert (tree / "experiment.py").read_text() == "TRY = 1\n"
    assert (tree / "lookup.bin").read_bytes() == b"\0\1\2 not text"
    assert (tree / "configs" / "tiny.toml").read_bytes() == \
        (project / "configs" / "tiny.toml").read_bytes()
    assert run.data.params["data.root"] == str(data_root.resolve())
    logged = Path(client.download_artifacts(run.info.run_id, "config/config.toml")).read_text()
    assert f'root = "{data_root.resolve()}"' in logged


# --- subprocesses: SIGTERM + resume, concurrency, mlflow run --------------------------------


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_training(project: Path, tracking_uri: str, *args: str,
                   **popen) -> subprocess.Popen:
    """`nf1prov train ARGS` as a subprocess of its own, output captured."""
    return subprocess.Popen([str(BIN / "nf1prov"), "train", *args], cwd=project,
                            env=subprocess_env(tracking_uri), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def first_checkpoint(client):
    """The one model run, once it has logged its first checkpoint."""
    def checkpointed():
        runs = tracking.model_runs(client)
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            return runs[0]
        return None

    return wait_for(checkpointed, what="the first checkpoint")


def test_sigterm_kills_then_resume_continues_the_same_run(project, tracking_uri, data_root,
                                                          small_disk, capfd):
    client = tracking.client(tracking_uri)
    # The store's artifacts on a small filesystem of their own, which fills before a resume
    # (needs root to mount; elsewhere that part is left out).
    disk = small_disk(project.parent / "mlartifacts", required=False)
    long_config = tiny_config(data_root, epochs=500, patience=1000)
    (project / "configs" / "long.toml").write_text(long_config)
    proc = start_training(project, tracking_uri, "--config", "configs/long.toml")
    try:
        run = first_checkpoint(client)
    finally:
        proc.send_signal(signal.SIGTERM)
        # a hang guard, not a timing: on a loaded runner the last writes may meet a locked
        # sqlite file, which the training retries (`nf1prov.outbox`) before it ends the run
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, out, err)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.FAILURE] == "killed by SIGTERM"
    name = assert_contract(client, project, run.info.run_id)

    assert f"nf1prov train --resume {name}" in err  # the printed command works (below)
    if disk is not None:  # the disk fills: one line naming it, the run FAILED, the checkpoint
        disk.fill()       # kept for the resume below
        capfd.readouterr()
        result = invoke("train", "--resume", name, "--set", "train.epochs=3", expect=1)
        output = result.output + capfd.readouterr().err
        assert "Traceback" not in output, output
        run = client.get_run(run.info.run_id)
        reason = run.data.tags[tracking.FAILURE]
        assert run.info.status == "FAILED" and reason in output
        assert reason.startswith(f"The disk holding {disk.path}/") and "0 B free of" in reason
        assert reason.endswith(f"Then continue it with `nf1prov train --resume {name}`.")
        disk.free()
    # Resuming runs the model commit's code, whatever the work tree holds now.
    break_forward(project, "the work tree's code ran, not the commit's")
    invoke("train", "--resume", name, "--set", "train.epochs=3")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and tracking.FAILURE not in run.data.tags
    assert len(tracking.model_runs(client)) == 1  # the same run, continued
    assert "best_val_dice_inner-cell" in run.data.metrics
    # its verdict and curve cover every epoch (the history comes back with the checkpoint)
    assert run.data.tags[tracking.HEALTH].startswith(("ok", "warning: "))
    assert client.list_artifacts(run.info.run_id, "plots")[0].path == "plots/learning_curve.png"
    assert "already FINISHED" in invoke("train", "--resume", name, expect=2).output


def test_mlflow_run_adopts_the_projects_run(project, tracking_uri):
    git.stage_all(project)
    git.commit(project, "project\n")
    (project / "models" / "note.py").write_text("CHANGED = True\n")
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "train", "--env-manager", "local",
         "--experiment-name", "projects", "-P", "config=configs/tiny.toml"],
        cwd=project, env=subprocess_env(tracking_uri), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = tracking.client(tracking_uri)
    runs = tracking.search_runs_all(client)
    assert len(runs) == 1  # one run, not two
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "projects"
    assert run.data.tags.get("mlflow.project.entryPoint") == "train"
    name = assert_contract(client, project, run.info.run_id)
    sha = run.data.tags[tracking.GIT_COMMIT]
    assert run_git(project, "show", f"{sha}:models/note.py") == "CHANGED = True"
    assert f"codename:   {name}" in proc.stdout
    assert "best epoch: 1 of 1; val Dice inner-cell" in proc.stdout
    chosen = run.data.params["instances.seed_threshold"]
    assert f"instances:  seed threshold {chosen}," in proc.stdout
