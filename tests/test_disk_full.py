"""A full disk under the store (issue 24, item 8), on real full filesystems (a small tmpfs,
`small_disk` in conftest.py): one message naming the path and its free space, no traceback,
nothing half-done, and a last checkpoint left whole for `train --resume`.

The training itself on a disk that fills is in tests/test_provenance_flow.py
(`test_sigterm_kills_then_resume_continues_the_same_run`), which already trains."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from click.testing import CliRunner

from nf1prov import errors, git
from nf1prov.cli import cli
from nf1prov.train.trainer import check_room
from tests.conftest import run_git


def test_a_write_to_a_full_disk_names_the_path_and_its_free_space(tmp_path, small_disk):
    disk = small_disk(tmp_path / "store", size="1m")
    disk.fill()
    source = tmp_path / "overlay.png"
    source.write_bytes(b"\x89PNG" * 4096)
    destination = disk.path / "artifacts" / "overlay.png"
    destination.parent.mkdir()
    with pytest.raises(OSError) as caught:
        shutil.copy(source, destination)
    full = errors.disk_full(caught.value)
    assert isinstance(full, errors.UserError)
    assert str(full).startswith(f"The disk holding {destination} is full (0 B free of 1.0 MB)")
    assert "\n" not in str(full)
    assert errors.disk_full(ValueError("a bad value")) is None


def test_the_last_checkpoint_is_not_overwritten_without_room_for_the_new_one(tmp_path,
                                                                             small_disk):
    """Overwriting frees the old file first, so only growth needs room; without it the copy
    would stop half-way and leave neither checkpoint for `--resume`."""
    disk = small_disk(tmp_path / "artifacts", size="1m")
    folder = disk.path / "checkpoints"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"o" * 500_000)
    new = tmp_path / "last.pt"
    new.write_bytes(b"n" * 520_000)
    check_room(new, folder.as_uri())  # 20 KB more, and 500 KB free
    check_room(new, "mlflow-artifacts:/1/abc/artifacts/checkpoints")  # not a local folder
    disk.fill()
    with pytest.raises(errors.DiskFull) as caught:
        check_room(new, folder.as_uri())
    message = str(caught.value)
    assert message.startswith(f"The disk holding {folder} has no room for the next checkpoint")
    assert "0 B free of 1.0 MB" in message and "last checkpoint is kept" in message
    assert (folder / "last.pt").read_bytes() == b"o" * 500_000


def test_train_on_a_full_store_names_its_database_and_creates_nothing(
        project, tracking_uri, small_disk, monkeypatch):
    disk = small_disk(project.parent / "store", size="4m")
    database = disk.path / "mlflow.db"
    shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    disk.fill()
    result = CliRunner().invoke(cli, ["train", "--config", "configs/tiny.toml"])
    assert result.exit_code == 2, result.output
    assert f"The disk holding {database} is full (0 B free of 4.2 MB)" in result.output
    assert "Traceback" not in result.output, result.output
    assert git.head_sha(project) is None and run_git(project, "tag") == ""
    disk.free()
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_any_verb_on_a_full_store_says_so_in_one_line(git_repo, tracking_uri, small_disk,
                                                      monkeypatch):
    """The command line's own handler: `note` (any verb writing to the store) on a full disk."""
    from nf1prov import tracking

    disk = small_disk(git_repo.parent / "store", size="4m")
    database = disk.path / "mlflow.db"
    shutil.copyfile(tracking_uri.removeprefix("sqlite:///"), database)
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(git_repo)
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(client, "e", uri)
    client.create_run(experiment, run_name="brave-owl-1", tags={
        tracking.KIND: tracking.KIND_MODEL, tracking.CODENAME: "brave-owl-1"})
    disk.fill()
    result = CliRunner().invoke(cli, ["note", "brave-owl-1", "a note " * 2000])
    assert result.exit_code == 2, result.output
    assert f"The disk holding {database} is full (0 B free of 4.2 MB)" in result.output
    assert "Traceback" not in result.output
