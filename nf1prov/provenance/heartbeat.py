"""The heartbeat of a training process: host, pid and a regularly refreshed timestamp tag.

`nf1prov.provenance.liveness` reads them to tell a live RUNNING run from a crashed one.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from nf1prov import tracking
from nf1prov.provenance import liveness


def identity_tags() -> dict[str, str]:
    """HOST, PID and a first HEARTBEAT, set when the run is created (before anything can fail)."""
    return {tracking.HOST: socket.gethostname(), tracking.PID: str(os.getpid()),
            tracking.HEARTBEAT: f"{time.time():.3f}"}


class Heartbeat:
    """Context manager: a daemon thread refreshing HEARTBEAT every ``interval`` seconds.

    Errors while writing the tag (store briefly unreachable) are ignored: a missed beat only
    makes the run look older, and the process-table check on the same host stays exact.
    """

    def __init__(self, client, run_id: str, interval: float = liveness.HEARTBEAT_INTERVAL_S):
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nf1prov-heartbeat", daemon=True)

    def beat(self) -> None:
        try:
            self.client.set_tag(self.run_id, tracking.HEARTBEAT, f"{time.time():.3f}")
        except Exception:  # noqa: BLE001 - see class docstring
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        from nf1prov import outbox

        def identify() -> None:
            for key, value in identity_tags().items():
                self.client.set_tag(self.run_id, key, value)

        outbox.patiently(identify, "recording the training process")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
