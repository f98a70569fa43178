"""A store that cannot be used is a user error: exit 2, one paragraph naming the store and the
fix, no traceback, nothing created. Real faults: a damaged file, a half-migrated database, a
port nothing listens on, a server that refuses our credentials."""

from __future__ import annotations

import contextlib
import http.server
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from nf1prov.cli import main
from tests.conftest import run_git


def fails_with(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_damaged_sqlite_file(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all, a text file saved over it\n" * 20)
    err = fails_with(capsys, "list", "--tracking-uri", f"sqlite:///{db}")
    assert str(db) in err and "not an SQLite database" in err and "move it away" in err
    assert db.read_bytes().startswith(b"not a database")  # left as it was


def test_a_half_migrated_store(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # a schema stamped with a revision MLflow never made
        conn.execute("create table alembic_version (version_num varchar(32))")
        conn.execute("insert into alembic_version values ('deadbeef0000')")
    err = fails_with(capsys, "list", "--tracking-uri", f"sqlite:///{db}")
    assert "half-created or was made by another MLflow version" in err
    assert f"mlflow db upgrade sqlite:///{db}" in err


def test_nothing_listens_at_the_server_uri(capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    err = fails_with(capsys, "list", "--tracking-uri", uri)
    assert f"The MLflow server {uri} does not answer" in err


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "UNAUTHENTICATED", "message": "bad credentials"}')

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_that_refuses_our_credentials(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        err = fails_with(capsys, "list", "--tracking-uri", uri)
    finally:
        server.shutdown()
    assert "refused our credentials" in err and "MLFLOW_TRACKING_USERNAME" in err


def test_train_on_a_damaged_store_creates_nothing(tmp_path, project, monkeypatch, capsys):
    run_git(project, "add", "--all")
    run_git(project, "commit", "--quiet", "-m", "project")
    head = run_git(project, "rev-parse", "HEAD")
    db = tmp_path / "damaged.db"
    db.write_bytes(b"\x00garbage" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    err = fails_with(capsys, "train", "--config", "configs/tiny.toml")
    assert "not an SQLite database" in err
    assert run_git(project, "rev-parse", "HEAD") == head  # no commit
    assert run_git(project, "tag", "--list") == ""  # no tag


@contextlib.contextmanager
def read_only_copy(source: Path, folder: Path):
    """A copy of the store ``source`` in ``folder`` that this process cannot write: file and
    folder without write permission, or, for root (whom permissions do not stop), a read-only
    mount; skips the test when neither exists. Yields the copy's path."""
    import os
    import shutil

    folder.mkdir()
    if os.geteuid() != 0:
        shutil.copy(source, folder / "mlflow.db")
        (folder / "mlflow.db").chmod(0o444)
        folder.chmod(0o555)
        try:
            yield folder / "mlflow.db"
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "none", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("running as root without the right to mount: no file is read-only to root")
    try:
        shutil.copy(source, folder / "mlflow.db")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder / "mlflow.db"
    finally:  # lazily: MLflow's connection pool may still hold the database open
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


@pytest.fixture
def read_only_store(tmp_path):
    """A real, migrated store this process cannot write (`read_only_copy`)."""
    from nf1prov import tracking

    source = tmp_path / "made" / "mlflow.db"
    source.parent.mkdir()
    tracking.client(f"sqlite:///{source}")  # a valid, migrated store
    with read_only_copy(source, tmp_path / "ro") as db:
        yield db


def test_a_read_only_store_refuses_writers(read_only_store, capsys):
    err = fails_with(capsys, "list", "--reap", "--tracking-uri", f"sqlite:///{read_only_store}")
    import os

    # root is stopped by a read-only mount (`read_only_copy`), where chmod would not help
    said = "lies on a read-only filesystem" if os.geteuid() == 0 else "is read-only for this user"
    assert f"The MLflow store {read_only_store} {said}" in err


def test_read_verbs_work_on_a_read_only_store(git_repo, tracking_uri, tmp_path, monkeypatch,
                                              capsys):
    """list, show, catalog (--check or not), checkout, predict and evaluate --no-log only
    read the store: they work on one this user cannot write (a shared store, a backup); a verb that
    writes (note) still refuses it up front."""
    import mlflow

    from nf1prov import tracking
    from tests.test_evaluate import log_tiny_model, write_field

    (git_repo / ".gitignore").write_text(".nf1prov/\n")
    run_git(git_repo, "add", ".gitignore")
    run_git(git_repo, "commit", "--quiet", "-m", "model")
    run_git(git_repo, "tag", "model/tiny-eel-1")
    run_id = log_tiny_model()
    mlflow.MlflowClient().set_tag(run_id, tracking.GIT_COMMIT,
                                  run_git(git_repo, "rev-parse", "HEAD"))
    data = tmp_path / "data"
    write_field(data, "NF0014_T1", "C4-2", 1)
    stack = data / "NF0014_T1" / "zstack_images" / "C4-2" / "C4-2_TRANS.tif"
    monkeypatch.chdir(git_repo)
    with read_only_copy(tracking.sqlite_path(tracking_uri), tmp_path / "ro") as db:
        uri = f"sqlite:///{db}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        for args in (["list"], ["show", "tiny-eel-1"],
                     ["checkout", "tiny-eel-1", "--worktree", str(tmp_path / "wt")],
                     ["predict", "tiny-eel-1", str(stack), "-o", str(tmp_path / "out"),
                      "--no-progress"],
                     ["evaluate", "tiny-eel-1", "--data-root", str(data), "--no-log",
                      "--no-progress"],
                     ["catalog", "--check"], ["catalog"]):
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            out, err = capsys.readouterr()
            expected = 1 if args[-1] == "--check" else 0  # the README has no catalogue yet
            assert exit_info.value.code == expected, (args, out, err)
            assert "tiny-eel-1" in out + err or "1 model, written" in out, (args, out, err)
            assert "read-only" not in err, (args, out, err)
        assert (tmp_path / "out" / "C4-2_TRANS_labels.ome.tif").is_file()
        assert "**Codename:** tiny-eel-1" in (git_repo / "README.md").read_text()
        err = fails_with(capsys, "note", "tiny-eel-1", "a note")
        assert f"The MLflow store {db} is read-only" in err or "read-only filesystem" in err


def test_a_percent_encoded_sqlite_uri_keeps_artifacts_beside_the_database_mlflow_opens(
        tmp_path, _migrated_store):
    """SQLAlchemy decodes %20 in a sqlite URI's path: MLflow opens '<tmp>/my store/mlflow.db',
    so its mlartifacts folder goes there too, and no literal 'my%20store' folder appears."""
    import shutil

    from nf1prov import tracking

    folder = tmp_path / "my store"
    folder.mkdir()
    shutil.copyfile(_migrated_store, folder / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/my%20store/mlflow.db"
    assert tracking.sqlite_path(uri) == folder / "mlflow.db"
    client = tracking.client(uri)
    run = client.create_run(tracking.ensure_experiment(client, "spaces", uri))
    client.log_text(run.info.run_id, "beside the database\n", "note.txt")
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as conn:
        assert conn.execute("SELECT count(*) FROM runs WHERE run_uuid = ?",
                            (run.info.run_id,)).fetchone() == (1,)  # the file MLflow opened
    assert list((folder / "mlartifacts").rglob("note.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my store"]  # no 'my%20store'
    odd = tmp_path / "100%20 done"  # a folder whose name itself holds '%20'
    assert tracking.sqlite_path(tracking.default_tracking_uri(odd)) == odd / "mlflow.db"
