"""A store that cannot be used is a user error: exit 2, one paragraph naming the store and the
fix, no traceback, nothing created. Real faults: a damaged file, a half-migrated database, a
port nothing listens on, a server that refuses our credentials."""

from __future__ import annotations

import http.server
import socket
import sqlite3
import subprocess
import threading

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


@pytest.fixture
def read_only_store(tmp_path):
    """A real store this process cannot write: file and folder without write permission, or,
    for root (whom permissions do not stop), a read-only mount; skipped when neither exists."""
    import os
    import shutil

    from nf1prov import tracking

    source = tmp_path / "made" / "mlflow.db"
    source.parent.mkdir()
    tracking.client(f"sqlite:///{source}")  # a valid, migrated store
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        shutil.copy(source, folder / "mlflow.db")
        (folder / "mlflow.db").chmod(0o444)
        folder.chmod(0o555)
        yield folder / "mlflow.db"
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
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_store(read_only_store, capsys):
    err = fails_with(capsys, "list", "--tracking-uri", f"sqlite:///{read_only_store}")
    assert f"The MLflow store {read_only_store} is read-only" in err
