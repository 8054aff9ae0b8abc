"""Exception types, one per failure family.

Every error carries the offending path (when there is one) and a plain reason, so
the CLI can print one line and exit non-zero.
"""

from __future__ import annotations

import signal
from pathlib import Path


class Med2E3Error(Exception):
    """Base class of all errors raised on purpose by med2e3. Picklable whatever a subclass's ``__init__``
    takes (an error raised in a worker process reaches its parent whole): the copy is made from the
    original's message and attributes, without calling ``__init__`` again."""

    def __reduce__(self):
        return _rebuild_error, (type(self), self.args, self.__dict__)


def _rebuild_error(cls: type[Med2E3Error], args: tuple, state: dict) -> Med2E3Error:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class VolumeError(Med2E3Error, ValueError):
    """A volume cannot be read or is not a usable 3D image."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path is not None else reason)


class VolumeSizeError(VolumeError):
    """A volume is larger than the configured limit (its header says so before anything is read)."""


class DatasetError(Med2E3Error, ValueError):
    """A dataset file or one of its rows is malformed."""

    def __init__(self, path: str | Path | None, reason: str, row: int | str | None = None):
        self.path = None if path is None else Path(path)
        self.reason = reason
        self.row = row
        where = str(path) if path is not None else "dataset"
        if row is not None:
            where += f" (row {row})"
        super().__init__(f"{where}: {reason}")


class InputError(Med2E3Error, ValueError):
    """Model inputs (prompt, question, tensors) are malformed."""


class ConfigError(Med2E3Error, ValueError):
    """A configuration is invalid: names the field and the problem."""


class OutputError(Med2E3Error, ValueError):
    """An output path cannot be written safely (a file where a folder belongs, not writable, not ours)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Interrupted(Med2E3Error):
    """Long work stopped on a signal (`med2e3.stopping`); what it finished is kept."""

    def __init__(self, signum: int, what: str):
        self.signum = signum
        self.what = what
        super().__init__(f"{signal.Signals(signum).name}: {what}")


class TrainingInterrupted(Interrupted):
    """A training run stopped on a signal after saving a checkpoint; the same run resumes from it."""

    def __init__(self, signum: int, checkpoint: str | Path):
        self.checkpoint = Path(checkpoint)
        super().__init__(signum, f"stopped after saving {checkpoint}; the same command resumes from it")
