"""Reading an MLflow tracking store without importing MLflow, for the verbs that only read.

Importing MLflow costs seconds, most of what `catalog`, `list` and `show` cost. So these verbs
read a sqlite store's tables directly (read-only, each read one snapshot) and a tracking server
through MLflow's public REST API (``/api/2.0/mlflow/...``), into what nf1prov reads of MLflow's
entities: a `RunRecord` has the ``info`` and ``data`` (tags, params, latest metrics) of MLflow's
``Run``, so every verb renders the same objects whichever way they were read.

What this module cannot read as MLflow would raises `Unreadable`, and the verb goes through
MLflow (`nf1prov.tracking.reader`, `nf1prov.commands.common.read_store`): another kind of store;
a sqlite schema revision that is not in `KNOWN_REVISIONS` or is not the one the installed MLflow
expects (MLflow refuses such a store, with its own message); MLflow's workspaces; a server
behind an authentication scheme other than MLflow's basic or token one; any failure on the way.

It knows MLflow's schema and REST API, nothing of nf1prov's tags, and imports nothing of
nf1prov.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path


class Unreadable(Exception):
    """This store (or this part of it) is not read here: go through MLflow."""


@dataclass(frozen=True)
class RunInfo:
    """The fields of MLflow's ``RunInfo``, in its order."""

    run_id: str
    experiment_id: str
    user_id: str | None
    status: str
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str
    artifact_uri: str | None = None
    run_name: str | None = None


@dataclass(frozen=True)
class RunData:
    """What MLflow's ``Run.data`` holds, as plain dicts: ``tags``, ``params`` and ``metrics``
    (each metric's latest value)."""

    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunRecord:
    """A run read without MLflow: the ``info`` and ``data`` of the MLflow ``Run``."""

    info: RunInfo
    data: RunData


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model (not a prompt): ``aliases`` {alias: version}, ``versions`` [(version,
    run ID or "")] in the order of MLflow's search (newest update first)."""

    name: str
    aliases: dict[str, str]
    versions: list[tuple[str, str]]


RUN_NAME_TAG = "mlflow.runName"  # a run without a name is named by this tag, as MLflow does
PROMPT_TAG = "mlflow.prompt.is_prompt"  # MLflow's prompts share the registry's tables
DEFAULT_WORKSPACE = "default"


class Store:
    """A tracking store read without MLflow; every method reads one snapshot of it."""

    tracking_uri: str

    def experiments(self) -> dict[str, str]:
        """{experiment ID: name} of the experiments not deleted."""
        raise NotImplementedError

    def runs_tagged(self, key: str, value: str, params: tuple[str, ...] | None = None,
                    metrics: tuple[str, ...] | None = None) -> list[RunRecord]:
        """The runs (not deleted, in experiments not deleted) whose tag ``key`` is ``value``,
        newest first as MLflow's search orders them; of their params and metrics only those
        named in ``params`` and ``metrics`` when given (at least: a server sends all)."""
        raise NotImplementedError

    def runs_named(self, name: str) -> list[RunRecord]:
        """The runs (not deleted, in experiments not deleted) named ``name``, newest first."""
        raise NotImplementedError

    def run(self, run_id: str) -> RunRecord | None:
        """Run ``run_id`` whatever its state, or None when there is none."""
        raise NotImplementedError

    def registered_models(self) -> list[RegisteredModel]:
        """Every registered model but prompts, by name."""
        raise NotImplementedError


# --- a sqlite store -----------------------------------------------------------------------------

# MLflow's schema revisions (table alembic_version) that `SqliteStore` reads as MLflow reads
# them: from MLflow 3's logged-model tables (400f98739977) to the head of MLflow 3.17.2, in
# order. Checked migration by migration (mlflow/store/db_migrations/versions): among them only
# 1b5f0d9ad7c1 touches what is read here (a workspace column on experiments and the registry's
# tables; read when present). A newer MLflow's revision is unknown until checked the same way.
KNOWN_REVISIONS = frozenset("""
    400f98739977 6953534de441 bda7b8c39065 cbc13b556ace 770bee3ae1dd a1b2c3d4e5f6 de4033877273
    1a0cddfcaa16 534353b11cbc 71994744cf8e 3da73c924c2f bf29a5ff90ea 1bd49d398cd23 b7c8d9e0f1a2
    5d2d30f0abce c9d4e5f6a7b8 2c33131f4dae d3e4f5a6b7c8 d0e1f2a3b4c5 c8d9e0f1a2b3 1b5f0d9ad7c1
    e1f2a3b4c5d6 76601a5f987d c3d6457b6d8a a5b4c3d2e1f0 ae8bbe7743c9 7d34483879f0 da6fb0208061
    89d3d66ed43f b7e4c1a90f23 a8b9c0d1e2f3 c1d2e3f4a5b6 c3d9e7f1a2b4 6f8d9c3b2a1e 1971f2d9a75b
    17e22815139b b7e2c1a4d9f3 75868b020152 dc11669786a5""".split())

# The tables and columns read here; a store lacking any of them goes through MLflow.
SQLITE_COLUMNS = {
    "runs": {"run_uuid", "experiment_id", "name", "user_id", "status", "start_time", "end_time",
             "lifecycle_stage", "artifact_uri"},
    "tags": {"run_uuid", "key", "value"},
    "params": {"run_uuid", "key", "value"},
    "latest_metrics": {"run_uuid", "key", "value", "is_nan"},
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
    "registered_models": {"name"},
    "registered_model_tags": {"name", "key", "value"},
    "registered_model_aliases": {"name", "alias", "version"},
    "model_versions": {"name", "version", "run_id", "current_stage", "last_updated_time"},
    "model_version_tags": {"name", "key", "value"},
}
# Tables whose rows may lie in a workspace; MLflow without workspaces refuses a store with any
# row outside the default one, and filters the registry's by it.
WORKSPACE_TABLES = ("experiments", "registered_models", "webhooks")

_RUN = ("SELECT r.run_uuid, r.experiment_id, r.name, r.user_id, r.status, r.start_time, "
        "r.end_time, r.lifecycle_stage, r.artifact_uri FROM runs AS r WHERE {where} "
        # MLflow's order for start_time DESC: runs without one last, ties by run ID
        "ORDER BY r.start_time IS NULL, r.start_time DESC, r.run_uuid")
_VALUES = ("SELECT x.run_uuid, x.key, x.value, {is_nan} FROM {table} AS x "
           "WHERE {keys}x.run_uuid IN (SELECT r.run_uuid FROM runs AS r WHERE {where})")
# some keys of many runs: looked up by key (the + keeps sqlite off the run ID index, which
# would read every value of those runs)
_KEYS = "x.key IN ({}) AND +"
_ACTIVE = ("r.lifecycle_stage = 'active' AND r.experiment_id IN "
           "(SELECT experiment_id FROM experiments WHERE lifecycle_stage = 'active')")
_REVISION = re.compile(r"""^revision\s*=\s*["'](\w+)["']""", re.M)
_DOWN_REVISION = re.compile(r"^down_revision\s*=\s*(.*)$", re.M)


def installed_head() -> str | None:
    """The schema revision the installed MLflow requires of a sqlite store (the head of its
    migrations, read from their files, MLflow not imported), or None when it cannot be told."""
    import importlib.util

    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)), "store", "db_migrations",
                  "versions")
    revisions, lower = set(), set()
    for path in folder.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if found := _REVISION.search(text):
            revisions.add(found[1])
        if below := _DOWN_REVISION.search(text):
            lower.update(re.findall(r"""["'](\w+)["']""", below[1]))
    heads = revisions - lower
    return heads.pop() if len(heads) == 1 else None


def _truthy(name: str) -> bool:
    """MLflow's reading of a yes/no environment variable; Unreadable for a value MLflow
    refuses (it then says so itself)."""
    value = os.environ.get(name, "").strip().lower()
    if value not in ("", "true", "false", "1", "0"):
        raise Unreadable(f"{name}={value}")
    return value in ("true", "1")


class SqliteStore(Store):
    """A sqlite store's tables, read-only; ``head``: the revision the installed MLflow
    requires (`installed_head`)."""

    def __init__(self, db: Path, tracking_uri: str, head: str | None = None):
        self.db, self.tracking_uri = Path(db), tracking_uri
        if not self.db.is_file() or _truthy("MLFLOW_ENABLE_WORKSPACES"):
            raise Unreadable("no store file yet, or MLflow's workspaces")
        with self._snapshot() as con:
            revision = [row[0] for row in con.execute("SELECT version_num FROM alembic_version")]
            if revision != [head or installed_head()] or revision[0] not in KNOWN_REVISIONS:
                raise Unreadable(f"schema revision {revision}")
            self.columns = {table: {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
                            for table in (*SQLITE_COLUMNS, "webhooks")}
            if any(not needed <= self.columns[table] for table, needed in SQLITE_COLUMNS.items()):
                raise Unreadable("tables other than known")
            for table in WORKSPACE_TABLES:
                if "workspace" in self.columns[table] and con.execute(
                        f"SELECT 1 FROM {table} WHERE workspace IS NOT NULL AND workspace != ? "
                        "LIMIT 1", (DEFAULT_WORKSPACE,)).fetchone():
                    raise Unreadable(f"{table} in workspaces")

    @contextlib.contextmanager
    def _snapshot(self):
        """A read-only connection in one transaction: every read in it sees one state."""
        import sqlite3

        try:
            con = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True,
                                  isolation_level=None)
        except sqlite3.Error as exc:
            raise Unreadable(str(exc)) from exc
        try:
            con.execute("BEGIN")
            yield con
        except sqlite3.Error as exc:
            raise Unreadable(str(exc)) from exc
        finally:
            con.close()

    def experiments(self) -> dict[str, str]:
        with self._snapshot() as con:
            return {str(i): name for i, name in con.execute(
                "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active'")}

    def runs_tagged(self, key, value, params=None, metrics=None) -> list[RunRecord]:
        where = (f"{_ACTIVE} AND r.run_uuid IN "
                 "(SELECT run_uuid FROM tags WHERE key = ? AND value = ?)")
        return self._runs(where, (key, value), params, metrics)

    def runs_named(self, name: str) -> list[RunRecord]:
        return self._runs(f"{_ACTIVE} AND r.name = ?", (name,))

    def run(self, run_id: str) -> RunRecord | None:
        found = self._runs("r.run_uuid = ?", (run_id,))
        return found[0] if found else None

    def _runs(self, where: str, args: tuple, params=None, metrics=None) -> list[RunRecord]:
        # (table, RunData field, whether the value stands for NaN, the keys to read or None: all)
        values = (("tags", "tags", "0", None), ("params", "params", "0", params),
                  ("latest_metrics", "metrics", "x.is_nan", metrics))
        with self._snapshot() as con:
            rows = con.execute(_RUN.format(where=where), args).fetchall()
            data = {row[0]: RunData({}, {}, {}) for row in rows}
            for table, field, is_nan, keys in values:
                chosen = "" if keys is None else _KEYS.format(", ".join("?" * len(keys)))
                query = _VALUES.format(is_nan=is_nan, table=table, keys=chosen, where=where)
                into = {run_id: getattr(record, field) for run_id, record in data.items()}
                for run_id, key, value, nan in con.execute(query, (*(keys or ()), *args)):
                    # the runs of `rows`: the same query in the same snapshot; NaN as MLflow
                    into[run_id][key] = float("nan") if nan else value
        return [RunRecord(RunInfo(run_id, str(experiment), user, status, start, end, stage,
                                  artifacts, name or data[run_id].tags.get(RUN_NAME_TAG)),
                          data[run_id])
                for run_id, experiment, name, user, status, start, end, stage, artifacts in rows]

    def registered_models(self) -> list[RegisteredModel]:
        # as MLflow's registry without workspaces searches: the default workspace's rows,
        # prompts left out (a model or version with the prompt tag), deleted versions too
        def scope(table: str, alias: str) -> str:
            if "workspace" not in self.columns[table]:  # a revision before workspaces
                return ""
            return f"{alias}.workspace = '{DEFAULT_WORKSPACE}' AND "

        not_prompt = ("NOT EXISTS (SELECT 1 FROM {tags} AS t WHERE {scope}t.name = {alias}.name "
                      f"AND t.key = '{PROMPT_TAG}' AND t.value = 'true')")
        with self._snapshot() as con:
            names = [row[0] for row in con.execute(
                f"SELECT m.name FROM registered_models AS m WHERE {scope('registered_models', 'm')}"
                + not_prompt.format(tags="registered_model_tags", alias="m",
                                    scope=scope("registered_model_tags", "t"))
                + " ORDER BY m.name")]
            aliases: dict[str, dict[str, str]] = {}
            for name, alias, version in con.execute(
                    "SELECT a.name, a.alias, a.version FROM registered_model_aliases AS a WHERE "
                    f"{scope('registered_model_aliases', 'a')}1"):
                aliases.setdefault(name, {})[alias] = str(version)
            versions: dict[str, list[tuple[str, str]]] = {}
            for name, version, run_id in con.execute(
                    "SELECT v.name, v.version, v.run_id FROM model_versions AS v WHERE "
                    f"{scope('model_versions', 'v')}v.current_stage != 'Deleted_Internal' AND "
                    + not_prompt.format(tags="model_version_tags", alias="v",
                                        scope=scope("model_version_tags", "t"))
                    + " ORDER BY v.name, v.last_updated_time DESC, v.version DESC"):
                versions.setdefault(name, []).append((str(version), run_id or ""))
        return [RegisteredModel(name, aliases.get(name, {}), versions.get(name, []))
                for name in names]


# --- a tracking server --------------------------------------------------------------------------

API = "/api/2.0/mlflow"
# MLflow's client settings that name an authentication or workspace this module does not speak
UNSPOKEN = ("MLFLOW_TRACKING_AWS_SIGV4", "MLFLOW_TRACKING_AUTH", "MLFLOW_WORKSPACE")
RUNS_PAGE = 5000  # what nf1prov asks of MLflow's search_runs (`tracking.search_runs_all`)


class RestStore(Store):
    """An MLflow tracking server through its REST API, with MLflow's client settings
    (credentials, TLS, timeout: MLFLOW_TRACKING_* and MLFLOW_HTTP_REQUEST_TIMEOUT)."""

    def __init__(self, tracking_uri: str, first_timeout: float = 120.0):
        if any(os.environ.get(name, "").strip() for name in UNSPOKEN):
            raise Unreadable("an authentication or workspace read through MLflow")
        self.tracking_uri = tracking_uri
        self._base = tracking_uri[:-1] if tracking_uri.endswith("/") else tracking_uri
        insecure, server_cert = (_truthy("MLFLOW_TRACKING_INSECURE_TLS"),
                                 os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
        if insecure and server_cert:
            raise Unreadable("MLflow refuses both")
        self._verify = False if insecure else server_cert or True
        self._cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
        self._headers = self.headers()
        try:  # the user's setting, else MLflow's default, the first call ``first_timeout``
            set_timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 0)
        except ValueError as exc:
            raise Unreadable("MLFLOW_HTTP_REQUEST_TIMEOUT") from exc
        self._timeouts = [set_timeout or first_timeout, set_timeout or 120.0]
        self._session = None

    def headers(self) -> dict[str, str]:
        """The Authorization header MLflow's client would send (`mlflow.utils.rest_utils`):
        basic with a user name and password (MLFLOW_TRACKING_USERNAME/_PASSWORD, else
        ~/.mlflow/credentials), else bearer with MLFLOW_TRACKING_TOKEN. A user and password in
        the URI (or ~/.netrc) replace it there, as in MLflow, since both use requests."""
        import base64

        user, password = _credentials()
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if user and password:
            return {"Authorization": "Basic " + base64.standard_b64encode(
                f"{user}:{password}".encode()).decode()}
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, endpoint: str, body: dict, missing_ok: bool = False) -> dict:
        import requests

        if self._session is None:
            self._session = requests.Session()
        where = {"params": body} if method == "GET" else {"json": body}
        try:
            response = self._session.request(method, f"{self._base}{API}/{endpoint}",
                                             headers=self._headers, timeout=self._timeouts[0],
                                             verify=self._verify, cert=self._cert, **where)
            if missing_ok and response.status_code == 404:
                return {}
            response.raise_for_status()
            self._timeouts[0] = self._timeouts[1]  # the server answers
            return response.json()
        except (requests.RequestException, ValueError) as exc:
            raise Unreadable(f"{endpoint}: {exc}") from exc

    def _pages(self, method: str, endpoint: str, body: dict, field: str) -> list[dict]:
        found, token = [], None
        while True:
            page = self._call(method, endpoint, body | ({"page_token": token} if token else {}))
            found += page.get(field, [])
            token = page.get("next_page_token")
            if not token:
                return found

    def experiments(self) -> dict[str, str]:
        return {e["experiment_id"]: e.get("name", "") for e in self._pages(
            "POST", "experiments/search", {"max_results": 1000, "view_type": "ACTIVE_ONLY"},
            "experiments")}

    def _search(self, filter_string: str) -> list[RunRecord]:
        ids = list(self.experiments())
        if not ids:
            return []
        return [_run(run) for run in self._pages("POST", "runs/search", {
            "experiment_ids": ids, "filter": filter_string, "run_view_type": "ACTIVE_ONLY",
            "max_results": RUNS_PAGE, "order_by": ["attributes.start_time DESC"]}, "runs")]

    def runs_tagged(self, key, value, params=None, metrics=None) -> list[RunRecord]:
        return self._search(f"tags.`{key}` = '{_quoted(value)}'")

    def runs_named(self, name: str) -> list[RunRecord]:
        return self._search(f"attributes.run_name = '{_quoted(name)}'")

    def run(self, run_id: str) -> RunRecord | None:
        found = self._call("GET", "runs/get", {"run_id": run_id}, missing_ok=True)
        return _run(found["run"]) if "run" in found else None

    def registered_models(self) -> list[RegisteredModel]:
        models = self._pages("GET", "registered-models/search", {
            "filter": f"tag.`{PROMPT_TAG}` != 'true'", "max_results": 100},  # as MLflow's client
            "registered_models")
        return [RegisteredModel(
            model["name"], {a["alias"]: str(a["version"]) for a in model.get("aliases", [])},
            [(str(v["version"]), v.get("run_id", "")) for v in self._pages(
                "GET", "model-versions/search",
                {"filter": f"name = '{_quoted(model['name'])}'", "max_results": 10_000},
                "model_versions")]) for model in models]


def _quoted(text: str) -> str:
    """``text`` inside '...' of MLflow's filter language."""
    return text.replace("'", "\\'")


def _credentials() -> tuple[str | None, str | None]:
    """(user, password) as MLflow reads them: each from the environment, else from the
    [mlflow] section of ~/.mlflow/credentials."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    path = Path(os.path.expanduser("~/.mlflow/credentials"))
    if (user and password) or not path.exists():
        return user, password
    import configparser

    config = configparser.ConfigParser()
    config.read(path)
    saved = config["mlflow"] if "mlflow" in config else {}
    return (user or saved.get("mlflow_tracking_username"),
            password or saved.get("mlflow_tracking_password"))


def _run(run: dict) -> RunRecord:
    """A run of MLflow's REST API, as MLflow's client reads it (protobuf defaults for what the
    server leaves out: an end time of 0 is none)."""
    info, data = run.get("info", {}), run.get("data", {})
    return RunRecord(
        RunInfo(info.get("run_id") or info.get("run_uuid", ""), info.get("experiment_id", ""),
                info.get("user_id", ""), info.get("status", "RUNNING"),
                int(info.get("start_time", 0)), int(info.get("end_time", 0)) or None,
                info.get("lifecycle_stage", ""), info.get("artifact_uri", ""),
                info.get("run_name", "")),
        RunData({t.get("key", ""): t.get("value", "") for t in data.get("tags", [])},
                {p.get("key", ""): p.get("value", "") for p in data.get("params", [])},
                # float() also reads the protobuf JSON of NaN and infinities ("NaN", "Infinity")
                {m.get("key", ""): float(m.get("value", 0.0)) for m in data.get("metrics", [])}))
