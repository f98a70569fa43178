"""Shared fixtures: a hermetic git identity, real temp git repositories and real sqlite MLflow
stores (copied from one store migrated once per session, since creating one costs ~1.5 s)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Real lab servers (PostgreSQL, S3 via moto, `mlflow server`), see tests/lab_servers.py. Imported
# by name rather than through `pytest_plugins`: tests/ is no package, and pytest refuses
# `pytest_plugins` in a conftest it meets during collection (e.g. `pytest .` from the root).
from tests.lab_servers import make_mlflow_server, mlflow_server, postgres, s3  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]


# The modules whose tests take longest (many trainings in subprocesses), longest first: run
# before the rest, so that with `--dist worksteal` (Makefile) the other worker takes the short
# tests meanwhile and no long test starts last (a worker idling while one long test ends).
LONGEST_FIRST = ("test_lab_store", "test_distributed", "test_provenance_flow", "test_dogfood",
                 "test_reproduce", "test_search_workers", "test_trainer",
                 "test_store_concurrency", "test_mlflow_model", "test_code_that_ran",
                 "test_demo")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


def hermetic_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """No git config of the machine's, a fixed test identity, no MLflow run or store inherited:
    what every test runs in (`hermetic_git`), and what a module-scoped fixture that trains must
    set up itself (it is set up before any test's function-scoped fixtures)."""
    empty = tmp_path_factory.getbasetemp() / "empty-gitconfig"
    empty.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var, value in {
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.com",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(autouse=True)
def hermetic_git(monkeypatch, tmp_path_factory):
    """Tests never see the machine's git config; they commit as a fixed test identity."""
    hermetic_environment(monkeypatch, tmp_path_factory)


@pytest.fixture(autouse=True)
def signals_as_in_a_terminal():
    """Each test starts with Python's own Ctrl-C handler, as a process started from a terminal
    has: pytest-xdist's workers ignore SIGINT, and their subprocesses would inherit that (a
    Ctrl-C test then passed or hung depending on whether an earlier test in the same worker
    happened to reinstall the handler). A test must leave SIGINT and SIGTERM as it found them
    (a leak would reach later tests' subprocesses): the culprit fails here, by name."""
    import signal

    handled = (signal.SIGINT, signal.SIGTERM)
    found = {signum: signal.getsignal(signum) for signum in handled}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {signum: signal.getsignal(signum) for signum in handled}
    yield
    after = {signum: signal.getsignal(signum) for signum in handled}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(handled)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, handled)
    for signum, handler in found.items():
        signal.signal(signum, handler)
    if after != before or blocked:
        pytest.fail(f"the test left signal handlers {after} (found {before}), blocked "
                    f"{sorted(blocked)}")


def run_git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path) -> Path:
    """An empty git repository (branch main, no commits) in a temp dir."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run_git(repo, "init", "--quiet", "--initial-branch=main")
    return repo


def shared_once(tmp_path_factory, name: str, make) -> tuple[Path, object]:
    """``make(folder)`` run once per test session in a fresh ``folder``, shared by every
    pytest-xdist worker: the first to ask makes it under a file lock, the others wait and reuse
    it, and so does a module-scoped fixture that pytest sets up a second time (`--dist
    worksteal` can interleave modules on one worker). Returns (folder, what ``make`` returned,
    which must be JSON). Whoever uses the folder must not change it: copy it first."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / f"shared-{name}"
    made = root / f"shared-{name}.json"
    with FileLock(f"{folder}.lock"):
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a worker whose make failed
            folder.mkdir()
            made.write_text(json.dumps(make(folder)))
    return folder, json.loads(made.read_text())


def _migrate_store(folder: Path) -> None:
    import mlflow

    # The Default experiment's artifact location is ./mlruns of the directory the store is
    # created in: create it in the temp dir, not in the repository the tests run from.
    before = os.getcwd()
    os.chdir(folder)
    try:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        client.search_experiments()  # creates and migrates the schema
    finally:
        os.chdir(before)


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """An empty sqlite store at MLflow's newest schema: tests copy it (`tracking_uri`)."""
    folder, _ = shared_once(tmp_path_factory, "store-template", _migrate_store)
    return folder / "mlflow.db"


@pytest.fixture
def tracking_uri(tmp_path, _migrated_store, monkeypatch) -> str:
    """A fresh, real sqlite MLflow store for this test; also set as MLFLOW_TRACKING_URI.

    Artifacts go to <tmp>/mlartifacts (MLflow's default for a sqlite store is ./mlartifacts
    relative to the working directory, which the test also moves into tmp_path).
    """
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_migrated_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def one_thread():
    """One torch intra-op thread: faster on a shared 2-core machine, fixed reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (3 patients x 2 sites, 5x48x48), shared read-only by tests."""
    from nf1prov.data.synthetic import write_demo_dataset

    def write(folder: Path) -> None:
        write_demo_dataset(folder, patients=3, sites=2, slices=5, height=48, width=48, seed=0)

    return shared_once(tmp_path_factory, "demo-data", write)[0]


def tiny_config(data_root: Path, epochs: int = 1, patience: int = 5) -> str:
    return f"""[experiment]
name = "flow"

[data]
root = "{data_root}"
holdout_patients = []
input_slices = 3
crop_size = 32
crop_stride = 16
split_fractions = [0.6, 0.4, 0.0]

[model]
base_width = 4

[train]
epochs = {epochs}
patience = {patience}
batch_size = 4
learning_rate = 3e-3
device = "cpu"
weight_samples = 4
overlay_crops = 1
max_batches_per_epoch = 2

# the instance parameters as given: choosing them costs each training process about a CPU
# second; tests/test_trainer.py and the demo and dogfood tests (shipped configs) choose them
[postprocess]
tune = false

[description]
architecture = "UNet (width 4)"
task = "Three-to-One slice segmentation mask prediction"
data = ["Synthetic organoids", "Masks:", ["Background", "Inner-cell", "Cell-boundary"]]
"""


def copy_code(destination: Path) -> None:
    """This checkout's nf1prov/ and models/ packages: what a model commit must hold to train."""
    for package in ("nf1prov", "models"):
        shutil.copytree(REPO_ROOT / package, destination / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def project_files(repo: Path, data_root: Path) -> None:
    """What the `project` fixture puts in its repository: the code, templates, configs/tiny.toml
    (data in ``data_root``), a .gitignore and the MLproject file."""
    copy_code(repo)
    shutil.copytree(REPO_ROOT / "templates", repo / "templates")
    (repo / "configs").mkdir()
    (repo / "configs" / "tiny.toml").write_text(tiny_config(data_root))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmlruns/\n.nf1prov/\n"
                                     "__pycache__/\n")
    shutil.copy(REPO_ROOT / "MLproject", repo / "MLproject")


@pytest.fixture
def project(git_repo, tracking_uri, data_root, monkeypatch) -> Path:
    """A minimal nf1prov project in a fresh repository (no commits yet), the CLI run inside it,
    the store a fresh sqlite file outside it and the data outside it too. Training runs in a
    subprocess with one torch thread (OMP_NUM_THREADS)."""
    project_files(git_repo, data_root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(git_repo)
    return git_repo


def copy_workspace(template: Path, destination: Path) -> None:
    """Copy a folder laid out as `project` leaves one (repo/, mlflow.db, mlartifacts/, made by a
    module-scoped fixture that trained there once) into ``destination`` (a test's tmp_path), and
    point the copied store's artifact locations at the copied artifacts: the test may change
    the repository, the store and the artifacts as if it had trained there itself."""
    import sqlite3

    shutil.copytree(template, destination, symlinks=True, dirs_exist_ok=True)
    old, new = f"{template}/", f"{destination}/"
    with contextlib.closing(sqlite3.connect(destination / "mlflow.db")) as conn, conn:
        conn.execute("UPDATE experiments SET artifact_location = "
                     "replace(artifact_location, ?, ?)", (old, new))
        conn.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        conn.execute("UPDATE logged_models SET artifact_location = "
                     "replace(artifact_location, ?, ?)", (old, new))
        conn.execute("UPDATE model_versions SET storage_location = "
                     "replace(storage_location, ?, ?)", (old, new))


def train_once(tmp_path_factory, migrated_store: Path, data_root: Path, name: str, train):
    """For a module-scoped fixture: a fresh folder laid out as the `project` and `tracking_uri`
    fixtures lay out a test's tmp_path (repo/ with `project_files`, mlflow.db, mlartifacts/),
    and ``train(repo)`` called there in the hermetic environment (one torch thread, the store
    as MLFLOW_TRACKING_URI), once for all xdist workers (`shared_once`: ``train`` returns JSON).
    Returns (the folder, what ``train`` returned); `use_workspace` gives each test its own
    copy."""
    import mlflow

    def make(base: Path):
        repo = base / "repo"
        repo.mkdir()
        shutil.copyfile(migrated_store, base / "mlflow.db")
        uri = f"sqlite:///{base / 'mlflow.db'}"
        with pytest.MonkeyPatch.context() as mp:
            hermetic_environment(mp, tmp_path_factory)
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("OMP_NUM_THREADS", "1")
            mp.chdir(repo)
            mlflow.set_tracking_uri(uri)
            run_git(repo, "init", "--quiet", "--initial-branch=main")
            project_files(repo, data_root)
            return train(repo)

    return shared_once(tmp_path_factory, name, make)


def use_workspace(base: Path, tmp_path: Path, monkeypatch) -> str:
    """Copy a `train_once` folder into the test's tmp_path (`copy_workspace`) and work there, as
    if the test had trained in `project`; returns the copy's tracking URI."""
    import mlflow

    copy_workspace(base, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path / "repo")
    mlflow.set_tracking_uri(uri)
    return uri


class SmallDisk:
    """A real filesystem of its own (a tmpfs) mounted at ``path``: `fill` takes all of its free
    space (as a growing dataset or log would), `free` gives it back."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        import errno

        with open(self.filler, "ab", buffering=0) as out:
            for chunk in (1 << 20, 1 << 12, 1):
                try:
                    while True:
                        out.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        assert shutil.disk_usage(self.path).free == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk():
    """``mount(path, size="64m", required=True)``: a real full-disk-to-be (`SmallDisk`, a tmpfs)
    at ``path``, unmounted after the test. Mounting needs root (CI's container runs as root):
    elsewhere the test is skipped, or with ``required=False`` ``mount`` returns None."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "64m", required: bool = True) -> SmallDisk | None:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(path)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            if required:
                pytest.skip("a full disk needs a filesystem of its own, and `mount -t tmpfs` "
                            f"failed here (needs root): {proc.stderr.strip()}")
            return None
        mounted.append(path)
        return SmallDisk(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(path)], check=False)
