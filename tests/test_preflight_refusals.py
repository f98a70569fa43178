"""What `nf1prov train` refuses before anything exists (exit 2, no run, no commit, no tag, index
and work tree untouched): repository states a model commit would corrupt, files that must
never be committed, data that would be, holdout stacks that are broken. Also the allowed
cases, checked with `preflight` itself (no training needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import git, tracking
from nf1prov.cli import cli
from nf1prov.errors import UserError
from nf1prov.provenance import own_output, preflight
from tests.conftest import run_git
from tests.test_provenance_flow import subprocess_env


def train(*args, expect=2):
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml", *args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


def state(repo: Path, client):
    index = git.index_path(repo)
    return (git.head_sha(repo), index.read_bytes() if index.exists() else None,
            git.status_porcelain(repo), run_git(repo, "tag"),
            [r.info.run_id for r in tracking.search_runs_all(client)])


@pytest.fixture
def committed(project):
    git.stage_all(project)
    git.commit(project, "base\n")
    return project


def refused(repo, tracking_uri, *args) -> str:
    client = tracking.client(tracking_uri)
    before = state(repo, client)
    result = train(*args)
    assert state(repo, client) == before
    return result.output


# --- operations in progress -------------------------------------------------------------------


def _conflict(repo: Path) -> str:
    """Two branches changing the same line; returns the other branch's name."""
    (repo / "shared.txt").write_text("base\n")
    run_git(repo, "add", "shared.txt")
    run_git(repo, "commit", "-qm", "shared")
    run_git(repo, "checkout", "-qb", "other")
    (repo / "shared.txt").write_text("other\n")
    run_git(repo, "commit", "-qam", "other side")
    run_git(repo, "checkout", "-q", "main")
    (repo / "shared.txt").write_text("main\n")
    run_git(repo, "commit", "-qam", "main side")
    return "other"


def _resolve(repo: Path) -> None:
    (repo / "shared.txt").write_text("resolved\n")
    run_git(repo, "add", "shared.txt")


def _merge(repo):
    git.git("merge", _conflict(repo), cwd=repo, check=False)
    _resolve(repo)
    return "a merge", "git merge --continue"


def _rebase(repo):
    other = _conflict(repo)
    git.git("rebase", other, cwd=repo, check=False)
    _resolve(repo)
    return "a rebase", "git rebase --continue"


def _cherry_pick(repo):
    other = _conflict(repo)
    git.git("cherry-pick", other, cwd=repo, check=False)
    _resolve(repo)
    return "a cherry-pick", "git cherry-pick --continue"


def _revert(repo):
    (repo / "shared.txt").write_text("one\n")
    run_git(repo, "add", "shared.txt")
    run_git(repo, "commit", "-qm", "one")
    (repo / "shared.txt").write_text("two\n")
    run_git(repo, "commit", "-qam", "two")
    git.git("revert", "--no-edit", "HEAD~1", cwd=repo, check=False)
    _resolve(repo)
    return "a revert", "git revert --continue"


def _bisect(repo):
    run_git(repo, "commit", "-q", "--allow-empty", "-m", "second")
    run_git(repo, "bisect", "start", "HEAD", "HEAD~1")
    return "a bisect", "git bisect reset"


@pytest.mark.parametrize("operation", [_merge, _rebase, _cherry_pick, _revert, _bisect])
def test_operation_in_progress_is_refused(committed, tracking_uri, operation):
    what, finish = operation(committed)
    output = refused(committed, tracking_uri)
    assert f"in the middle of {what}" in output and finish in output


# --- files that must never be committed -------------------------------------------------------


@pytest.mark.parametrize("name,content", [
    (".env", "TOKEN=abc\n"),
    ("config/.env.production", "TOKEN=abc\n"),
    ("id_rsa", "key\n"),
    ("deploy/server.pem", "cert\n"),
    ("credentials.json", "{}\n"),
    ("notes/key-backup.txt", "-----BEGIN OPENSSH " "PRIVATE KEY-----\nabc\n"  # split: this
                             "-----END OPENSSH " "PRIVATE KEY-----\n"),  # file holds no key
])
def test_files_that_look_like_secrets_are_refused(committed, tracking_uri, name, content):
    path = committed / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    output = refused(committed, tracking_uri)
    assert name in output and "look like secrets" in output and ".gitignore" in output


@pytest.mark.parametrize("name", ["mydata/NF0001_T1/zstack_images/A1-1/A1-1_TRANS.tif",
                                  "predictions/NF0014_T1/C4-1_labels.ome.tiff",
                                  "weights/best.pt", "cache/stack.npy", "export.zip"])
def test_new_files_that_look_like_data_are_refused_anywhere(committed, tracking_uri, name):
    """Not only the data root: a copy of the dataset, predictions, weights, arrays."""
    path = committed / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 64)
    output = refused(committed, tracking_uri)
    assert name in output and "look like data or weights" in output


def test_a_staged_secret_is_told_to_leave_the_index(committed, tracking_uri):
    (committed / ".env").write_text("TOKEN=abc\n")
    run_git(committed, "add", ".env")
    with (committed / ".gitignore").open("a") as handle:
        handle.write(".env\n")
    output = refused(committed, tracking_uri)
    assert "git rm --cached -- .env" in output


def test_a_holdout_patient_with_no_folder_is_reported_not_refused(committed, tracking_uri,
                                                                  capsys):
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri,
                               overrides=['data.holdout_patients=["NF9999", "NF0014"]'])
    fields = preflight.check_data(plan.config, plan.data_root)
    assert fields and all(not f.patient.startswith("NF0014") for f in fields)
    err = capsys.readouterr().err
    assert "NF9999" in err and "NF0014" not in err.split("NF9999")[1].split("\n")[0]


def test_a_committed_lookalike_is_allowed_and_so_is_an_ignored_secret(committed,
                                                                     tracking_uri):
    (committed / ".env.example").write_text("TOKEN=<your token>\n")
    output = refused(committed, tracking_uri)
    assert ".env.example" in output and ".nf1prov-allow-secrets" in output
    # What the message says to do: allow the false positive (reviewed, in the commit); ignore
    # the real secret.
    (committed / ".nf1prov-allow-secrets").write_text(".env.example  # placeholders only\n")
    (committed / ".env").write_text("TOKEN=real\n")
    with (committed / ".gitignore").open("a") as handle:
        handle.write(".env\n")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    assert plan.root == committed
    # A file already committed is not judged by its name again (its new lines still are).
    run_git(committed, "add", ".env.example", ".gitignore")
    run_git(committed, "commit", "-qm", "example env")
    (committed / ".nf1prov-allow-secrets").unlink()
    (committed / ".env.example").write_text("TOKEN=<your token>\nOTHER=<x>\n")
    assert preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)


def test_an_embedded_repository_is_refused(committed, tracking_uri, tmp_path):
    run_git(committed, "worktree", "add", "-q", "--detach", str(committed / "inner"))
    output = refused(committed, tracking_uri)
    assert "inner" in output and "gitlink" in output


# --- submodules: the commit records a gitlink, so the submodule's own edits are refused ------


def _submodule(repo: Path, tmp_path: Path) -> Path:
    """A real submodule lib/helpers (added from a local repository) committed in ``repo``."""
    source = tmp_path / "helpers-source"
    source.mkdir()
    run_git(source, "init", "-q", "--initial-branch=main")
    (source / "helpers.py").write_text("SCALE = 1\n")
    run_git(source, "add", "helpers.py")
    run_git(source, "commit", "-qm", "helpers")
    run_git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(source),
            "lib/helpers")
    run_git(repo, "commit", "-qm", "the helpers submodule")
    return repo / "lib" / "helpers"


def test_a_dirty_submodule_is_refused(committed, tracking_uri, tmp_path):
    helpers = _submodule(committed, tmp_path)
    (helpers / "helpers.py").write_text("SCALE = 2\n")
    output = refused(committed, tracking_uri)
    assert "lib/helpers (modified files)" in output
    assert "git submodule update --force -- lib/helpers" in output
    # untracked files too, even when .gitmodules tells `git status` to ignore the submodule
    run_git(helpers, "checkout", "-q", "--", "helpers.py")
    (helpers / "scratch.py").write_text("SCALE = 3\n")
    run_git(committed, "config", "-f", ".gitmodules", "submodule.lib/helpers.ignore", "all")
    output = refused(committed, tracking_uri)
    assert "lib/helpers (untracked files)" in output


def test_a_submodule_at_another_commit_passes(committed, tracking_uri, tmp_path):
    """Its work tree is a commit of its own: the model commit records that commit."""
    helpers = _submodule(committed, tmp_path)
    (helpers / "helpers.py").write_text("SCALE = 2\n")
    run_git(helpers, "commit", "-qam", "scale 2")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
    assert plan.root == committed and git.dirty_submodules(committed) == []
    assert [path for _, path in git.status_porcelain(committed)] == ["lib/helpers"]


# --- the user's own redirect or pipeline writing into the repository -------------------------


@pytest.mark.parametrize("command, written", [
    ("nf1prov train --config configs/tiny.toml --json > model.json", "model.json"),
    ("nf1prov train --config configs/tiny.toml 2>&1 | tee train.log", "train.log"),
])
def test_the_commands_own_output_file_is_refused(committed, tracking_uri, command, written):
    """The README's `--json > model.json` and `| tee train.log` run inside the repository: the
    shell makes the file before nf1prov starts, and preflight refuses it before any run."""
    client = tracking.client(tracking_uri)
    before = (git.head_sha(committed), git.index_path(committed).read_bytes(),
              run_git(committed, "tag"), tracking.search_runs_all(client))
    done = subprocess.run(["sh", "-c", command], cwd=committed, env=subprocess_env(tracking_uri),
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert (git.head_sha(committed), git.index_path(committed).read_bytes(),
            run_git(committed, "tag"), tracking.search_runs_all(client)) == before
    output = done.stdout + done.stderr
    assert f"{written} inside" in output and "git-ignored path" in output, output


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="reads Linux /proc")
def test_files_open_for_writing_in_this_process_group_are_found(committed):
    """This process's own descriptors and another process of its group (a pipeline's `tee`);
    a file only read is not written."""
    (committed / "read.txt").write_text("x\n")
    rels = ["mine.log", "child.log", "read.txt"]
    with open(committed / "mine.log", "w"), open(committed / "read.txt"):
        child = subprocess.Popen(["sh", "-c", "exec 3>child.log; echo ready; sleep 60"],
                                 cwd=committed, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            assert own_output.being_written(committed, rels) == ["mine.log", "child.log"]
        finally:
            child.kill()
            child.wait()


# --- the data root ----------------------------------------------------------------------------


def test_a_data_root_inside_the_repository_must_be_ignored(committed, tracking_uri, data_root):
    shutil.copytree(data_root, committed / "demo-data")
    output = refused(committed, tracking_uri, "--data-root", "demo-data")
    assert "'/demo-data/'" in output and ".gitignore" in output
    with (committed / ".gitignore").open("a") as handle:
        handle.write("/demo-data/\n")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri,
                               data_root="demo-data")
    assert plan.data_root == (committed / "demo-data").resolve()
    assert "demo-data" not in str(git.status_porcelain(committed))


def test_tracked_data_must_also_leave_the_index(committed, tracking_uri, data_root):
    shutil.copytree(data_root, committed / "data")
    run_git(committed, "add", "data")
    run_git(committed, "commit", "-qm", "oops, the data")
    output = refused(committed, tracking_uri, "--data-root", "data")
    assert "git rm -r --cached data" in output


# --- every stack is checked, the holdout patients' too ----------------------------------------


@pytest.fixture
def own_data(data_root, tmp_path) -> Path:
    copy = tmp_path / "own-data"
    shutil.copytree(data_root, copy)
    return copy


def test_a_missing_holdout_mask_is_refused(committed, tracking_uri, own_data):
    (own_data / "NF0014_T1" / "segmentation_masks" / "C4-1" / "cell_mask.tiff").unlink()
    output = refused(committed, tracking_uri, "--data-root", str(own_data),
                     "--set", 'data.holdout_patients=["NF0014"]')
    assert "NF0014_T1" in output and "C4-1" in output


def test_a_truncated_holdout_stack_is_refused(committed, tracking_uri, own_data):
    image = own_data / "NF0014_T1" / "zstack_images" / "D2-2" / "D2-2_TRANS.tif"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    output = refused(committed, tracking_uri, "--data-root", str(own_data),
                     "--set", 'data.holdout_patients=["NF0014"]')
    assert "D2-2_TRANS.tif" in output


def test_only_holdout_patients_is_an_error_that_says_so(committed, tracking_uri, own_data):
    output = refused(committed, tracking_uri, "--data-root", str(own_data), "--set",
                     'data.holdout_patients=["NF0014", "NF0016", "NF0018"]')
    assert "once the holdout patients" in output


# --- the code must be in the repository -------------------------------------------------------


def test_a_repository_without_the_training_code_is_refused(committed, tracking_uri):
    run_git(committed, "rm", "-rq", "nf1prov")
    run_git(committed, "commit", "-qm", "no toolkit")
    output = refused(committed, tracking_uri)
    assert "nf1prov/__init__.py" in output and "clone of the nf1prov repository" in output


def test_git_ignored_training_code_is_refused(committed, tracking_uri):
    """An unanchored `data/` line ignores nf1prov/data/ too: the commit would lack it."""
    with (committed / ".gitignore").open("a") as handle:
        handle.write("data/\n")
    run_git(committed, "rm", "-rq", "--cached", "nf1prov/data")
    output = refused(committed, tracking_uri)
    assert "nf1prov/data/" in output and ".gitignore:" in output and "'/data/'" in output


def test_an_unknown_architecture_is_refused_naming_the_workspace_models(committed,
                                                                      tracking_uri):
    output = refused(committed, tracking_uri, "--set", "model.architecture=vit")
    assert "--set model.architecture=vit: model.architecture 'vit'" in output
    assert str(committed / "models" / "__init__.py") in output and "known: unet" in output


def test_an_architecture_the_workspace_adds_passes_preflight(committed, tracking_uri):
    """The names come from the repository's own models/ (what the commit will hold), not from
    an installed copy of nf1prov, which knows only its own."""
    init = committed / "models" / "__init__.py"
    init.write_text(init.read_text().replace('ARCHITECTURES = {"unet": UNet}',
                                             'ARCHITECTURES = {"unet": UNet, "wide": UNet}'))
    git.stage_all(committed)
    git.commit(committed, "a second architecture\n")
    plan = preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri,
                               overrides=["model.architecture=wide"])
    assert plan.config["model"]["architecture"] == "wide"


def test_preflight_imports_neither_torch_nor_the_models_package(committed, tracking_uri):
    """The command line's own process stays light (seconds per `train`): the architecture is
    read from the workspace's source, not imported (docs/architecture.md)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from nf1prov.provenance import preflight\n"
            f"plan = preflight.preflight(config_path='configs/tiny.toml', "
            f"tracking_uri={tracking_uri!r})\n"
            "print(sorted(m for m in ('torch', 'models') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=committed, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("source, names", [
    ('from models.unet import UNet\nARCHITECTURES = {"unet": UNet, "b": UNet}\n', ["b", "unet"]),
    ('ARCHITECTURES: dict = {"x": object}\n', ["x"]),
    ("ARCHITECTURES = dict(unet=object)\n", None),  # not a literal: checked when built
    # changed after the literal: the source alone does not settle the names
    ('ARCHITECTURES = {"unet": object}\nARCHITECTURES["tiny"] = object\n', None),
    ('ARCHITECTURES = {"unet": object}\nARCHITECTURES.update(tiny=object)\n', None),
    ('from models.more import ARCHITECTURES\n', None),
    ('ARCHITECTURES = {NAME: object}\n', None),
    ("ARCHITECTURES = {\n", None),  # a syntax error: the training process will report it
    ("", None),
])
def test_architecture_names_are_read_without_importing_models(tmp_path, source, names):
    from nf1prov.provenance.code_snapshot import architecture_names

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(source)
    assert architecture_names(tmp_path) == names


def test_preflight_error_names_the_fix_for_a_refusal(committed, tracking_uri):
    with pytest.raises(UserError, match="--no-commit"):
        _merge(committed)
        preflight.preflight(config_path="configs/tiny.toml", tracking_uri=tracking_uri)
