"""The commit holds exactly the code that ran (DESIGN 3.2), in the situations where it used to
not: nf1prov installed from another checkout (as a wheel, or this checkout's editable install
used in another repository or worktree), edits while a training waits for the commit lock,
edits right after the commit, modules imported late.

The project's committed `models/unet.py` is made to raise in forward() (or not), and the run's
outcome shows which code really trained: the committed one, never the installed one or the
work tree's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import git, tracking
from nf1prov.cli import cli
from nf1prov.errors import UserError
from nf1prov.provenance import code_snapshot, commit
from tests.conftest import REPO_ROOT, run_git
from tests.test_provenance_flow import BIN, break_forward, subprocess_env, wait_for

BROKEN = "the committed code ran"


def only_run(client):
    (run,) = tracking.model_runs(client)
    return run


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """nf1prov installed from a wheel of this checkout into a folder of its own (what a shared
    lab venv or `pip install git+...` gives): not the repository being trained in."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(REPO_ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("nf1prov-*.whl")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    return site


def test_a_wheel_installed_elsewhere_trains_the_commits_code(project, tracking_uri,
                                                             wheel_site):
    break_forward(project, BROKEN)
    env = {**subprocess_env(tracking_uri), "PYTHONPATH": str(wheel_site)}
    probe = subprocess.run([sys.executable, "-P", "-c", "import nf1prov; print(nf1prov.__file__)"],
                           cwd=project, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(wheel_site))  # the CLI below runs the wheel's nf1prov
    proc = subprocess.run([sys.executable, "-P", "-m", "nf1prov", "train", "--config",
                           "configs/tiny.toml"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = only_run(tracking.client(tracking_uri))
    assert run.info.status == "FAILED" and BROKEN in run.data.tags[tracking.FAILURE]
    sha = run.data.tags[tracking.GIT_COMMIT]
    assert BROKEN in run_git(project, "show", f"{sha}:models/unet.py")


def test_an_edit_made_while_waiting_for_the_lock_is_committed_and_is_what_runs(project,
                                                                              tracking_uri):
    client = tracking.client(tracking_uri)
    with commit.commit_lock(project):  # another training is committing
        proc = subprocess.Popen([str(BIN / "nf1prov"), "train", "--config", "configs/tiny.toml"],
                                cwd=project, env=subprocess_env(tracking_uri),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: tracking.model_runs(client), what="the run (preflight done)")
        break_forward(project, BROKEN)  # the user edits while the training waits
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    run = only_run(client)
    assert run.info.status == "FAILED" and BROKEN in run.data.tags[tracking.FAILURE]
    assert BROKEN in run_git(project, "show", f"{run.data.tags[tracking.GIT_COMMIT]}:"
                                               "models/unet.py")


def test_an_edit_right_after_the_commit_never_runs(project, tracking_uri):
    """A post-commit hook repairs the work tree at once; the committed (broken) code is still
    what trains, including `models`, which the trainer imports only after the commit."""
    break_forward(project, BROKEN)
    good = REPO_ROOT / "models" / "unet.py"
    hook = project / ".git" / "hooks" / "post-commit"
    hook.write_text(f"#!/bin/sh\ncp '{good}' models/unet.py\n")
    hook.chmod(0o755)
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml"])
    assert result.exit_code == 1, result.output
    run = only_run(tracking.client(tracking_uri))
    assert BROKEN in run.data.tags[tracking.FAILURE]
    assert git.paths_differing_from(project, run.data.tags[tracking.GIT_COMMIT]) == \
        ["models/unet.py"]


def test_checkouts_retrain_line_runs_the_checked_out_models_code(project, tracking_uri,
                                                                 tmp_path, data_root):
    """`checkout --worktree` prints a retrain line; run verbatim in a shell it trains the
    model's code, not the main tree's (broken since) nor the installed nf1prov.

    The repository uses SHA-256 object names (`git init --object-format=sha256`): train,
    catalog, show, checkout --worktree and the retraining all work with 64-hex commits."""
    shutil.rmtree(project / ".git")
    run_git(project, "init", "--quiet", "--object-format=sha256", "--initial-branch=main")
    client = tracking.client(tracking_uri)
    shutil.copytree(data_root, project / "data")
    with (project / ".gitignore").open("a") as handle:
        handle.write("/data/\n")
    (project / "configs" / "tiny.toml").write_text(
        (project / "configs" / "tiny.toml").read_text().replace(f'"{data_root}"', '"data"'))
    first = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml"])
    assert first.exit_code == 0, first.output
    name = only_run(client).info.run_name
    sha = only_run(client).data.tags[tracking.GIT_COMMIT]
    assert len(sha) == 64 and git.tag_sha(project, f"model/{name}") == sha
    catalogue = CliRunner().invoke(cli, ["catalog", "--commit"])
    assert catalogue.exit_code == 0, catalogue.output
    assert f"**Commit:** `{sha}`" in (project / "README.md").read_text()
    shown = CliRunner().invoke(cli, ["show", name, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["commit"] == sha
    break_forward(project, "the main tree's code ran")
    run_git(project, "commit", "-qam", "break the main tree")

    checkout = CliRunner().invoke(cli, ["checkout", name, "--worktree", str(tmp_path / "eel")])
    assert checkout.exit_code == 0, checkout.output
    lines = checkout.output.splitlines()
    line = lines[lines.index("Retrain it with:") + 1].strip()
    assert line.startswith(f"cd {tmp_path / 'eel'} && nf1prov train --config ")
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=subprocess_env(tracking_uri),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    retrained = tracking.model_runs(client)[0]
    assert retrained.info.status == "FINISHED" and retrained.info.run_name != name
    assert retrained.data.params["data.root"] == str((project / "data").resolve())
    assert run_git(tmp_path / "eel", "rev-parse", "HEAD") == \
        retrained.data.tags[tracking.GIT_COMMIT]


def test_ctrl_c_while_waiting_for_the_lock_says_what_exists(project, tracking_uri):
    client = tracking.client(tracking_uri)
    git.stage_all(project)
    base = git.commit(project, "base\n")
    with commit.commit_lock(project):
        proc = subprocess.Popen([str(BIN / "nf1prov"), "train", "--config", "configs/tiny.toml"],
                                cwd=project, env=subprocess_env(tracking_uri),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run = wait_for(lambda: tracking.model_runs(client), what="the run")[0]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)  # slow under a loaded suite, not stuck
    assert proc.returncode == 130, err
    assert "--resume" not in err and "run the same `nf1prov train` command again" in err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and tracking.GIT_COMMIT not in run.data.tags
    assert git.head_sha(project) == base and run_git(project, "tag") == ""


def test_a_module_from_elsewhere_fails_the_check(tmp_path, monkeypatch):
    code_root = tmp_path / "snapshot"
    (code_root / "models").mkdir(parents=True)
    (code_root / "models" / "__init__.py").write_text("")
    code_snapshot.check_modules_from(REPO_ROOT)  # this test process imports from here
    stray = types.ModuleType("models.stray")
    stray.__file__ = str(tmp_path / "elsewhere" / "stray.py")
    monkeypatch.setitem(sys.modules, "models.stray", stray)
    assert ("models.stray", stray.__file__) in code_snapshot.foreign_modules(REPO_ROOT)
    with pytest.raises(UserError, match="models.stray from .*elsewhere"):
        code_snapshot.check_modules_from(REPO_ROOT)


def test_the_snapshot_is_the_commits_bytes_and_read_only(project):
    git.stage_all(project)
    sha = git.commit(project, "base\n")
    (project / "models" / "unet.py").write_text("# edited after the commit\n")
    with code_snapshot.snapshot(project, sha) as folder:
        unet = folder / "models" / "unet.py"
        assert unet.read_text() == run_git(project, "show", f"{sha}:models/unet.py") + "\n"
        assert not os.access(unet, os.W_OK) or os.geteuid() == 0
        assert not unet.stat().st_mode & 0o222
        assert (folder / "nf1prov" / "provenance" / "training.py").is_file()
    assert not folder.exists()
