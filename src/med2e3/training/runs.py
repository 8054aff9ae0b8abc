"""A training run's output folder: the settings it started with, its checkpoints, and the checks made first.

A run records the settings that decide its result in ``run_settings.json`` before its first step. A rerun in
the same folder resumes (or, when finished, returns) only with the same settings; otherwise it stops naming
the keys that differ, and ``overwrite`` discards the old run instead. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from med2e3.errors import ConfigError, OutputError
from med2e3.files import write_atomic
from med2e3.folders import (
    check_llm_folder,
    check_model_folder,
    check_question_encoder_folder,
)
from med2e3.training.config import TrainConfig, config_to_dict

TRAINING_INFO = "training_info.json"
RUN_SETTINGS = "run_settings.json"
COMPLETE_MARKER = "checkpoint_complete"
LOSS_LOG = "loss_log.csv"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

#: Keys that do not change what a run computes: where it writes, when it logs and saves (resuming is
#: exact), its loggers and loader processes. ``data.cache_dir`` counts only as on/off (float16 volumes).
NOT_RESULT_KEYS = frozenset(
    {"output_dir", "logging_steps", "save_steps", "save_total_limit", "report_to", "data.num_workers"}
)

#: Result settings added after runs were first recorded, with the value that computes what those runs
#: computed: a record without one of them is read as holding that value, so older runs still resume.
LATER_KEYS: dict[str, Any] = {"model.question_encoder": None}


# ---- settings -------------------------------------------------------------------------------------
def result_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` (as `config_to_dict` gives it) that change a run's result, as dotted keys."""
    flat = _flatten(json.loads(json.dumps(config)))
    flat["data.cache_dir"] = flat.get("data.cache_dir") is not None
    return {key: value for key, value in flat.items() if key not in NOT_RESULT_KEYS}


def differing_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two `result_settings` (a key missing on one side differs)."""
    missing = object()
    return sorted(
        k for k in recorded.keys() | current.keys() if recorded.get(k, missing) != current.get(k, missing)
    )


def describe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """``key (old -> new), ...`` for every differing key, values shortened."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 40
    return ", ".join(
        f"{k} ({short.repr(recorded.get(k))} -> {short.repr(current.get(k))})"
        for k in differing_keys(recorded, current)
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "overrides":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def recorded_settings(output_dir: Path) -> dict[str, Any] | None:
    """The result settings the run in ``output_dir`` started with; None when the folder holds no run."""
    record, info = output_dir / RUN_SETTINGS, output_dir / TRAINING_INFO
    try:
        if record.is_file():
            return {**LATER_KEYS, **json.loads(record.read_text())}
        if info.is_file():  # a run that finished before settings were recorded
            return {**LATER_KEYS, **result_settings(json.loads(info.read_text())["config"])}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{output_dir}: unreadable run record ({err}); rerun with --overwrite") from None
    if checkpoints(output_dir):
        raise ConfigError(
            f"{output_dir}: holds checkpoints of a run whose settings were not recorded; "
            "rerun with --overwrite to discard it, or choose another output_dir"
        )
    return None


def check_resume(config: TrainConfig, overwrite: bool = False) -> bool:
    """Raise ConfigError unless a run already in ``output_dir`` has the same result settings.

    Returns True when that run finished (nothing left to do). With ``overwrite`` the old run does not count.
    """
    output_dir = Path(config.output_dir)
    recorded = None if overwrite else recorded_settings(output_dir)
    if recorded is None:
        return False
    current = result_settings(config_to_dict(config))
    if differing_keys(recorded, current):
        raise ConfigError(
            f"{output_dir} holds a run started with other settings: {describe_differences(recorded, current)}; "
            "rerun with --overwrite to discard it, or choose another output_dir"
        )
    return (output_dir / TRAINING_INFO).is_file()


def record_settings(config: TrainConfig) -> None:
    """Write ``run_settings.json`` (before the first step, so a killed run is checked when resumed)."""
    settings = result_settings(config_to_dict(config))
    write_atomic(
        Path(config.output_dir) / RUN_SETTINGS, json.dumps(settings, indent=2, sort_keys=True) + "\n"
    )


def discard_run(output_dir: Path) -> None:
    """Remove what a run left in ``output_dir``: checkpoints, loss log and records (the final model is overwritten)."""
    for folder in checkpoints(output_dir):
        shutil.rmtree(folder)
    for name in (TRAINING_INFO, RUN_SETTINGS, LOSS_LOG):
        (output_dir / name).unlink(missing_ok=True)


# ---- checks before any work ----------------------------------------------------------------------
def check_writable_folder(path: Path, key: str) -> None:
    """Raise OutputError unless ``path`` is, or can be made, a folder this process writes into; creates none."""
    if path.exists() and not path.is_dir():
        raise OutputError(path, f"{key} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(path, f"{key} cannot be created: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".med2e3-write-test-", dir=existing)
    except OSError as err:
        raise OutputError(path, f"{key} is not writable ({err.strerror} in {existing})") from None
    os.close(fd)
    os.unlink(probe)


def preflight(config: TrainConfig, overwrite: bool = False) -> bool:
    """Every check a run makes before it creates a folder or loads anything; True when it already finished."""
    check_writable_folder(Path(config.output_dir), "output_dir")
    if config.data.cache_dir:
        check_writable_folder(Path(config.data.cache_dir), "data.cache_dir")
    if config.model.init_from:
        check_model_folder(config.model.init_from, role="model.init_from")
    if config.model.language_model:
        check_llm_folder(config.model.language_model, preset_text_config(config))
    if config.model.question_encoder:
        check_question_encoder_folder(config.model.question_encoder)
    return check_resume(config, overwrite)


def preset_text_config(config: TrainConfig) -> dict:
    """The LLM config of the run's preset (with its overrides), as a dict."""
    from med2e3.config import Med2E3Config

    section = config.model
    return Med2E3Config.from_preset(section.preset, **section.overrides).text_config.to_dict()


# ---- checkpoints ----------------------------------------------------------------------------------
def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, oldest (lowest step) first, complete or not."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), path)
        for path in output_dir.iterdir()
        if (m := _CHECKPOINT.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished; unfinished ones are moved out of the way."""
    complete = []
    for path in checkpoints(output_dir):
        if (path / COMPLETE_MARKER).is_file():
            complete.append(path)
        else:  # interrupted save: never resume from it
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


def rotate_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (called once a new one is complete).

    The Trainer's own rotation deletes the old checkpoint before the new one is marked complete, so a kill
    in between leaves nothing to resume from; it is turned off.
    """
    if keep is None:
        return
    complete = [path for path in checkpoints(output_dir) if (path / COMPLETE_MARKER).is_file()]
    for path in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
