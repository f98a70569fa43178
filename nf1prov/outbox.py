"""Logging that outlives a tracking server going away in the middle of a training.

The training process logs through an `Outbox` instead of MLflow's fluent calls. While the store
answers, each call goes straight through. When a call fails because the store cannot be
reached (connection refused or reset, a timeout, a 502/503/504, a locked sqlite file), it is
queued, with a copy of any file it would upload, and the training goes on; later calls queue
behind it in order, and the queue is retried at most every `RETRY_EVERY_S` seconds. At the end
of the training `finish` waits up to `patience_s` for the store to come back; what still cannot
be delivered is written to ``<workspace>/.nf1prov/outbox/<run_id>/pending.json`` (files beside
it), and `replay` (``nf1prov sync``) delivers it later. So nothing that was trained is lost, and
the outcome says what was not logged.

Only transport failures are queued. Any other error (a value MLflow refuses, a missing run)
raises at once, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

RETRY_EVERY_S = 10.0
PENDING_FILE = "pending.json"
OUTBOX_DIR = "outbox"  # beside the cache, in the workspace's .nf1prov/
PATIENCE_ENV = "NF1PROV_STORE_PATIENCE_S"
DEFAULT_PATIENCE_S = 120.0
# MLflow's own batch limits for log_batch.
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
# How failed transports read once MLflow has wrapped them into an MlflowException's text.
UNREACHABLE_MARKERS = ("max retries exceeded", "connection refused", "connection aborted",
                       "connection reset", "remotedisconnected", "read timed out",
                       "connecttimeout", "readtimeout", "failed to establish",
                       "temporarily_unavailable", "database is locked", "bad gateway",
                       "service unavailable", "gateway timeout")
# "... failed with error code 503 != 200", "too many 503 error responses"
UNREACHABLE_STATUS = re.compile(r"\b(?:code|many) 50[234]\b")


def is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the store could not be reached, as opposed
    to a store that answered and refused."""
    try:
        import requests
        transport = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover - mlflow depends on requests
        transport = ()
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, transport + (ConnectionError, TimeoutError)):
            return True
        text = str(exc).lower()
        if any(marker in text for marker in UNREACHABLE_MARKERS) \
                or UNREACHABLE_STATUS.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def patiently(action, what: str, patience_s: float | None = None):
    """``action()``, retried while the store cannot be reached, for up to ``patience_s``
    (default $NF1PROV_STORE_PATIENCE_S or 120 s): for the few calls whose answer the training
    needs before it can go on (starting the run, reading its params), which cannot be queued."""
    if patience_s is None:
        patience_s = float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE_S))
    deadline = time.monotonic() + patience_s
    said = False
    while True:
        try:
            return action()
        except Exception as exc:
            if not is_unreachable(exc) or time.monotonic() >= deadline:
                raise
            if not said:
                print(f"nf1prov: note: the tracking store does not answer ({what}); retrying "
                      f"for up to {patience_s:.0f} s.", file=sys.stderr)
                said = True
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


class Outbox:
    """MLflow logging for one training process, queued while the store is unreachable.

    ``spool`` is this run's folder under ``.nf1prov/outbox/``; ``queue`` False makes every
    failure raise at once (a caller that did not open an outbox, e.g. a test driving
    `train_model` inside its own run).
    """

    def __init__(self, client, spool: Path | None, *, queue: bool = True,
                 retry_every_s: float = RETRY_EVERY_S, store: str | None = None):
        self.client, self.spool, self.queueing = client, spool, queue and spool is not None
        self.store = store  # the tracking URI, saved with the queue for `nf1prov sync`
        self.retry_every_s = retry_every_s
        self.pending: list[dict] = []
        self.last_attempt = 0.0
        self.outages: list[list[float]] = []  # [down since, back at (or None)]
        self.delivered_late = 0

    # --- what the trainer calls ------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None,
                    run_id: str | None = None) -> None:
        now = int(time.time() * 1000)
        items = [[key, float(value), now, step or 0] for key, value in metrics.items()]
        self._submit({"op": "batch", "run_id": self._run(run_id), "metrics": items})

    def log_params(self, params: dict[str, str], run_id: str | None = None) -> None:
        self._submit({"op": "batch", "run_id": self._run(run_id),
                      "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        self._submit({"op": "batch", "run_id": self._run(run_id),
                      "tags": {k: str(v) for k, v in tags.items()}})

    def log_text(self, text: str, artifact_file: str, run_id: str | None = None) -> None:
        self._submit({"op": "text", "run_id": self._run(run_id), "text": text,
                      "artifact_file": artifact_file})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None,
                     run_id: str | None = None) -> None:
        """Upload a file; a queued upload of the same name replaces an earlier one still
        queued (only the newest checkpoint matters)."""
        self._submit({"op": "file", "run_id": self._run(run_id), "path": str(path),
                      "artifact_path": artifact_path})

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None,
                      run_id: str | None = None) -> None:
        self._submit({"op": "folder", "run_id": self._run(run_id), "path": str(folder),
                      "artifact_path": artifact_path})

    def log_logged_model(self, folder: Path | str, *, metrics: dict[str, float] | None = None,
                         step: int = 0, params: dict[str, str] | None = None,
                         tags: dict[str, str] | None = None,
                         dataset: tuple[str, str] | None = None,
                         run_id: str | None = None) -> None:
        """The MLflow model saved in ``folder`` as the run's logged model, with ``params`` and
        ``tags``, ``metrics`` linked to it and to ``dataset``
        (`nf1prov.tracking.log_logged_model`)."""
        now = int(time.time() * 1000)
        self._submit({"op": "logged_model", "run_id": self._run(run_id), "path": str(folder),
                      "upload": uuid.uuid4().hex, "step": step, "params": params or {},
                      "tags": tags or {}, "dataset": list(dataset) if dataset else None,
                      "metrics": [[k, float(v), now, step] for k, v in (metrics or {}).items()]})

    def set_terminated(self, status: str, run_id: str) -> None:
        self._submit({"op": "end", "run_id": run_id, "status": status})

    # --- delivery ------------------------------------------------------------------------------

    def flush(self, patience_s: float = 0.0) -> bool:
        """Deliver the queue in order, retrying for up to ``patience_s`` seconds; True when
        nothing is left."""
        deadline = time.monotonic() + patience_s
        while True:
            self.last_attempt = time.monotonic()
            while self.pending:
                try:
                    self._apply(self.pending[0])
                except Exception as exc:
                    if not is_unreachable(exc):
                        raise
                    break
                self.pending.pop(0)
                self.delivered_late += 1
            if not self.pending:
                if self.outages and self.outages[-1][1] is None:
                    self.outages[-1][1] = time.time()
                if self.spool is not None and self.queueing:
                    shutil.rmtree(self.spool, ignore_errors=True)  # copies no longer needed
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(self.retry_every_s, max(0.0, deadline - time.monotonic())))

    def finish(self, run_id: str, status: str = "FINISHED",
               patience_s: float | None = None) -> bool:
        """End the training's logging: deliver the queue (waiting up to ``patience_s``, default
        $NF1PROV_STORE_PATIENCE_S or 120 s), then end the run with ``status``. True when
        everything reached the store; else the rest is saved for ``nf1prov sync``."""
        if patience_s is None:
            patience_s = float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE_S))
        delivered = not self.pending or self.flush(patience_s)
        if self._end(run_id, status) and delivered:
            return True
        if not any(item["op"] == "end" for item in self.pending):
            self._queue({"op": "end", "run_id": run_id, "status": status})
        self.save()
        return False

    def _end(self, run_id: str, status: str) -> bool:
        """End the run now; False when the store cannot be reached. The fluent active run is
        ended through `mlflow.end_run`, which forgets it before calling the store, so that
        MLflow's exit hook does not try again."""
        import mlflow

        active = mlflow.active_run()
        try:
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run(status)
            else:
                self.client.set_terminated(run_id, status)
        except Exception as exc:
            if not (self.queueing and is_unreachable(exc)):
                raise
            return False
        return True

    def summary(self) -> str:
        """What is still queued, in words: '12 metric values; artifacts checkpoints/last.pt; the
        MLflow model (the weights); the run's end'."""
        counts: dict[str, int] = {}
        artifacts: list[str] = []
        for item in self.pending:
            if item["op"] == "batch":
                for kind in ("metrics", "params", "tags"):
                    if item.get(kind):
                        counts[kind] = counts.get(kind, 0) + len(item[kind])
            elif item["op"] in ("file", "folder", "text"):
                artifacts.append(_artifact_name(item))
            elif item["op"] in ("logged_model", "end"):
                counts[item["op"]] = 1
        parts = [f"{n} {'metric values' if k == 'metrics' else k}" for k, n in counts.items()
                 if k not in ("logged_model", "end")]
        if artifacts:
            parts.append("artifacts " + ", ".join(dict.fromkeys(artifacts)))
        if "logged_model" in counts:  # the run's logged model "model": where its weights are
            parts.append("the MLflow model (the weights)")
        if "end" in counts:
            parts.append("the run's end")
        return "; ".join(parts) or "nothing"

    def outage_lines(self) -> list[str]:
        lines = []
        for down, back in self.outages:
            start = time.strftime("%H:%M:%S", time.localtime(down))
            if back is None:
                lines.append(f"the tracking store stopped answering at {start}")
            else:
                lines.append(f"the tracking store did not answer for {back - down:.0f} s "
                             f"(from {start}); what was queued meanwhile was logged when it "
                             "came back")
        return lines

    def save(self) -> Path:
        """Write the queue to ``spool/pending.json`` (files are already copied beside it)."""
        assert self.spool is not None
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / PENDING_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "store": self.store,
                                   "pending": self.pending}, indent=1),
                       encoding="utf-8")
        tmp.replace(path)
        return path

    # --- internals -----------------------------------------------------------------------------

    def _run(self, run_id: str | None) -> str:
        if run_id is not None:
            return run_id
        import mlflow

        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no active MLflow run to log to")
        return active.info.run_id

    def _submit(self, item: dict) -> None:
        if self.pending:
            self._queue(item)
            if time.monotonic() - self.last_attempt >= self.retry_every_s:
                self.flush()
            return
        try:
            self._apply(item)
        except Exception as exc:
            if not (self.queueing and is_unreachable(exc)):
                raise
            self.outages.append([time.time(), None])
            self.last_attempt = time.monotonic()
            self._queue(item)

    def _queue(self, item: dict) -> None:
        """Append ``item``, copying any file it names into the spool (the caller's temporary
        files are gone by the time it is delivered)."""
        if not self.queueing:
            raise RuntimeError("this outbox does not queue")
        if item["op"] in ("file", "folder", "logged_model"):
            source = Path(item["path"])
            copy = self.spool / "files" / uuid.uuid4().hex / source.name
            copy.parent.mkdir(parents=True)
            if item["op"] == "file":
                shutil.copy2(source, copy)
                name = _artifact_name(item)
                for old in [p for p in self.pending if p["op"] == "file"
                            and p["run_id"] == item["run_id"] and _artifact_name(p) == name]:
                    self.pending.remove(old)
                    shutil.rmtree(Path(old["path"]).parent, ignore_errors=True)
            else:
                shutil.copytree(source, copy)
            item = {**item, "path": str(copy)}
        self.pending.append(item)

    def _apply(self, item: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id, op = item["run_id"], item["op"]
        if op == "batch":
            metrics = [Metric(k, v, t, s) for k, v, t, s in item.get("metrics", [])]
            params = [Param(k, v) for k, v in item.get("params", {}).items()]
            tags = [RunTag(k, v) for k, v in item.get("tags", {}).items()]
            for chunk in _chunks(metrics, params, tags):
                self.client.log_batch(run_id, **chunk)
        elif op == "text":
            self.client.log_text(run_id, item["text"], item["artifact_file"])
        elif op == "file":
            self.client.log_artifact(run_id, item["path"], item["artifact_path"])
        elif op == "folder":
            self.client.log_artifacts(run_id, item["path"], item["artifact_path"])
        elif op == "logged_model":
            from nf1prov.tracking import log_logged_model

            log_logged_model(self.client, run_id, Path(item["path"]), upload=item["upload"],
                             step=item["step"], params=item["params"], tags=item["tags"],
                             metrics=item["metrics"],
                             dataset=tuple(item["dataset"]) if item["dataset"] else None)
        elif op == "end":
            if item["status"] == "FINISHED":  # `list --reap` may have failed it meanwhile
                from nf1prov.tracking import FAILURE

                if FAILURE in self.client.get_run(run_id).data.tags:
                    self.client.delete_tag(run_id, FAILURE)
            self.client.set_terminated(run_id, item["status"])
        else:
            raise ValueError(f"unknown outbox operation {op!r}")


def _artifact_name(item: dict) -> str:
    if item["op"] == "text":
        return item["artifact_file"]
    name = Path(item["path"]).name
    prefix = item.get("artifact_path")
    return f"{prefix}/" if item["op"] == "folder" and prefix else \
        (f"{prefix}/{name}" if prefix else name)


def _chunks(metrics: list, params: list, tags: list) -> Iterator[dict]:
    while metrics or params or tags:
        yield {"metrics": metrics[:BATCH_LIMITS["metrics"]],
               "params": params[:BATCH_LIMITS["params"]], "tags": tags[:BATCH_LIMITS["tags"]]}
        metrics = metrics[BATCH_LIMITS["metrics"]:]
        params, tags = params[BATCH_LIMITS["params"]:], tags[BATCH_LIMITS["tags"]:]


# --- the process-wide outbox ------------------------------------------------------------------

_current: Outbox | None = None


def current() -> Outbox:
    """The outbox of this training process, or one that logs straight to MLflow's current
    store and raises on any failure (training driven without `opened`)."""
    if _current is not None:
        return _current
    import mlflow

    return Outbox(mlflow.MlflowClient(), None, queue=False)


@contextlib.contextmanager
def opened(client, spool: Path, store: str | None = None) -> Iterator[Outbox]:
    """Make an outbox spooling into ``spool`` this process's `current` one."""
    global _current
    previous, _current = _current, Outbox(client, spool, store=store)
    try:
        yield _current
    finally:
        _current = previous


def outbox_root(cache_dir: Path) -> Path:
    """``.nf1prov/outbox`` beside the workspace's cache ``.nf1prov/cache``."""
    return Path(cache_dir).parent / OUTBOX_DIR


def spool_dir(cache_dir: Path, run_id: str) -> Path:
    return outbox_root(cache_dir) / run_id


def saved(outbox_root: Path) -> list[Path]:
    """The spools with undelivered logging under ``.nf1prov/outbox``."""
    if not outbox_root.is_dir():
        return []
    return sorted(p.parent for p in outbox_root.glob(f"*/{PENDING_FILE}"))


def load_saved(client, spool: Path) -> Outbox:
    """The outbox saved in ``spool``, ready to `flush`."""
    data = json.loads((spool / PENDING_FILE).read_text(encoding="utf-8"))
    box = Outbox(client, spool, store=data.get("store"))
    box.pending = list(data["pending"])
    return box


def saved_store(spool: Path) -> str | None:
    """The tracking URI a saved spool is for."""
    try:
        return json.loads((spool / PENDING_FILE).read_text(encoding="utf-8")).get("store")
    except (OSError, ValueError):
        return None


def describe_saved(spool: Path) -> str:
    """What a saved spool holds, in words (`Outbox.summary`)."""
    try:
        return load_saved(None, spool).summary()
    except (OSError, ValueError, KeyError):
        return "the rest of its logging"


def replay(client, spool: Path) -> Outbox:
    """Deliver a saved spool (``nf1prov sync``); removes it once everything is logged.
    Raises ConnectionError (the store still unreachable) with the undelivered rest saved."""
    box = load_saved(client, spool)
    delivered = box.flush()
    if not delivered:
        box.save()
        raise ConnectionError(f"the tracking store did not take {box.summary()}")
    return box
