"""Ctrl+C / SIGTERM as stop requests (`med2e3.stopping`), and errors that cross process boundaries intact."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from pathlib import Path

import pytest

from med2e3 import stopping
from med2e3.errors import DatasetError, Interrupted, OutputError, TrainingInterrupted, VolumeError
from med2e3.release import ReleaseError
from med2e3.server.uploads import UploadError


@pytest.fixture
def recorded():
    """SIGINT and SIGTERM handled by a recorder during the test (the handlers before are put back after)."""
    seen: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: seen.append(signum)) for sig in stopping.SIGNALS
    }
    yield seen
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_a_signal_is_a_request_and_a_late_one_is_delivered_on_leaving(recorded):
    with stopping.stop_on_signals():
        assert stopping.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopping.requested() == signal.SIGTERM and recorded == []  # the process goes on
    assert recorded == [signal.SIGTERM]  # no one acted on it: delivered to the handler from before
    assert signal.getsignal(signal.SIGTERM) is not stopping._handle


def test_work_that_acts_on_the_request_is_not_signalled_again(recorded):
    with pytest.raises(Interrupted, match="SIGINT: stopped"):
        with stopping.stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
            raise Interrupted(stopping.requested(), "stopped")
    assert recorded == []
    with stopping.stop_on_signals():  # a new handler starts without the old request
        assert stopping.requested() is None


def test_nested_uses_share_one_request_delivered_by_the_outer(recorded):
    with stopping.stop_on_signals():
        with stopping.stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
        assert recorded == [] and stopping.requested() == signal.SIGTERM
    assert recorded == [signal.SIGTERM]


def test_the_same_signal_again_stops_at_once_after_the_repeat_window(recorded, monkeypatch):
    with stopping.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: a copy (torchrun forwards the group's)
        assert stopping.requested() == signal.SIGINT
        monkeypatch.setattr(stopping, "REPEAT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_ignored_signals_stay_ignored_and_other_threads_change_nothing(recorded):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stopping.stop_on_signals():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is stopping._handle
    handlers: list[object] = []

    def in_thread() -> None:
        with stopping.stop_on_signals():
            handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert handlers and handlers[0] is not stopping._handle


@pytest.mark.parametrize(
    "error",
    [
        VolumeError(Path("scan.nii.gz"), "not a NIfTI file"),
        DatasetError(Path("qa.csv"), "no rows", row=3),
        OutputError(Path("out"), "not writable"),
        ReleaseError(Path("release"), "missing vision3d_model/"),
        UploadError("scan.npy", "too large", 413),
        Interrupted(signal.SIGTERM, "stopped"),
        TrainingInterrupted(signal.SIGINT, Path("run/checkpoint-6")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(error):
    """A worker process's error reaches its parent as itself (an unpicklable one breaks the whole pool)."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)
