"""Real lab-server fixtures: PostgreSQL 15, S3 (moto_server) and `mlflow server` between them.

tests/conftest.py imports the fixtures by name, so every test may request them (`-p
tests.lab_servers` registers them elsewhere). Fixtures:

- `postgres` (session): a throwaway PostgreSQL 15 cluster on 127.0.0.1 (or the server named by
  NF1PROV_TEST_POSTGRES_URI, a `postgresql+psycopg2://user:pw@host:port/db` URI of a role that
  may CREATE DATABASE). `postgres.new_database(hint)` gives the URI of a fresh, empty database.
- `s3` (session): a moto_server on 127.0.0.1 (or the endpoint named by NF1PROV_TEST_S3_ENDPOINT;
  credentials from NF1PROV_TEST_S3_ACCESS_KEY_ID / NF1PROV_TEST_S3_SECRET_ACCESS_KEY, default
  `testing`). `s3.new_bucket(hint)` creates a bucket; `s3.server_env` is what a server that
  writes to it needs in its environment. The test process's own os.environ never gets AWS
  credentials.
- `make_mlflow_server` (function): a factory of started `mlflow server`s, each on a fresh
  database and bucket; all killed (SIGKILL) at test end. `mlflow_server` (function) is one of them.

Under pytest-xdist each worker starts its own cluster and moto_server (session fixtures are per
worker); ports are picked free and directories are unique. A missing piece (PostgreSQL 15
binaries, psycopg2, boto3, moto_server) skips the test, except under CI=true, where it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
VENV_BIN = Path(sys.executable).parent
POSTGRES_URI_VAR = "NF1PROV_TEST_POSTGRES_URI"
S3_ENDPOINT_VAR = "NF1PROV_TEST_S3_ENDPOINT"

# The environment a test process must never pass on to the mlflow server it starts, and that
# a server's client must not need: tracking and S3 settings.
_CLIENT_ONLY_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                     "MLFLOW_EXPERIMENT_NAME", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                     "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_DEFAULT_REGION")


def missing(what: str) -> None:
    """Skip the test for want of `what`; under CI=true fail instead: CI must run these tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: lab-server tests must run there, not skip)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hint(name_hint: str, allowed: str, joiner: str, length: int) -> str:
    """`name_hint` cut down to the characters `allowed` (a regex class body)."""
    cleaned = re.sub(f"[^{allowed}]+", joiner, name_hint.lower()).strip(joiner)
    return cleaned[:length].strip(joiner) or "x"


def _log_tail(path: Path, chars: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return text[-chars:]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _local_env() -> dict[str, str]:
    """os.environ without client-side tracking/S3 settings; local addresses bypass proxies."""
    env = {key: value for key, value in os.environ.items() if key not in _CLIENT_ONLY_VARS}
    for var in ("NO_PROXY", "no_proxy"):
        env[var] = ",".join(filter(None, [env.get(var), "127.0.0.1", "localhost"]))
    return env


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
               ok: Callable[[int], bool] = lambda status: status == 200) -> str | None:
    """Poll `url` until it answers with a status `ok` accepts; None then, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"the process exited with status {proc.returncode}"
        try:
            with _NO_PROXY.open(url, timeout=5) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
            time.sleep(0.1)
            continue
        if ok(status):
            return None
        last = f"HTTP {status}"
        time.sleep(0.1)
    return f"no answer within {timeout:.0f} s (last: {last})"


# If the test process dies without its teardown (SIGKILL, a `timeout` SIGTERM), this watchdog
# (one per process) stops what it started: it reads what to undo from a pipe, and the pipe's end
# of file means the test process is gone. Undone in reverse order: servers, then clusters, then
# their directories.
_WATCHDOG = r"""
import json, os, shutil, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
actions = {}
for line in sys.stdin:
    message = json.loads(line)
    if "remove" in message:
        actions.pop(message["remove"], None)
    else:
        actions[message["key"]] = message["action"]
for kind, argument in reversed(list(actions.values())):
    try:
        if kind == "killpg":
            os.killpg(argument, signal.SIGTERM)
            time.sleep(2)
            os.killpg(argument, signal.SIGKILL)
        elif kind == "run":
            subprocess.run(argument, timeout=60, capture_output=True)
        elif kind == "rmtree":
            shutil.rmtree(argument, ignore_errors=True)
    except Exception:
        pass
"""


class _Watchdog:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self.count = 0

    def add(self, kind: str, argument) -> str:
        self.count += 1
        key = str(self.count)
        self._send({"key": key, "action": [kind, argument]})
        return key

    def remove(self, key: str) -> None:
        self._send({"remove": key})

    def _send(self, message: dict) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()


_watchdogs: dict[int, _Watchdog] = {}


def watchdog() -> _Watchdog:
    if os.getpid() not in _watchdogs:  # a forked process needs its own
        _watchdogs[os.getpid()] = _Watchdog()
    return _watchdogs[os.getpid()]


_group_keys: dict[int, str] = {}


def _spawn_group(command: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a new session (its own process group, which _stop_group ends)."""
    proc = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
    _group_keys[proc.pid] = watchdog().add("killpg", proc.pid)
    return proc


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies, which an init that does
    not reap leaves around, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":  # state, ppid, pgrp
            return True
    return False


def _stop_group(proc: subprocess.Popen, timeout: float = 20.0, kill: bool = False) -> None:
    """Stop a process _spawn_group started and every process of its group."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    # Workers may outlive their parent briefly; the group must be gone (ports free, no writes).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    if pgid in _group_keys:
        watchdog().remove(_group_keys.pop(pgid))


# --------------------------------------------------------------------------------------------
# PostgreSQL


class Postgres:
    """A PostgreSQL server reached through `admin_uri` (a role that may CREATE DATABASE)."""

    def __init__(self, admin_uri: str):
        from sqlalchemy.engine import make_url

        self.admin_uri = admin_uri
        self._url = make_url(admin_uri)
        self.created: list[str] = []

    def connect(self, database: str | None = None):
        import psycopg2

        url = self._url
        return psycopg2.connect(host=url.host or "127.0.0.1", port=url.port or 5432,
                                user=url.username, password=url.password,
                                dbname=database or url.database or "postgres",
                                connect_timeout=10)

    def new_database(self, name_hint: str = "db") -> str:
        """The `postgresql+psycopg2://` URI of a freshly created, empty database."""
        name = f"t_{_hint(name_hint, 'a-z0-9', '_', 40)}_{uuid.uuid4().hex[:10]}"
        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self.created.append(name)
        return self._url.set(drivername="postgresql+psycopg2", database=name).render_as_string(
            hide_password=False)

    def drop_created(self) -> None:
        """Drop the databases new_database made (on a server the session did not start)."""
        try:
            conn = self.connect()
        except Exception:
            return
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                for name in self.created:
                    with contextlib.suppress(Exception):
                        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


class PostgresCluster(Postgres):
    """A throwaway PostgreSQL 15 cluster in a temp directory, trust auth, TCP on 127.0.0.1."""

    SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                "max_connections": "200", "listen_addresses": "127.0.0.1"}

    def __init__(self, bin_dir: Path = POSTGRES_BIN):
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.base = self._make_base()
        self._undo = [watchdog().add("rmtree", str(self.base))]
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = 0
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "--no-instructions", "-E", "UTF8", "--locale=C")
        self._start()
        super().__init__(f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres")

    def _make_base(self) -> Path:
        if not self.as_root:
            return Path(tempfile.mkdtemp(prefix="nf1prov-pg-"))
        # initdb and postgres refuse to run as root: they run as `postgres`, in a directory
        # that user owns below directories it can traverse (a pytest tmp dir may not be).
        import pwd

        user = pwd.getpwnam("postgres")
        tried = []
        for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp", "/var/tmp"]):
            if not os.path.isdir(parent):
                continue
            base = Path(tempfile.mkdtemp(prefix="nf1prov-pg-", dir=parent))
            os.chown(base, user.pw_uid, user.pw_gid)
            check = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(base)],
                                   capture_output=True)
            if check.returncode == 0:
                return base
            tried.append(parent)
            shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"no temp directory the postgres user can write to (tried {tried})")

    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / program), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self.as_root else command

    def _run(self, program: str, *args: str, check: bool = True):
        result = subprocess.run(self._command(program, *args), cwd=self.base,
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}\n{_log_tail(self.log)}")
        return result

    def _start(self) -> None:
        for _attempt in range(3):  # a free-picked port may be taken before postgres binds it
            self.port = free_port()
            options = " ".join([f"-p {self.port}", f"-c unix_socket_directories={self.base}",
                                *(f"-c {key}={value}" for key, value in self.SETTINGS.items())])
            result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                               "-t", "60", "-o", options, "start", check=False)
            if result.returncode == 0:
                self._undo.append(watchdog().add("run", self._command(
                    "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")))
                return
        raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}{result.stderr}\n"
                           f"{_log_tail(self.log)}")

    def close(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        for key in self._undo:
            watchdog().remove(key)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server (15, started for this session unless NF1PROV_TEST_POSTGRES_URI is
    set); `postgres.new_database(hint)` -> URI of a fresh empty database."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing("psycopg2 is not importable (pip install psycopg2-binary: the dev extra has it)")
    external = os.environ.get(POSTGRES_URI_VAR)
    if external:
        server = Postgres(external)
        yield server
        server.drop_created()
        return
    if not (POSTGRES_BIN / "initdb").exists():
        missing(f"PostgreSQL 15 is not installed ({POSTGRES_BIN / 'initdb'} is missing; "
                f"or set {POSTGRES_URI_VAR})")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root, and there is no 'postgres' user to run PostgreSQL as")
        if not shutil.which("runuser"):
            missing("running as root, and there is no runuser to run PostgreSQL as postgres")
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.close()


# --------------------------------------------------------------------------------------------
# S3


class S3:
    """An S3 endpoint with its credentials; tests reach it through `client()`, servers get
    `server_env` in their environment."""

    def __init__(self, endpoint: str, access_key: str = "testing", secret_key: str = "testing",
                 region: str = "us-east-1"):
        self.endpoint = endpoint
        self.credentials = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                            "AWS_DEFAULT_REGION": region}
        self.server_env = {**self.credentials, "MLFLOW_S3_ENDPOINT_URL": endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            region_name=self.credentials["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self, name_hint: str = "bucket") -> str:
        name = f"{_hint(name_hint, 'a-z0-9', '-', 40)}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for item in page.get("Contents", [])]


class MotoS3(S3):
    """moto_server on 127.0.0.1 on a free port, in a subprocess."""

    def __init__(self, executable: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="nf1prov-moto-"))
        self.log = self.dir / "moto.log"
        self._undo = watchdog().add("rmtree", str(self.dir))
        env = _local_env()
        why = "not started"
        for _attempt in range(3):
            port = free_port()
            with open(self.log, "ab") as log:
                self.proc = _spawn_group(
                    [str(executable), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                    stderr=subprocess.STDOUT, env=env, cwd=self.dir)
            # Any HTTP answer means it is up (moto answers / with 200 or 404).
            why = _wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, self.proc,
                             ok=lambda status: status < 500)
            if why is None:
                super().__init__(f"http://127.0.0.1:{port}")
                return
            _stop_group(self.proc, kill=True)
        raise RuntimeError(f"moto_server did not start: {why}\n{_log_tail(self.log)}")

    def close(self) -> None:
        _stop_group(self.proc, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
        watchdog().remove(self._undo)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    """An S3 endpoint (moto_server started for this session unless NF1PROV_TEST_S3_ENDPOINT is
    set); `s3.new_bucket(hint)` -> name of a new bucket."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        missing("boto3 is not importable (pip install boto3: the dev extra has it)")
    external = os.environ.get(S3_ENDPOINT_VAR)
    if external:
        yield S3(external.rstrip("/"),
                 os.environ.get("NF1PROV_TEST_S3_ACCESS_KEY_ID", "testing"),
                 os.environ.get("NF1PROV_TEST_S3_SECRET_ACCESS_KEY", "testing"),
                 os.environ.get("NF1PROV_TEST_S3_REGION", "us-east-1"))
        return
    executable = VENV_BIN / "moto_server"
    if not executable.exists():
        found = shutil.which("moto_server")
        if not found:
            missing("moto_server is not installed (pip install 'moto[server]': the dev extra "
                    f"has it; or set {S3_ENDPOINT_VAR})")
        executable = Path(found)
    server = MotoS3(executable)
    try:
        yield server
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# mlflow server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend store and proxied S3 artifacts.

    `uri` is the tracking URI for clients (they need no AWS credentials: artifacts go through
    the server). `stop()` / `start()` bring it down and back on the same port, database and
    bucket; `kill()` is an abrupt SIGKILL of every server process. `log` holds the output of
    every start.

    One uvicorn worker by default: it serves requests from a thread pool, so 8 concurrent
    training clients work; on a 2-core machine it starts ~4 s sooner than 2 workers (~9-11 s
    against ~13-16 s, most of it importing mlflow) and was as fast under 8 clients. The `mlflow
    server` parent migrates a fresh database (~1 s) before it starts any worker, so workers
    never race on migrations.
    """

    def __init__(self, backend_store_uri: str, s3: S3, bucket: str, log: Path,
                 workers: int = 1, port: int | None = None, extra_env: dict | None = None):
        self.backend_store_uri = backend_store_uri
        self.s3 = s3
        self.bucket = bucket
        self.endpoint = s3.endpoint
        self.artifacts_destination = f"s3://{bucket}/artifacts"
        self.log = log
        self.workers = workers
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: list[float] = []

    def command(self) -> list[str]:
        return [str(VENV_BIN / "mlflow"), "server",
                "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers)]

    def environment(self) -> dict[str, str]:
        env = _local_env()
        env.update(self.s3.server_env)
        # The job runner (on by default with a database store) is one more process for
        # features these tests do not use (scorers, trace archival); with it on, a start took
        # 17-36 s instead of 9-11 s on a loaded 2-core machine. extra_env may turn it back on.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start (again: same port, database and bucket); wait until GET /health answers 200
        (9-22 s measured on a 2-core machine, depending on load)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"mlflow server at {self.uri} is already running")
        began = time.monotonic()
        with open(self.log, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n"
                      .encode())
            log.flush()
            self.proc = _spawn_group(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.environment(), cwd=self.log.parent)
        why = _wait_http(f"{self.uri}/health", timeout, self.proc)
        if why is not None:
            _stop_group(self.proc, timeout=10, kill=True)
            raise RuntimeError(f"mlflow server at {self.uri} did not become healthy: {why}\n"
                               f"--- {self.log} ---\n{_log_tail(self.log)}")
        self.startup_seconds.append(time.monotonic() - began)
        return self

    def stop(self) -> None:
        """SIGTERM to the server and its workers; wait until all have exited."""
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a crash, not a shutdown)."""
        if self.proc is not None:
            _stop_group(self.proc, kill=True)
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def artifact_keys(self, prefix: str = "") -> list[str]:
        """Object keys in the server's bucket (below `prefix`, e.g. 'artifacts/')."""
        return self.s3.keys(self.bucket, prefix)


@pytest.fixture
def make_mlflow_server(postgres, s3, tmp_path) -> Iterator[Callable[..., MlflowServer]]:
    """Factory: `make_mlflow_server(name_hint="mlflow", workers=1, start=True)` -> an
    MlflowServer on a fresh database and bucket. Every server is killed at test end."""
    servers: list[MlflowServer] = []

    def make(name_hint: str = "mlflow", workers: int = 1, start: bool = True,
             extra_env: dict | None = None) -> MlflowServer:
        log_dir = tmp_path / f"mlflow-server-{len(servers)}"
        log_dir.mkdir()
        server = MlflowServer(postgres.new_database(name_hint), s3, s3.new_bucket(name_hint),
                              log_dir / "server.log", workers=workers, extra_env=extra_env)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:  # a throwaway: no graceful shutdown to wait for
        server.kill()


@pytest.fixture
def mlflow_server(make_mlflow_server) -> MlflowServer:
    """A started `mlflow server` (PostgreSQL store, S3 artifacts via moto); killed at test end."""
    return make_mlflow_server()
