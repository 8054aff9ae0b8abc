"""Stopping long work on Ctrl+C or SIGTERM without losing it.

Inside `stop_on_signals`, SIGINT and SIGTERM do not end the process: they record a stop request, which
training reads after every optimiser step (it then saves a checkpoint and stops, `SaveOnSignal`) and the
ablation between runs. The same signal again, at least `REPEAT_AFTER_S` later, acts as it would without
this (KeyboardInterrupt for SIGINT, termination for SIGTERM); a copy within that time is the same request
(torchrun forwards to its workers the signal their process group already got). A signal whose handler is
SIG_IGN stays ignored. Only the main thread can handle signals; elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Seconds after the first signal during which the same signal again is the same request.
REPEAT_AFTER_S = 2.0


class _Request:
    """The process's stop request: the signal that made it, when, and which process installed the handler
    (forked children, e.g. data-loader workers, inherit it but do not log)."""

    signum: int | None = None
    at: float = 0.0
    owner: int = 0


_request = _Request()


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _request.signum


def _handle(signum: int, frame: Any) -> None:
    if _request.signum is None:
        _request.signum, _request.at = signum, time.monotonic()
        if os.getpid() == _request.owner:
            logger.warning(
                "%s: stopping once the work in progress is saved (the same signal again, %g s or more later, "
                "stops at once)",
                signal.Signals(signum).name,
                REPEAT_AFTER_S,
            )
    elif signum == _request.signum and time.monotonic() - _request.at >= REPEAT_AFTER_S:
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)


def install() -> dict[int, Any]:
    """Handle the signals from now on (main thread only; not those already handled so or ignored); return
    the handlers replaced, for `restore`. A new handler, or the first call in a forked process (e.g. as a
    process pool's initializer), starts with no request."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current not in (_handle, signal.SIG_IGN):
            replaced[sig] = signal.signal(sig, _handle)
    if replaced or _request.owner != os.getpid():  # a new handler, or one a forked worker inherited
        _request.signum, _request.owner = None, os.getpid()
    return replaced


def restore(replaced: dict[int, Any]) -> None:
    """Put back the handlers `install` replaced."""
    for sig, previous in replaced.items():
        signal.signal(sig, previous)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Signals are stop requests for the duration. Leaving it normally with a request no one acted on (it came
    after the work's last check) delivers the signal again, to the handler that was there before: the work
    is then complete and written, and the process still stops as asked. Nested uses share one request."""
    replaced = install()
    try:
        yield
    finally:
        restore(replaced)
    pending = _request.signum
    if replaced and pending is not None and pending in replaced:
        _request.signum = None
        signal.raise_signal(pending)
