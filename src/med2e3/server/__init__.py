"""Web app and REST API over `Med2E3Predictor` (``med2e3 serve``); see docs/server.md.

Importing this package is cheap: FastAPI and uvicorn are imported only by `create_app` and the
``serve`` handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from med2e3.server.cli import register
from med2e3.server.settings import ServerSettings

if TYPE_CHECKING:
    from med2e3.server.app import create_app

__all__ = ["ServerSettings", "create_app", "register"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from med2e3.server.app import create_app

        return create_app
    raise AttributeError(f"module 'med2e3.server' has no attribute {name!r}")
