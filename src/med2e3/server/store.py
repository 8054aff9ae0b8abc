"""Uploaded volumes: a private temporary folder, an LRU of encoded volumes, and time-to-live deletion."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from med2e3.data.io import Volume
from med2e3.inference import LoadedVolume


class UnknownVolume(KeyError):
    """No upload with this id (never uploaded, deleted, or expired)."""


@dataclass
class StoredVolume:
    """One upload on disk: what `load_volume` reads, and what the API reports about it."""

    id: str
    source: Path  # a file or DICOM folder inside the store's private folder
    label: str  # the client's file name, for display only
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    intensity: str
    value_range: tuple[float, float]
    disk_bytes: int
    warning: str | None = None  # why answers about it may be unreliable (e.g. an MRI under a CT window)
    last_used: float = field(default=0.0)

    def info(self) -> dict:
        return {
            "id": self.id,
            "name": self.label,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "n_slices": self.shape[0],
            "intensity": self.intensity,
            "warning": self.warning,
        }


class VolumeStore:
    """Uploads under a server-owned temporary folder, keyed by server-generated ids.

    Thread-safe: the event loop and the model thread both use it. Bounded three ways: uploads
    unused for ``ttl_s`` are removed by `sweep`, at most ``max_stored`` uploads / ``max_disk_bytes``
    stay on disk, and at most ``max_loaded`` encoded volumes stay in memory, plus at most
    ``max_loaded`` volumes read again without their encoding (for the viewer, see `keep_volume`).
    """

    def __init__(
        self,
        ttl_s: float,
        max_stored: int,
        max_disk_bytes: int,
        max_loaded: int,
        parent: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.parent = parent
        self._root: Path | None = None
        self.ttl_s = ttl_s
        self.max_stored = max_stored
        self.max_disk_bytes = max_disk_bytes
        self.max_loaded = max_loaded
        self.clock = clock
        self._lock = threading.RLock()
        self._entries: dict[str, StoredVolume] = {}
        self._loaded: OrderedDict[str, LoadedVolume] = OrderedDict()
        self._volumes: OrderedDict[str, Volume] = OrderedDict()

    def open(self) -> Path:
        """Make the private folder (mode 0700) unless it exists; return it."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="med2e3-server-", dir=self.parent))
        return self._root

    @property
    def root(self) -> Path:
        """The private folder, made on first use."""
        return self.open()

    def __len__(self) -> int:
        return len(self._entries)

    def reserve(self) -> tuple[str, Path]:
        """A new id and its empty folder."""
        vid = secrets.token_hex(16)
        folder = self.root / vid
        folder.mkdir()
        return vid, folder

    def discard(self, vid: str) -> None:
        """Delete a reserved or stored upload (no error if it is gone)."""
        with self._lock:
            self._entries.pop(vid, None)
            self._loaded.pop(vid, None)
            self._volumes.pop(vid, None)
        shutil.rmtree(self.root / vid, ignore_errors=True)

    def add(
        self, vid: str, source: Path, label: str, loaded: LoadedVolume, warning: str | None = None
    ) -> StoredVolume:
        """Register an upload whose files are in its folder, evicting the least recently used beyond the limits."""
        volume = loaded.volume
        entry = StoredVolume(
            id=vid,
            source=source,
            label=label,
            shape=volume.shape,
            spacing=tuple(round(float(s), 4) for s in volume.spacing),  # type: ignore[arg-type]
            intensity=volume.intensity,
            value_range=(float(volume.array.min()), float(volume.array.max())),
            disk_bytes=_disk_bytes(self.root / vid),
            warning=warning,
        )
        with self._lock:  # stamped under the lock: the newest entry is never the one evicted
            entry.last_used = self.clock()
            self._entries[vid] = entry
            self.cache(vid, loaded)
            for old in self._over_limits():
                self.discard(old)
        return entry

    def _over_limits(self) -> list[str]:
        by_age = sorted(self._entries.values(), key=lambda e: e.last_used)
        total = sum(e.disk_bytes for e in by_age)
        evict = []
        while by_age[:-1] and (len(by_age) > self.max_stored or total > self.max_disk_bytes):
            old = by_age.pop(0)
            total -= old.disk_bytes
            evict.append(old.id)
        return evict

    def get(self, vid: str) -> StoredVolume:
        """The upload ``vid``, marked as used now.

        Raises:
            UnknownVolume: no such upload.
        """
        with self._lock:
            entry = self._entries.get(vid)
            if entry is None:
                raise UnknownVolume(vid)
            entry.last_used = self.clock()
            return entry

    def loaded(self, vid: str) -> LoadedVolume | None:
        """The cached encoding of ``vid`` (most recently used now), or None."""
        with self._lock:
            loaded = self._loaded.get(vid)
            if loaded is not None:
                self._loaded.move_to_end(vid)
            return loaded

    def cache(self, vid: str, loaded: LoadedVolume) -> None:
        """Keep ``loaded`` in memory, dropping the least recently used beyond ``max_loaded``."""
        with self._lock:
            if vid not in self._entries:
                return
            self._volumes.pop(vid, None)
            _remember(self._loaded, vid, loaded, self.max_loaded)

    def keep_volume(self, vid: str, volume: Volume) -> None:
        """Keep the volume of an upload whose encoding left the cache, so that slices need not read it again."""
        with self._lock:
            if vid in self._entries and vid not in self._loaded:
                _remember(self._volumes, vid, volume, self.max_loaded)

    def volume(self, vid: str) -> Volume | None:
        """The original volume if it is in memory, else None (the caller reads ``source``)."""
        loaded = self.loaded(vid)
        if loaded is not None:
            return loaded.volume
        with self._lock:
            volume = self._volumes.get(vid)
            if volume is not None:
                self._volumes.move_to_end(vid)
            return volume

    @property
    def n_loaded(self) -> int:
        return len(self._loaded)

    def sweep(self) -> list[str]:
        """Delete uploads unused for ``ttl_s``; return their ids."""
        now = self.clock()
        with self._lock:
            expired = [e.id for e in self._entries.values() if now - e.last_used > self.ttl_s]
        for vid in expired:
            self.discard(vid)
        return expired

    def close(self) -> None:
        """Delete every upload and the private folder."""
        with self._lock:
            self._entries.clear()
            self._loaded.clear()
            self._volumes.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _remember(cache: OrderedDict, key: str, value: object, limit: int) -> None:
    """Put ``key`` last in an LRU ``cache``, dropping the least recently used beyond ``limit``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
