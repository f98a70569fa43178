"""Ending a run: no run is ever left RUNNING by an exception, an interrupt or a dead process.

`run_guard` ends the run FAILED (an exception) or KILLED (Ctrl-C, SIGTERM) with a one-line
`nf1prov.failure`, then re-raises. `end_if_running` is for the process that waited on another
one: whatever that process managed to record, the run ends with a status.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator

from nf1prov import tracking
from nf1prov.errors import Nf1provError, disk_full, local_folder
from nf1prov.provenance import run_tags, signals


def end_run(client, run_id: str, status: str, reason: str | None = None) -> None:
    """Record the failure reason (if any), then end the run with ``status``."""
    import mlflow

    if reason:
        client.set_tag(run_id, tracking.FAILURE, run_tags.failure_line(reason))
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)
    else:
        client.set_terminated(run_id, status=status)


def end_run_or_warn(client, run_id: str, status: str, reason: str, attempts: int = 3) -> bool:
    """`end_run`, retried (a busy sqlite store, a flaky server); if it still fails, warn and
    return False, so that the exception being handled, not this one, decides the exit code. The
    run then stays RUNNING until `nf1prov list --reap` sees its process gone."""
    for attempt in range(attempts):
        try:
            end_run(client, run_id, status, reason)
            return True
        except Exception as exc:  # noqa: BLE001 - any store error
            error = exc
            if store_disk_full(exc, client):  # no retry fills a disk's free space
                break
            time.sleep(0.5 * (attempt + 1))
    said = store_disk_full(error, client) or error
    print(f"nf1prov: warning: could not mark run {run_id} {status} ({reason}): {said}. "
          "`nf1prov list --reap` marks it FAILED once this process has ended.", file=sys.stderr)
    return False


def store_disk_full(exc: BaseException, client, run_id: str | None = None):
    """`errors.disk_full`, naming the store's database, or ``run_id``'s artifact folder, when
    the error names no file."""
    if disk_full(exc) is None:  # the common case asks the store nothing
        return None
    files = None
    if run_id is not None:
        with contextlib.suppress(Exception):  # reading works on a full disk
            files = local_folder(client.get_run(run_id).info.artifact_uri)
    return disk_full(exc, tracking.sqlite_path(getattr(client, "tracking_uri", "") or ""), files)


def failure_reason(exc: BaseException) -> str:
    """The `nf1prov.failure` of a run that ``exc`` ended: an nf1prov error's own message (it is
    written for the user), else the exception's type and text."""
    if isinstance(exc, Nf1provError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def run_guard(client, run_id: str) -> Iterator[None]:
    """End the run KILLED or FAILED with a reason on any exception, then re-raise it."""
    try:
        yield
    except KeyboardInterrupt:
        end_run_or_warn(client, run_id, "KILLED", "interrupted by Ctrl-C (SIGINT)")
        raise
    except signals.Interrupted as exc:
        end_run_or_warn(client, run_id, "KILLED", exc.reason)
        raise
    except BaseException as exc:
        if signals.sigterm_received():
            reason = signals.sigterm_reason()
            end_run_or_warn(client, run_id, "KILLED", reason)
            raise signals.Interrupted(reason, 128 + signal.SIGTERM) from exc
        if end_run_or_warn(client, run_id, "FAILED", failure_reason(exc)):
            exc.recorded_on_run = True  # the parent reports it from the run: no second line
        raise


INTERRUPTS = {signal.SIGINT: "interrupted by Ctrl-C (SIGINT)",
              signal.SIGTERM: "killed by SIGTERM"}
# Exit codes of a process stopped by Ctrl-C or SIGTERM (its own 128+n, or killed by the signal).
INTERRUPT_EXITS = {code: signum for signum in INTERRUPTS for code in (128 + signum, -signum)}


def end_if_running(client, run_id: str, returncode: int | None, what: str) -> None:
    """End the run if the process ``what`` (which should have ended it) left it RUNNING:
    KILLED when it was interrupted or we were (``returncode`` None), else FAILED."""
    if client.get_run(run_id).info.status != "RUNNING":
        return
    if returncode is None:
        end_run_or_warn(client, run_id, "KILLED", f"interrupted while waiting for {what}")
    elif returncode in INTERRUPT_EXITS:  # interrupted before it could end the run itself
        end_run_or_warn(client, run_id, "KILLED", INTERRUPTS[INTERRUPT_EXITS[returncode]])
    elif returncode < 0:
        name = signal.Signals(-returncode).name
        status = "KILLED" if -returncode in (signal.SIGINT, signal.SIGTERM) else "FAILED"
        end_run_or_warn(client, run_id, status, f"{what} was killed by {name}")
    else:
        end_run_or_warn(client, run_id, "FAILED",
                        f"{what} ended (exit {returncode}) without ending its run")
