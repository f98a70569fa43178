"""Ctrl-C and SIGTERM during a training: turned into exceptions, held back across the steps that
must not be cut in half, and forwarded to the training process.

- `sigterm_as_exception`: SIGTERM raises `Interrupted` in the main thread (Ctrl-C already
  raises KeyboardInterrupt), so the run can be ended KILLED with a reason.
- `deferred`: SIGINT and SIGTERM wait until the block is done (the model commit and its tags),
  then act as usual. Blocked at the OS level too, so the git processes started inside the block
  are not killed by a Ctrl-C sent to the terminal's process group.
- `Forwarder`: while `nf1prov train` waits for its training process, each signal it gets is
  passed on to that process, which ends its run itself.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM (like KeyboardInterrupt for Ctrl-C)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


# Set once SIGTERM arrived: the Interrupted raised by the handler may surface wrapped in another
# exception (e.g. when it lands inside MLflow's or SQLAlchemy's code), and must still mean KILLED.
_sigterm_received = False
# Why SIGTERM arrived, when the process sent it to itself (see `interrupt_main`).
_sigterm_reason = "killed by SIGTERM"


def sigterm_received() -> bool:
    return _sigterm_received


def sigterm_reason() -> str:
    return _sigterm_reason


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into `Interrupted` in the main thread for the duration (no-op elsewhere)."""
    global _sigterm_received, _sigterm_reason
    _sigterm_received = False  # a new training: an earlier one's SIGTERM does not count
    _sigterm_reason = "killed by SIGTERM"

    def handler(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        raise Interrupted(_sigterm_reason, 128 + signal.SIGTERM)

    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_main(reason: str) -> None:
    """From any thread: make the main thread act as on SIGTERM, with ``reason``."""
    import _thread

    global _sigterm_reason
    _sigterm_reason = reason
    _thread.interrupt_main(signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver the first one that came
    to the handler that was in place before (outside the main thread: no-op)."""
    if not _main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda s, f: received.append(s))
                for signum in HANDLED}
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        # Consume what arrived while blocked, without running any handler yet.
        pending = signal.sigpending() & set(HANDLED)
        for signum in pending:
            signal.sigtimedwait({signum}, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        arrived = received + sorted(pending)
        if arrived:
            _deliver(arrived[0], previous[arrived[0]])


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


class Forwarder:
    """While installed (a context manager), SIGINT and SIGTERM are passed on to the attached
    process instead of acting here; a signal that comes before `attach` is passed on then."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.received: list[int] = []
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    def attach(self, process: subprocess.Popen) -> None:
        self.process = process
        for signum in self.received:
            self._send(signum)

    def __enter__(self) -> Forwarder:
        if _main_thread():
            self._previous = {signum: signal.signal(signum, self._handler) for signum in HANDLED}
        return self

    def __exit__(self, *exc) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old)
