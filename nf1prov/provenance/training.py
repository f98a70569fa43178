"""The training process (`nf1prov.provenance.worker` is its entry point), its `Spec` as JSON on
stdin.

`nf1prov train` (the parent) does preflight, the run, the commit and its tags; then it starts
this module with the model commit's code first on `sys.path` (see `code_snapshot`) and waits.
This process checks where its code came from, records the environment it trains in, trains
inside the run, and ends the run itself: FINISHED, FAILED or KILLED with `nf1prov.failure`.
The parent forwards Ctrl-C and SIGTERM to it; if the parent dies, it stops the training.

With ``train.nproc`` > 1 this process starts the data-parallel ranks and waits for them
instead (`nf1prov.provenance.ranks`); rank 0 then does what this docstring says.

Exit codes: 0 trained; 1 the training failed; 2 a user error (the code check); 75 trained, but
the tracking store stopped answering and some logging waits in the outbox (`nf1prov.outbox`);
130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPEC_VERSION = 1
PARENT_CHECK_S = 1.0
RESUMED_AT = "nf1prov.resumed_at"  # unix seconds of each resume, JSON array
# The model trained, but the store stopped answering: the rest of its logging waits in the
# outbox (EX_TEMPFAIL).
LOGGING_PENDING_EXIT = 75
RANK_SPEC_ENV = "NF1PROV_RANK_SPEC"  # the spec file of the ranks (set by `ranks.launch`)


@dataclass
class Spec:
    """Everything the training process needs, as plain JSON data."""

    run_id: str
    tracking_uri: str
    config: dict
    data_root: str
    cache_dir: str
    code_root: str
    resume_from: str | None = None
    argv: list[str] = field(default_factory=list)
    parent_pid: int = 0
    version: int = SPEC_VERSION


def child_environment(spec: Spec) -> dict[str, str]:
    from nf1prov import tracking

    env = tracking.child_environment(spec.tracking_uri)
    for key, value in tracking.TRAINING_HTTP_SETTINGS.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec.code_root, env.get("PYTHONPATH")]))
    env.update(training_threads(spec.config, env).environment())
    return env


def training_threads(config: dict, env: dict[str, str]):
    """The torch threads and OpenMP waiting of the training process (`nf1prov.threads`), read
    by its OpenMP runtime once, as torch starts: per process where this machine runs several
    (ranks; under torchrun those of this machine; search workers), which inherit it."""
    from nf1prov import threads

    t = config["train"]
    ranks_here = int(env.get("LOCAL_WORLD_SIZE", t.get("nproc", 1)))
    processes = max(ranks_here, t.get("search_workers", 1) if t.get("trials", 1) > 1 else 1)
    return threads.choose(t.get("threads", 0), env, processes=processes)


def launch(spec: Spec, client) -> int:
    """Run the training process for ``spec`` and wait; returns its exit code (negative: killed
    by that signal). Ctrl-C and SIGTERM are forwarded to it; no run is left RUNNING."""
    from nf1prov.provenance import run_end, signals

    command = [sys.executable, "-m", "nf1prov.provenance.worker"]
    returncode = None
    try:
        with signals.Forwarder() as forwarder:
            # Its own session: a Ctrl-C at the terminal reaches it once, through this process.
            process = subprocess.Popen(command, cwd=spec.code_root, env=child_environment(spec),
                                       stdin=subprocess.PIPE, start_new_session=True, text=True)
            forwarder.attach(process)
            with contextlib.suppress(BrokenPipeError):  # it died before reading: wait says how
                process.stdin.write(json.dumps(asdict(spec)))
                process.stdin.close()
            returncode = process.wait()
    finally:
        shutil.rmtree(rank_folder(spec), ignore_errors=True)  # left if it was killed
        # client None: a rank other than 0 under torchrun, which leaves the run to rank 0
        if returncode != LOGGING_PENDING_EXIT and client is not None:
            run_end.end_if_running(client, spec.run_id, returncode, "the training process")
    return returncode


# --- inside the training process --------------------------------------------------------------


def watch_parent(parent_pid: int) -> None:
    """Stop the training (as on SIGTERM) when the `nf1prov train` process that waits for it
    is gone: nobody would report its outcome."""
    from nf1prov.provenance import signals

    def loop():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        signals.interrupt_main("the nf1prov train process that started this training died")

    if parent_pid:
        threading.Thread(target=loop, name="nf1prov-parent-watch", daemon=True).start()


def train_in_run(spec: Spec, end_on_failure: bool = True) -> bool:
    """Train in the run; True when everything reached the store, False when some logging is
    saved in the run's outbox for `nf1prov sync` (the store stopped answering). A failure ends
    the run FAILED or KILLED unless ``end_on_failure`` is false (rank 0 of a data-parallel
    training: the launcher ends it with the first cause, `nf1prov.provenance.ranks`)."""
    import mlflow

    from nf1prov import outbox, tracking
    from nf1prov.errors import quiet_disk_full_logging
    from nf1prov.provenance import code_snapshot, run_end, run_tags
    from nf1prov.provenance.heartbeat import Heartbeat

    quiet_disk_full_logging()  # said once, by `disk_full_reported`
    client = outbox.patiently(lambda: tracking.client(spec.tracking_uri), "opening the store")
    code_root = Path(spec.code_root)
    guard = run_end.run_guard(client, spec.run_id) if end_on_failure else contextlib.nullcontext()
    with guard, disk_full_reported(client, spec.run_id):
        from nf1prov.train.run import train_model  # noqa: I001 - imported here: slow
        import models  # noqa: F401 - checked below with everything else

        code_snapshot.check_modules_from(code_root)
        mlflow.set_tracking_uri(spec.tracking_uri)
        spool = outbox.spool_dir(Path(spec.cache_dir), spec.run_id)
        # The run is ended by the outbox (FINISHED, possibly later by `nf1prov sync`) or by
        # run_guard (FAILED, KILLED), not by a `with mlflow.start_run()` that would call the
        # store once more on the way out. The calls before the training starts wait for a
        # store that does not answer (`patiently`); the training's own logging is queued.
        with outbox.opened(client, spool, store=spec.tracking_uri) as box:
            outbox.patiently(lambda: run_tags.log_environment(client, spec.run_id, spec.argv),
                             "recording the environment")
            if spec.resume_from:
                outbox.patiently(lambda: record_resume(client, spec.run_id),
                                 "recording the resume")
            outbox.patiently(lambda: mlflow.start_run(run_id=spec.run_id), "starting the run")
            with Heartbeat(client, spec.run_id) as beat:
                train_model(spec.config, Path(spec.data_root), cache_dir=Path(spec.cache_dir),
                            resume_from=Path(spec.resume_from) if spec.resume_from else None,
                            # no beat while the store is away: each would wait on it
                            on_epoch=lambda *_: None if box.pending else beat.beat())
                # Modules imported late (or by a search trial) must be the commit's too,
                # before the run may end FINISHED.
                code_snapshot.check_modules_from(code_root)
            finished = box.finish(spec.run_id)
    for line in box.outage_lines():
        print(f"nf1prov: note: {line}.", file=sys.stderr)
    return finished


@contextlib.contextmanager
def disk_full_reported(client, run_id: str):
    """A full disk under the store (its database or artifacts) as one `DiskFull` line naming
    the path and its free space, and how to go on: the last checkpoint is left whole (see
    `trainer.check_room`), so `--resume` continues from it once there is room."""
    from nf1prov.errors import DiskFull
    from nf1prov.provenance import run_end

    try:
        yield
    except Exception as exc:
        full = run_end.store_disk_full(exc, client, run_id)
        if full is None:
            raise
        raise DiskFull(f"{full} {resume_hint(client, run_id)}") from None


def resume_hint(client, run_id: str) -> str:
    """How a training stopped by a full disk goes on: from its last checkpoint, if any."""
    try:
        name = client.get_run(run_id).info.run_name
    except Exception:  # noqa: BLE001 - the store may be what failed
        return "Then train again."
    if has_checkpoint(client, run_id):
        return f"Then continue it with `nf1prov train --resume {name}`."
    return "Then train again: it stopped before its first checkpoint."


def has_checkpoint(client, run_id: str) -> bool:
    """True when the run logged checkpoints/last.pt (what `--resume` continues from)."""
    try:
        return any(info.path.endswith("last.pt")
                   for info in client.list_artifacts(run_id, "checkpoints"))
    except Exception:  # noqa: BLE001 - the store may be what failed
        return False


def record_resume(client, run_id: str) -> None:
    from nf1prov import tracking

    run = client.get_run(run_id)
    if tracking.FAILURE in run.data.tags:
        client.delete_tag(run_id, tracking.FAILURE)
    # one more time each resume: split when long (`tracking.long_tag`), never cut
    before = tracking.read_long_tags(run.data.tags)[0].get(RESUMED_AT, "[]")
    resumed = (tracking.json_array_prefix(before) or []) + [round(time.time(), 3)]
    tracking.log_tags(client, run_id, {RESUMED_AT: json.dumps(resumed)}, rewritable=True)


def exit_code(exc: BaseException, error_prefix: str = "nf1prov: error") -> int:
    """The exit code of a training process (or rank) that ``exc`` stopped, after saying why on
    stderr: 130 Ctrl-C, 128 + n a signal, a user error's own code, else 1 with the traceback."""
    from nf1prov.errors import Nf1provError
    from nf1prov.provenance import signals

    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, signals.Interrupted):
        return exc.exit_code
    if isinstance(exc, Nf1provError):
        if not getattr(exc, "recorded_on_run", False):  # else the parent says it, once
            print(f"{error_prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    traceback.print_exc(file=sys.stderr)
    return 1


def rank_folder(spec: Spec) -> Path:
    """Where `ranks.launch` keeps the ranks' spec and their failure records: the workspace's
    ignored `.nf1prov/ranks/<run id>` (0700), which `launch` removes even when the training
    process was killed."""
    return Path(spec.cache_dir).parent / "ranks" / spec.run_id


def is_rank() -> bool:
    """True in one of the processes `ranks.launch` started."""
    return RANK_SPEC_ENV in os.environ
