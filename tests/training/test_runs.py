"""A run's output folder: reruns keep their settings, checkpoints survive a kill, bad values stop early."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from med2e3.cli import main
from med2e3.errors import ConfigError
from med2e3.training import load_config, train
from med2e3.training.runs import LATER_KEYS, RUN_SETTINGS, TRAINING_INFO, checkpoints

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def base_fields(tmp_path: Path, data: Path, **extra) -> dict:
    fields = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "out"),
        "data": {
            "train": [{"format": "conversations", "path": str(data)}],
            "cache_dir": str(tmp_path / "cache"),
        },
        "batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "save_steps": 1000,
        "report_to": ["csv"],
    }
    return {**fields, **extra}


def cli_error(capsys, *argv: str) -> str:
    """Run ``med2e3 ARGV``, expect exit status 2 and one line on stderr; return that line."""
    capsys.readouterr()  # what earlier steps printed
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("med2e3: error: "), err
    return err


# ---- A2: numbers as people write them ------------------------------------------------------------
def test_exponent_numbers_read_as_numbers(tmp_path, tiny_dataset):
    cfg = tmp_path / "a.yaml"
    cfg.write_text(yaml.safe_dump(base_fields(tmp_path, tiny_dataset)) + "lr: 5e-5\nweight_decay: 1E-2\n")
    config = load_config(cfg)
    assert (config.lr, config.weight_decay) == (5e-5, 1e-2)
    assert load_config(cfg, ["lr=1e-4"]).lr == 1e-4
    assert load_config(cfg, ["max_grad_norm=.5"]).max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="lr must be float, got '1e-4x'"):
        load_config(cfg, ["lr=1e-4x"])


# ---- C7: one line, exit 2, nothing created -------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lr=-1e-3", "lr must be at least 0"),
        ("batch_size=0", "batch_size must be at least 1"),
        ("grad_accum=0", "grad_accum must be at least 1"),
        ("logging_steps=0", "logging_steps must be at least 1"),
        ("data.window=foo", "data.window must be one of"),
    ],
)
def test_bad_values_stop_before_any_folder(tmp_path, tiny_dataset, capsys, override, named):
    cfg = write_config(tmp_path / "c.yaml", **base_fields(tmp_path, tiny_dataset))
    assert named in cli_error(capsys, "train", str(cfg), override)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_unusable_output_dir_or_init_from_stop_before_any_folder(
    tmp_path, tiny_dataset, tiny_model_dir, capsys
):
    cfg = write_config(tmp_path / "c.yaml", **base_fields(tmp_path, tiny_dataset))
    (tmp_path / "a-file").write_text("mine\n")
    err = cli_error(capsys, "train", str(cfg), f"output_dir={tmp_path / 'a-file'}")
    assert "output_dir is a file" in err and (tmp_path / "a-file").read_text() == "mine\n"

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes into 0o555 folders; sysfs refuses new files even to root
        read_only = Path("/sys")
    assert "output_dir is not writable" in cli_error(capsys, "train", str(cfg), f"output_dir={read_only}")

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.is_file():
            (stage1 / file.name).write_bytes(file.read_bytes())
    weights = (stage1 / "model.safetensors").read_bytes()
    (stage1 / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = cli_error(capsys, "train", str(cfg), "stage=finetune", f"model.init_from={stage1}")
    assert "model.safetensors: truncated or corrupt weights file" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ---- A1: a rerun never mixes settings ------------------------------------------------------------
def test_rerun_with_other_settings_is_refused(tmp_path, tiny_dataset, capsys):
    cfg = write_config(tmp_path / "c.yaml", **base_fields(tmp_path, tiny_dataset, lr=1e-3))
    out = train(load_config(cfg))
    weights = (out / "model.safetensors").read_bytes()
    info = (out / TRAINING_INFO).read_text()

    err = cli_error(capsys, "train", str(cfg), "lr=0.5", "seed=7")
    assert "lr (0.001 -> 0.5), seed (0 -> 7)" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == weights and (out / TRAINING_INFO).read_text() == info

    # the same settings (logging is not one that changes the result): finished, returned untouched
    capsys.readouterr()
    assert main(["train", str(cfg), "logging_steps=5"]) == 0
    assert "already holds this run" in capsys.readouterr().out
    assert train(load_config(cfg)) == out and (out / TRAINING_INFO).read_text() == info

    # killed after its checkpoint: a rerun with another lr must not continue the old schedule
    (out / TRAINING_INFO).unlink()
    (out / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"lr \(0.001 -> 0.1\)"):
        train(load_config(cfg, ["lr=0.1"]))
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]

    train(load_config(cfg, ["lr=0.5", "seed=7"]), overwrite=True)
    done = json.loads((out / TRAINING_INFO).read_text())
    assert done["config"]["lr"] == 0.5 and done["resumed_from"] is None and done["global_step"] == 2
    assert json.loads((out / RUN_SETTINGS).read_text())["seed"] == 7


def test_a_run_recorded_before_a_setting_existed_is_still_the_same_run(tmp_path, tiny_dataset):
    cfg = write_config(tmp_path / "c.yaml", **base_fields(tmp_path, tiny_dataset))
    out = train(load_config(cfg))
    record = json.loads((out / RUN_SETTINGS).read_text())
    for key in LATER_KEYS:
        del record[key]
    (out / RUN_SETTINGS).write_text(json.dumps(record))
    info = (out / TRAINING_INFO).read_text()
    assert train(load_config(cfg)) == out and (out / TRAINING_INFO).read_text() == info  # finished, untouched


def test_a_folder_with_checkpoints_but_no_record_is_refused(tmp_path, tiny_dataset):
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    cfg = write_config(tmp_path / "c.yaml", **base_fields(tmp_path, tiny_dataset))
    with pytest.raises(ConfigError, match="settings were not recorded"):
        train(load_config(cfg))


# ---- B4: the last complete checkpoint stays until the next one is complete -----------------------
def test_kill_before_the_next_checkpoint_is_complete_keeps_the_last_one(tmp_path, tiny_dataset, monkeypatch):
    from transformers.utils import logging as hf_logging

    from med2e3.training.trainer import CheckpointCallback

    fields = base_fields(tmp_path, tiny_dataset, max_steps=6, save_steps=2, save_total_limit=1)
    config = load_config(write_config(tmp_path / "c.yaml", **fields))
    out = Path(config.output_dir)
    complete_save = CheckpointCallback.on_save

    def killed_at_step_4(self, args, state, control, **kwargs):
        if state.global_step == 4:  # the checkpoint is written, its completion marker is not
            raise KeyboardInterrupt
        return complete_save(self, args, state, control, **kwargs)

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    hf_logging.warning_once.cache_clear()  # "once" per process: earlier tests may have printed it
    hf_logging.add_handler(handler)
    try:
        monkeypatch.setattr(CheckpointCallback, "on_save", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train(config)
        monkeypatch.undo()
        assert [p.name for p in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
        train(config)
    finally:
        hf_logging.remove_handler(handler)
    info = json.loads((out / TRAINING_INFO).read_text())
    assert info["resumed_from"] == "checkpoint-2" and info["global_step"] == 6
    assert [p.name for p in checkpoints(out)] == ["checkpoint-6"]  # save_total_limit still holds
    assert not [w for w in warnings if "mtime" in w]


# ---- D: the Trainer is imported where a run starts -----------------------------------------------
def test_importing_training_loads_no_trainer():
    code = (
        "import sys, med2e3.training; light = 'torch' not in sys.modules; "
        "import med2e3.training.trainer; print(light, 'transformers.trainer' not in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]
