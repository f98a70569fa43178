"""Tell a live RUNNING run from one whose process died without a word (power loss, OOM kill).

A training process records its host and pid and refreshes a heartbeat tag about every minute
(`nf1prov.provenance.heartbeat`). A RUNNING run is *crashed* when its heartbeat is older than
`STALE_AFTER_S`, or when it ran on this host and its pid no longer exists.
"""

from __future__ import annotations

import os
import socket
import time

from nf1prov import tracking

HEARTBEAT_INTERVAL_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_INTERVAL_S

CRASHED = "CRASHED"  # a display state, never written to MLflow's status column


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def last_heartbeat(run) -> float | None:
    value = run.data.tags.get(tracking.HEARTBEAT)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def run_state(run, now: float | None = None) -> str:
    """MLflow status (FINISHED, FAILED, KILLED, RUNNING...), or CRASHED for a dead RUNNING run."""
    status = run.info.status
    if status != "RUNNING":
        return status
    tags = run.data.tags
    if tags.get(tracking.HOST) == socket.gethostname() and tags.get(tracking.PID, "").isdigit():
        # On its own host the process table is the truth (a laptop that slept has a stale
        # heartbeat but a live process).
        return "RUNNING" if _pid_alive(int(tags[tracking.PID])) else CRASHED
    beat = last_heartbeat(run)
    if beat is None:
        # No heartbeat at all: judge by the start time (runs not made by nf1prov train).
        beat = (run.info.start_time or 0) / 1000.0
    now = time.time() if now is None else now
    return CRASHED if now - beat > STALE_AFTER_S else "RUNNING"


def crash_reason(run) -> str:
    """The nf1prov.failure text recorded when a crashed run is reaped."""
    beat = last_heartbeat(run)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beat)) if beat else "never"
    return f"process ended without finishing (last heartbeat {when})"
