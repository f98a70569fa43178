"""checkout and resolve against a real git repository and a real sqlite MLflow store."""

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import FileInfo

from models.unet import UNet
from nf1prov import tracking, weights
from nf1prov.cli import cli
from nf1prov.config import defaults, to_toml
from nf1prov.errors import UserError
from nf1prov.provenance.checkout import checkout_model, download_artifacts, safe_artifact_path
from nf1prov.provenance.resolve import resolve_model
from nf1prov.train.trainer import log_model

IDENTITY = {"GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "T",
            "GIT_COMMITTER_EMAIL": "t@e"}


def git(cwd, *args):
    env = {**IDENTITY, "PATH": "/usr/bin:/bin", "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_model_run(client, experiment_id, codename, sha, kind="model", with_model=True):
    run = client.create_run(experiment_id, run_name=codename)
    run_id = run.info.run_id
    for key, value in {tracking.KIND: kind, tracking.CODENAME: codename,
                       tracking.GIT_COMMIT: sha, tracking.GIT_TAG: f"model/{codename}"}.items():
        client.set_tag(run_id, key, value)
    client.log_param(run_id, "data.root", "/data/nf1")
    if with_model:
        with mlflow.start_run(run_id=run_id):
            torch.manual_seed(0)
            model = UNet(in_channels=3, base_width=4).eval()
            log_model(model)
            mlflow.log_text(to_toml(defaults()), "config/config.toml")
            mlflow.log_text("patient,split\nNF0016_T1,train\n", "manifest/split_manifest.csv")
            mlflow.log_text("not downloaded by default", "overlays/epoch_000/a.png")
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def world(tmp_path_factory, _migrated_store):
    """A repo with two model commits (tags model/<codename>) and a store with their runs."""
    base = tmp_path_factory.mktemp("world")
    repo = base / "repo"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    (repo / ".gitignore").write_text(".nf1prov/\nmlflow.db\n")
    (repo / "train.py").write_text("version = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first model")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "train.py").write_text("version = 2\n")
    git(repo, "commit", "-qam", "second model")
    second = git(repo, "rev-parse", "HEAD")
    db = base / "mlflow.db"
    shutil.copyfile(_migrated_store, db)
    uri = f"sqlite:///{db}"
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, "nf1", uri)
    first_id = make_model_run(client, experiment_id, "fearless-eel-256", first)
    second_id = make_model_run(client, experiment_id, "brave-owl-12", second, with_model=False)
    git(repo, "tag", "model/fearless-eel-256", first)
    git(repo, "tag", "model/brave-owl-12", second)
    return {"repo": repo, "uri": uri, "first": (first_id, first), "second": (second_id, second)}


@pytest.fixture
def repo(world, tmp_path, monkeypatch):
    copy = tmp_path / "repo"
    shutil.copytree(world["repo"], copy, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    mlflow.set_tracking_uri(world["uri"])
    return copy


def snapshot(repo: Path) -> dict:
    files = {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*")
             if p.is_file() and ".git" not in p.relative_to(repo).parts}
    return {"files": files, "head": git(repo, "rev-parse", "HEAD"),
            "index": (repo / ".git" / "index").read_bytes(),
            "status": git(repo, "status", "--porcelain")}


def test_resolve_by_codename_run_id_and_tag(world, repo):
    client = tracking.client(world["uri"])
    run_id, sha = world["first"]
    for ref in ("fearless-eel-256", run_id, "model/fearless-eel-256"):
        model = resolve_model(client, ref, repo_root=repo)
        assert (model.run_id, model.sha, model.codename) == (run_id, sha, "fearless-eel-256")


def test_unknown_codename_suggests_close_ones(world):
    client = tracking.client(world["uri"])
    with pytest.raises(UserError, match="Closest known: fearless-eel-256"):
        resolve_model(client, "fearless-eel-265")


def test_ambiguous_codename_lists_runs(world, tmp_path, _migrated_store):
    db = tmp_path / "amb.db"
    shutil.copyfile(_migrated_store, db)
    uri = f"sqlite:///{db}"
    client = tracking.client(uri)
    ids = [make_model_run(client, tracking.ensure_experiment(client, name, uri), "calm-cat-1",
                          "a" * 40, with_model=False) for name in ("exp-a", "exp-b")]
    with pytest.raises(UserError, match="--run-id") as excinfo:
        resolve_model(client, "calm-cat-1")
    assert all(i in str(excinfo.value) for i in ids) and "exp-b" in str(excinfo.value)
    assert resolve_model(client, "calm-cat-1", run_id=ids[1]).run_id == ids[1]


def test_option_like_codename_is_refused_before_git(world, repo):
    client = tracking.client(world["uri"])
    with pytest.raises(UserError, match="not a model codename"):
        resolve_model(client, "--upload-pack=x", repo_root=repo)
    result = CliRunner().invoke(cli, ["checkout", "--", "--upload-pack=touch pwned"])
    assert result.exit_code != 0 and not (repo / "pwned").exists()


def test_missing_commit_says_what_to_fetch(world, repo):
    client = tracking.client(world["uri"])
    git(repo, "tag", "-d", "model/brave-owl-12")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    with pytest.raises(UserError, match="git fetch origin tag model/brave-owl-12"):
        resolve_model(client, "brave-owl-12", repo_root=repo)


def test_checkout_on_dirty_tree_changes_nothing(world, repo, monkeypatch):
    (repo / "train.py").write_text("work in progress\n")
    (repo / "new_module.py").write_text("x = 1\n")
    before = snapshot(repo)
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(cli, ["checkout", "fearless-eel-256"])
    assert result.exit_code == 2
    assert "train.py" in result.output and "new_module.py" in result.output
    assert snapshot(repo) == before


def test_checkout_switches_clean_tree_and_loads_model(world, repo, monkeypatch):
    monkeypatch.chdir(repo)
    result = CliRunner().invoke(cli, ["checkout", "fearless-eel-256"])
    assert result.exit_code == 0, result.output
    run_id, sha = world["first"]
    assert git(repo, "rev-parse", "HEAD") == sha
    assert (repo / "train.py").read_text() == "version = 1\n"
    assert git(repo, "status", "--porcelain") == ""  # downloads are ignored
    folder = repo / ".nf1prov" / "models" / "fearless-eel-256"
    assert (folder / "config" / "config.toml").is_file()
    assert not (folder / "overlays").exists()
    assert "nf1prov train --config .nf1prov/models/fearless-eel-256/config/config.toml" \
        in result.output and "--data-root /data/nf1" in result.output
    model = weights.load(folder / "model", ref="fearless-eel-256")
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    # the folder says which run it holds: predictions from it name their model
    from nf1prov.provenance.models import load_model

    loaded = load_model(str(folder / "model"), device="cpu")
    assert (loaded.codename, loaded.run_id, loaded.sha) == ("fearless-eel-256", run_id, sha)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # Idempotent: a second checkout of the same model succeeds and changes nothing.
    again = CliRunner().invoke(cli, ["checkout", "fearless-eel-256"])
    assert again.exit_code == 0, again.output


def test_worktree_checkout_leaves_current_tree_alone(world, repo, tmp_path):
    client = tracking.client(world["uri"])
    (repo / "train.py").write_text("dirty is fine here\n")
    before = snapshot(repo)
    model = resolve_model(client, "fearless-eel-256", repo_root=repo)
    out = checkout_model(repo, client, model, worktree=tmp_path / "wt")
    assert git(tmp_path / "wt", "rev-parse", "HEAD") == world["first"][1]
    weights = list((out.artifacts / "model").rglob("*.pth")) + \
        list((out.artifacts / "model").rglob("*.pt"))
    assert weights and all(w.stat().st_size > 0 for w in weights)
    assert snapshot(repo) == before
    with pytest.raises(UserError, match="not empty"):
        checkout_model(repo, client, model, worktree=tmp_path / "wt")


def test_a_worktree_inside_the_repository_is_refused(world, repo):
    """The next model commit would record it as a gitlink, not its files."""
    client = tracking.client(world["uri"])
    before = snapshot(repo)
    model = resolve_model(client, "fearless-eel-256", repo_root=repo)
    with pytest.raises(UserError, match="inside the repository.*--worktree ../fearless-eel-256"):
        checkout_model(repo, client, model, worktree=repo / "checkouts" / "eel")
    assert snapshot(repo) == before
    assert len(git(repo, "worktree", "list").splitlines()) == 1
    # A git-ignored folder is fine: git never records it (the demo checks out that way).
    (repo / ".git" / "info" / "exclude").write_text("/checkouts/\n")
    checkout_model(repo, client, model, worktree=repo / "checkouts" / "eel")
    assert git(repo / "checkouts" / "eel", "rev-parse", "HEAD") == world["first"][1]


def scratch_run(tmp_path, _migrated_store, sha: str, diff: str | None):
    """A store holding one --no-commit run trained on a dirty tree at ``sha``, with ``diff``
    as its git/uncommitted.diff (None: none logged); (client, run ID)."""
    db = tmp_path / "scratch.db"
    shutil.copyfile(_migrated_store, db)
    uri = f"sqlite:///{db}"
    client = tracking.client(uri)
    run_id = make_model_run(client, tracking.ensure_experiment(client, "nf1", uri),
                            "scratchy-cat-3", sha, kind="scratch", with_model=False)
    client.set_tag(run_id, tracking.GIT_DIRTY, "true")
    if diff is not None:
        client.log_text(run_id, diff, "git/uncommitted.diff")
    return client, run_id


def made_diff(repo: Path, change) -> str:
    """What `train --no-commit` logs after ``change(repo)``; the repository is put back."""
    from nf1prov.provenance.scratch_code import make_diff

    change(repo)
    before = snapshot(repo)
    diff = make_diff(repo)
    assert snapshot(repo) == before  # the real index was never touched
    for path in repo.iterdir():
        if path.name not in (".git", ".gitignore", "train.py"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    git(repo, "checkout", "--", "train.py")
    return diff


def test_scratch_run_worktree_gets_its_base_commit_plus_its_diff(world, repo, tmp_path,
                                                                _migrated_store):
    def change(tree):
        (tree / "train.py").write_text("version = 2, edited\n")
        (tree / "new module.py").write_text("x = 1\n")  # untracked: its content too
        (tree / "data").mkdir()
        (tree / "data" / "table.bin").write_bytes(bytes(range(256)))

    sha = world["second"][1]
    client, run_id = scratch_run(tmp_path, _migrated_store, sha, made_diff(repo, change))
    model = resolve_model(client, run_id, repo_root=repo)
    before = snapshot(repo)
    with pytest.raises(UserError, match="plus the changes in its git/uncommitted.diff"):
        checkout_model(repo, client, model)  # in place: refused, nothing changed
    assert snapshot(repo) == before

    out = checkout_model(repo, client, model, worktree=tmp_path / "wt")

    tree = tmp_path / "wt"
    assert git(tree, "rev-parse", "HEAD") == sha
    assert (tree / "train.py").read_text() == "version = 2, edited\n"
    assert (tree / "new module.py").read_text() == "x = 1\n"
    assert (tree / "data" / "table.bin").read_bytes() == bytes(range(256))
    assert sorted(out.applied) == ["data/table.bin", "new module.py", "train.py"]
    assert snapshot(repo) == before


@pytest.mark.parametrize(("diff", "message"), [
    ("# untracked: notes.py\ndiff --git a/train.py b/train.py\n", "untracked files without "
     "their content \\(notes.py\\)"),
    (None, "logged no git/uncommitted.diff"),
    ("# nf1prov: complete diff against x (untracked files included)\n"
     "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n"
     "-version = 7\n+version = 8\n", "does not apply to its base commit"),
])
def test_scratch_run_whose_code_cannot_be_rebuilt_is_refused(world, repo, tmp_path,
                                                             _migrated_store, diff, message):
    """Never the base commit alone, presented as the run's code."""
    client, run_id = scratch_run(tmp_path, _migrated_store, world["second"][1], diff)
    model = resolve_model(client, run_id, repo_root=repo)
    before = snapshot(repo)
    with pytest.raises(UserError, match=message):
        checkout_model(repo, client, model, worktree=tmp_path / "wt")
    assert not (tmp_path / "wt").exists()
    assert len(git(repo, "worktree", "list").splitlines()) == 1
    assert snapshot(repo) == before


def test_crafted_artifact_paths_are_refused():
    for bad in ("../../etc/passwd", "/etc/passwd", "model/../../x", "a\\..\\b", ""):
        with pytest.raises(UserError, match="Refusing artifact path"):
            safe_artifact_path(bad)
    assert str(safe_artifact_path("model/data/model.pth")) == "model/data/model.pth"


class CraftedStore:
    """A tracking store answering with a listing that climbs out with '..' (as a tampered
    server could); it must be refused before anything is downloaded."""

    def list_artifacts(self, run_id, path=None):
        if path is None:
            return [FileInfo("model", True, None)]
        return [FileInfo("model/../../../outside.txt", False, 3)]

    def download_artifacts(self, *args):  # pragma: no cover - must never be reached
        raise AssertionError("downloaded a refused path")


def test_download_refuses_crafted_listing(tmp_path, world):
    run = tracking.client(world["uri"]).get_run(world["second"][0])
    with pytest.raises(UserError, match="Refusing artifact path"):
        download_artifacts(CraftedStore(), run, tmp_path / "models" / "x")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert not (tmp_path / "outside.txt").exists()
