"""The verbs that only read (`catalog`, `catalog --check`, `list`, `show`, every `--help`) answer
without importing MLflow, torch or optuna: a sqlite store's tables read directly, a tracking
server through MLflow's REST API (`nf1prov.store_read`). They answer the same bytes as through
MLflow (NF1PROV_STORE_READER=mlflow: today's path, kept for every other store), on a store of
1,200 model runs, on a real `mlflow server`, and on a store of an older schema revision; a
revision the direct read does not know, or that the installed MLflow would refuse, goes through
MLflow. Real sqlite stores, a real git repository, a real server; no mocks."""

from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import store_read, tracking
from nf1prov.cli import cli
from tests.catalog_runs import EEL, HOG, TWIN, client_for, clone_runs, lab_store
from tests.conftest import hermetic_environment, run_git
from tests.lab_servers import (
    _NO_PROXY,
    _local_env,
    _spawn_group,
    _stop_group,
    _wait_http,
    free_port,
)

MODELS = 1_200
HEAVY = ("mlflow", "torch", "optuna")
THROUGH_MLFLOW = {tracking.STORE_READER: "mlflow"}
STALE_README = "# Lab\n\nProse kept as it is.\n"
# MLflow's schema revision before its workspace columns (1b5f0d9ad7c1), the one change among the
# known revisions that touches what the direct read reads: experiments and registered models.
OLD_REVISION = "c8d9e0f1a2b3"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, _migrated_store):
    """A git repository (two model commits, a README) and its stores: ``small`` (every shape
    of run and a registry), ``large`` (the same and clones: 1,200 models) and ``old`` (small at
    `OLD_REVISION`, downgraded by MLflow's own migrations)."""
    with pytest.MonkeyPatch.context() as mp:
        hermetic_environment(mp, tmp_path_factory)
        root = tmp_path_factory.mktemp("store-read")
        repo = root / "repo"
        repo.mkdir()
        run_git(repo, "init", "--quiet", "--initial-branch=main")
        commits = []
        for name in ("first", "second"):
            (repo / f"{name}.py").write_text(f"# {name} model\n")
            run_git(repo, "add", ".")
            run_git(repo, "commit", "--quiet", "-m", name)
            commits.append(run_git(repo, "rev-parse", "HEAD"))
        (repo / "README.md").write_text(STALE_README)
        small = root / "small.db"
        shutil.copyfile(_migrated_store, small)
        mp.chdir(root)  # MLflow's default experiment puts ./mlruns here
        client = client_for(f"sqlite:///{small}")
        runs = lab_store(client, tuple(commits))
        models = sum(1 for run in tracking.model_runs(client)  # committed: the catalogue's
                     if run.data.tags.get(tracking.GIT_COMMIT))
        large = root / "large.db"
        shutil.copyfile(small, large)
        clone_runs(large, [runs[EEL], runs[HOG]], MODELS - models, 1_600_000_000_000)
        old = root / "old.db"
        shutil.copyfile(small, old)
        downgrade(old, OLD_REVISION)
    return {"repo": repo, "runs": runs, "small": small, "large": large, "old": old}


def downgrade(db: Path, revision: str) -> None:
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    uri = f"sqlite:///{db}"
    engine = sqlalchemy.create_engine(uri)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    engine.dispose()


def answer(repo: Path, uri: str, args: list[str], env: dict | None = None) -> tuple:
    """(exit code, stdout, stderr) of `nf1prov ARGS` run in ``repo`` on the store ``uri``; the
    README put back as it was before, and the catalogue's record of what it last wrote gone."""
    (repo / "README.md").write_text(STALE_README)
    (repo / ".git" / "nf1prov-catalog.json").unlink(missing_ok=True)
    result = CliRunner().invoke(cli, args, env={"MLFLOW_TRACKING_URI": uri, **(env or {})},
                                catch_exceptions=False)
    written = (repo / "README.md").read_bytes()
    return result.exit_code, result.stdout, result.stderr, written


def same_answers(repo: Path, uri: str, verbs: list[list[str]], monkeypatch) -> list[tuple]:
    """Each of ``verbs`` answered directly and through MLflow: asserted byte for byte equal."""
    monkeypatch.chdir(repo)
    answers = []
    for args in verbs:
        direct = answer(repo, uri, args)
        through = answer(repo, uri, args, THROUGH_MLFLOW)
        assert direct == through, args
        answers.append(direct)
    return answers


VERBS = [["catalog", "--check"], ["catalog"], ["list"], ["list", "--all-kinds", "--json"],
         ["show", EEL], ["show", HOG, "--json"], ["show", "busy-bee-258"], ["show", TWIN],
         ["show", "fearless-eel-265"], ["show", "models:/nf1-segmentation@champion"]]


def test_a_sqlite_store_answers_the_same_bytes_read_directly(lab, monkeypatch):
    uri = f"sqlite:///{lab['small']}"
    assert isinstance(tracking.reader(uri), store_read.SqliteStore)
    by_id = [["show", lab["runs"]["far-fox-259"]], ["show", "0" * 32]]
    answers = same_answers(lab["repo"], uri, VERBS + by_id, monkeypatch)
    check, write, listed, everything, eel, hog, busy, twin, unknown, alias, far, none = answers
    assert check[0] == 1 and "+**Codename:** fearless-eel-256" in check[1]
    assert write[0] == 0 and "nf1-segmentation v1 @baseline" in write[3].decode()
    assert "a-prompt" not in write[3].decode()
    assert "CRASHED" in listed[1] and "hook-hare" not in listed[1]
    assert {row["kind"] for row in json.loads(everything[1])} == {"model", "scratch", "trial"}
    assert f'"previous": "{EEL}"' in hog[1] and "second.py" in hog[1]
    assert '"best_epoch": 1.7976931348623157e+308' in hog[1]
    assert "names 2 runs" in twin[2] and twin[0] == 2
    assert "Closest known: fearless-eel-256" in unknown[2]
    assert alias[1].startswith(HOG)
    assert far[1].startswith("far-fox-259")
    assert none[0] == 2 and "No run with ID" in none[2]


def test_1200_models_answer_the_same_bytes_read_directly(lab, monkeypatch):
    uri = f"sqlite:///{lab['large']}"
    check, listed = same_answers(lab["repo"], uri, [["catalog", "--check"], ["list"]],
                                 monkeypatch)
    assert check[1].count("+**Commit:**") == MODELS
    assert len(listed[1].splitlines()) == 1 + MODELS + 1  # a header, the models, a scratch run


def fresh_process(repo: Path, uri: str, verbs: list[list[str]]) -> list[str]:
    """The heavy modules imported by a new Python process that ran `nf1prov` ``verbs`` in
    ``repo`` on the store ``uri`` (each verb's exit code is checked: 0, or 1 for a stale
    README)."""
    script = (
        "import sys\nfrom nf1prov.cli import main\ncodes = []\n"
        f"for argv in {verbs!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit as done:\n"
        "        codes.append(done.code)\n"
        f"print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    env = tracking.child_environment(uri)
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    codes, heavy = done.stdout.strip().splitlines()[-1].split("] [")
    assert all(code in ("0", "1", "None") for code in codes.strip("[").split(", ")), done.stderr
    return [m.strip("'") for m in heavy.rstrip("]").split(", ") if m]


def test_reading_verbs_on_a_sqlite_store_import_no_mlflow(lab):
    verbs = [["catalog", "--check"], ["list"], ["show", EEL], ["show", "--json", HOG]]
    assert fresh_process(lab["repo"], f"sqlite:///{lab['small']}", verbs) == []


def test_help_of_every_verb_imports_no_mlflow_torch_or_optuna(lab):
    verbs = [["--help"]] + [[verb, "--help"] for verb in sorted(cli.commands)]
    assert fresh_process(lab["repo"], f"sqlite:///{lab['small']}", verbs) == []


# --- a tracking server: MLflow's REST API ----------------------------------------------------

@pytest.fixture(scope="module")
def server(lab, tmp_path_factory):
    """`mlflow server` on a copy of the small store (artifacts in a folder): its URI."""
    root = tmp_path_factory.mktemp("store-read-server")
    db = root / "served.db"
    shutil.copyfile(lab["small"], db)
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{db}", "--artifacts-destination", (root / "art").as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = _local_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "wb") as log:
        proc = _spawn_group(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    why = _wait_http(f"{uri}/health", 120, proc)
    if why is not None:
        _stop_group(proc, timeout=10, kill=True)
        pytest.fail(f"mlflow server did not start: {why}\n{(root / 'server.log').read_text()}")
    yield uri
    _stop_group(proc, kill=True)


def test_a_server_answers_the_same_bytes_read_through_its_rest_api(lab, server, monkeypatch):
    assert isinstance(tracking.reader(server), store_read.RestStore)
    by_id = [["show", lab["runs"]["far-fox-259"]], ["show", "0" * 32]]
    check, write, listed, everything, eel, hog, busy, twin, unknown, alias, far, none = (
        same_answers(lab["repo"], server, VERBS + by_id, monkeypatch))
    assert check[0] == 1 and f"{server}/#/experiments/" in check[1]
    assert "nf1-segmentation v2 @champion" in write[3].decode()
    assert "a-prompt" not in write[3].decode()
    assert f"run page:  {server}/#/experiments/" in eel[1]
    assert "names 2 runs" in twin[2]
    assert far[1].startswith("far-fox-259") and "No run with ID" in none[2]


def test_reading_verbs_on_a_server_import_no_mlflow(lab, server):
    verbs = [["catalog", "--check"], ["list"], ["show", EEL]]
    assert fresh_process(lab["repo"], server, verbs) == []


@pytest.fixture
def recording_proxy(server):
    """A plain HTTP proxy in front of the server that notes the Authorization header of every
    request: (its URI, the headers seen)."""
    seen: list[str | None] = []

    class Forward(http.server.BaseHTTPRequestHandler):
        def forward(self):
            seen.append(self.headers.get("Authorization"))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            request = urllib.request.Request(server + self.path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
            try:
                response = _NO_PROXY.open(request, timeout=60)
            except urllib.error.HTTPError as error:
                response = error
            with response:
                data = response.read()
                self.send_response(response.status)
                self.send_header("Content-Type", response.headers.get("Content-Type", ""))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        do_GET = do_POST = forward

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}", seen
    proxy.shutdown()
    proxy.server_close()


def test_a_server_gets_the_credentials_mlflow_would_send(lab, recording_proxy, tmp_path,
                                                          monkeypatch):
    """MLflow's settings reach the server as MLflow sends them: user and password (from the
    environment, else ~/.mlflow/credentials) as basic, else a token as bearer, and a user and
    password in the URI in their place; a scheme of MLflow's own plugins goes through MLflow."""
    uri, seen = recording_proxy
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = filed\nmlflow_tracking_password = pw\n")
    settings = [({"MLFLOW_TRACKING_USERNAME": "lab", "MLFLOW_TRACKING_PASSWORD": "secret"}, uri),
                ({"MLFLOW_TRACKING_TOKEN": "t0ken"}, uri),  # the file's user and password win
                ({"MLFLOW_TRACKING_USERNAME": "lab"}, uri.replace("//", "//u:p@"))]
    sent = []
    for env, address in settings:
        for how in ({}, THROUGH_MLFLOW):
            seen.clear()
            with monkeypatch.context() as scoped:
                for name, value in env.items():
                    scoped.setenv(name, value)
                code, out, err, _ = answer(lab["repo"], address, ["list"], how)
            assert code == 0 and EEL in out, err
            sent.append(set(seen))
    assert sent == [{"Basic bGFiOnNlY3JldA=="}] * 2 + [{"Basic ZmlsZWQ6cHc="}] * 2 + [
        {"Basic dTpw"}] * 2  # lab:secret, filed:pw (the file), u:p (the URI)
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "some_plugin")
    assert tracking.reader(uri) is None


# --- schema revisions ---------------------------------------------------------------------------

def test_the_installed_mlflows_schema_revision_is_known():
    """Else every store would go through MLflow: an MLflow upgrade that adds a migration must
    be checked against what store_read reads, then its revision added to KNOWN_REVISIONS."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    assert store_read.installed_head() == _get_latest_schema_revision()
    assert store_read.installed_head() in store_read.KNOWN_REVISIONS


def revision(uri: str) -> str:
    con = sqlite3.connect(tracking.sqlite_path(uri))
    try:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    finally:
        con.close()


def test_an_old_schema_revision_answers_as_mlflow_would(lab, tmp_path, monkeypatch, caplog):
    """A store of an older MLflow (`OLD_REVISION`): the installed MLflow upgrades it to its own
    revision as it opens it, so the direct read leaves it to MLflow. With that older MLflow
    installed (its head the store's revision), the direct read gives what MLflow gives at the
    current revision, and changes nothing."""
    for logger in ("mlflow.store.db.utils", "alembic"):  # quiet as `nf1prov` keeps them
        caplog.set_level("WARNING", logger)

    def old_copy(name: str) -> str:
        (tmp_path / name).mkdir()
        return f"sqlite:///{shutil.copyfile(lab['old'], tmp_path / name / 'mlflow.db')}"

    monkeypatch.chdir(lab["repo"])
    direct, through = old_copy("direct"), old_copy("through-mlflow")
    assert tracking.reader(direct) is None
    assert answer(lab["repo"], direct, ["list"]) == answer(lab["repo"], through, ["list"],
                                                           THROUGH_MLFLOW)
    assert revision(direct) == revision(through) == store_read.installed_head()
    monkeypatch.setattr(store_read, "installed_head", lambda: OLD_REVISION)
    old = old_copy("read-by-an-older-mlflow")
    assert isinstance(tracking.reader(old), store_read.SqliteStore)
    for args in (["catalog", "--check"], ["list", "--all-kinds", "--json"],
                 ["show", HOG, "--json"]):
        direct = [part.replace(str(tracking.sqlite_path(old)), str(lab["small"]))
                  if isinstance(part, str) else part
                  for part in answer(lab["repo"], old, args)]  # show names the store
        assert tuple(direct) == answer(lab["repo"], f"sqlite:///{lab['small']}", args,
                                       THROUGH_MLFLOW), args
    assert revision(old) == OLD_REVISION


def test_an_unknown_schema_revision_is_read_through_mlflow(lab, tmp_path, monkeypatch):
    db = tmp_path / "future.db"
    shutil.copyfile(lab["small"], db)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE alembic_version SET version_num = 'f00df00df00d'")
    con.close()
    uri = f"sqlite:///{db}"
    monkeypatch.setattr(store_read, "installed_head", lambda: "f00df00df00d")
    assert tracking.reader(uri) is None  # MLflow would read it (its head): through MLflow
    (code, out, err, _), = same_answers(lab["repo"], uri, [["list"]], monkeypatch)
    assert code == 2 and "f00df00df00d" in err  # this MLflow knows no such revision


def test_a_store_lacking_a_column_read_is_read_through_mlflow(lab, tmp_path, monkeypatch):
    monkeypatch.setitem(store_read.SQLITE_COLUMNS, "runs",
                        store_read.SQLITE_COLUMNS["runs"] | {"a_column_of_a_future_mlflow"})
    assert tracking.reader(f"sqlite:///{lab['small']}") is None
    assert tracking.reader(f"sqlite:///{tmp_path / 'absent.db'}") is None  # MLflow creates it
    assert tracking.reader("postgresql://lab@db/mlflow") is None
