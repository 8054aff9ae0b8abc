"""Limits and policies of the web server, in one validated place."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from med2e3.errors import ConfigError

MB = 1024 * 1024
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it keeps things.

    Attributes:
        token: when set, every request must send ``Authorization: Bearer TOKEN`` (the page may
            pass it once as ``/?token=TOKEN``). Required to bind anything but loopback.
        max_upload_bytes: largest upload body.
        max_extracted_bytes: largest total size of the files a DICOM zip may expand to.
        max_zip_entries: most entries a DICOM zip may hold.
        max_voxels: largest volume (D * H * W) a NIfTI or .npy header may declare.
        ttl_s: an upload not used for this long is deleted by the sweeper.
        sweep_interval_s: how often the sweeper runs.
        max_stored: most uploads kept on disk (the least recently used goes first).
        max_disk_bytes: most bytes of uploads kept on disk (the least recently used goes first).
        max_loaded: most encoded volumes kept in memory (LRU); others are re-encoded on use.
        max_waiting: model requests allowed to wait behind the running one; more get 503.
        max_batch: most questions answered together in one batched generation: those waiting when
            the model gets to them (so at most ``1 + max_waiting``); 1 answers one at a time.
        max_uploads: uploads received at the same time; more get 503.
        request_timeout_s: a model request (queue wait + run) taking longer gets 504.
        max_new_tokens: answer length limit (default and maximum a request may ask for).
        report_max_new_tokens: report length limit.
        upload_dir: where the server makes its private temporary folder (default: the system's).
    """

    token: str | None = None
    max_upload_bytes: int = 512 * MB
    max_extracted_bytes: int = 1024 * MB
    max_zip_entries: int = 4096
    max_voxels: int = 512 * 512 * 1024
    ttl_s: float = 3600.0
    sweep_interval_s: float = 60.0
    max_stored: int = 16
    max_disk_bytes: int = 4096 * MB
    max_loaded: int = 4
    max_waiting: int = 4
    max_batch: int = 8
    max_uploads: int = 2
    request_timeout_s: float = 300.0
    max_new_tokens: int = 64
    report_max_new_tokens: int = 256
    upload_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"token: {len(self.token)} characters is too short; use at least {MIN_TOKEN_CHARS} "
                "(e.g. python -c 'import secrets; print(secrets.token_hex(16))')"
            )
        positive = (
            "max_upload_bytes",
            "max_extracted_bytes",
            "max_zip_entries",
            "max_voxels",
            "ttl_s",
            "sweep_interval_s",
            "max_stored",
            "max_disk_bytes",
            "max_loaded",
            "max_uploads",
            "max_batch",
            "request_timeout_s",
            "max_new_tokens",
            "report_max_new_tokens",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ConfigError(f"max_waiting: must be >= 0, got {self.max_waiting}")
        if self.upload_dir is not None and not Path(self.upload_dir).is_dir():
            raise ConfigError(f"upload_dir: {self.upload_dir} is not a folder")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"refusing to listen on {host} without a token: anyone who can reach it could upload "
            "volumes and run the model; pass --token (or set MED2E3_TOKEN), or use --host 127.0.0.1"
        )
