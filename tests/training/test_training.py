"""Training: both stages learn, frozen parts stay frozen, resume after SIGKILL or a saved stop on SIGTERM,
torchrun, bad configs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from med2e3.errors import ConfigError, DatasetError, TrainingInterrupted
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.training import load_config, train
from med2e3.training.config import config_from_dict
from med2e3.training.trainer import COMPLETE_MARKER, CsvLossLog, last_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def base_fields(tmp_path: Path, data: Path, out: str, **extra) -> dict:
    fields = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / out),
        "data": {
            "train": [{"format": "conversations", "path": str(data)}],
            "cache_dir": str(tmp_path / "cache"),
        },
        "batch_size": 4,
        "logging_steps": 1,
        "save_steps": 1000,
        "report_to": ["csv"],
    }
    fields.update(extra)
    return fields


def losses(out: Path) -> list[float]:
    with (out / "loss_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def test_both_stages_reduce_the_loss_and_keep_frozen_parts(tmp_path, tiny_dataset):
    cfg1 = write_config(
        tmp_path / "s1.yaml", **base_fields(tmp_path, tiny_dataset, "s1", max_steps=24, lr=3e-3)
    )
    out1 = train(load_config(cfg1))
    l1 = losses(out1)
    assert sum(l1[-4:]) / 4 < sum(l1[:4]) / 4 - 0.1

    torch.manual_seed(0)  # the same preset init the run started from
    from med2e3.config import Med2E3Config

    initial = Med2E3ForConditionalGeneration(Med2E3Config.from_preset("tiny")).state_dict()
    after1 = load_file(out1 / "model.safetensors")
    for name, value in after1.items():
        trained = name.split(".")[0] in {"projector3d", "projector2d", "tgis"}
        assert torch.equal(value, initial[name]) != trained, name

    fields2 = base_fields(tmp_path, tiny_dataset, "s2", max_steps=24, lr=1e-3, stage="finetune")
    fields2["model"] = {"init_from": str(out1)}
    out2 = train(load_config(write_config(tmp_path / "s2.yaml", **fields2)))
    l2 = losses(out2)
    assert sum(l2[-4:]) / 4 < sum(l2[:4]) / 4 - 0.1
    after2 = load_file(out2 / "model.safetensors")
    for name, value in after2.items():
        frozen = name.split(".")[0] in {"vision3d", "question_encoder"} or "post_layernorm" in name
        assert torch.equal(value, after1[name]) == frozen, name
    info = json.loads((out2 / "training_info.json").read_text())
    assert info["stage"] == "finetune" and info["global_step"] == 24
    Med2E3ForConditionalGeneration.from_pretrained(out2)  # a complete model folder


def test_lora_finetune_writes_a_merged_model(tmp_path, tiny_dataset):
    out1 = train(
        load_config(
            write_config(tmp_path / "s1.yaml", **base_fields(tmp_path, tiny_dataset, "s1", max_steps=2))
        )
    )
    fields = base_fields(tmp_path, tiny_dataset, "lora", max_steps=6, lr=1e-2, stage="finetune")
    fields["model"] = {"init_from": str(out1)}
    fields["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    out = train(load_config(write_config(tmp_path / "lora.yaml", **fields)))
    merged = load_file(out / "model.safetensors")
    base = load_file(out1 / "model.safetensors")
    assert merged.keys() == base.keys()  # no adapter tensors left
    changed = [n for n in merged if n.startswith("language_model") and not torch.equal(merged[n], base[n])]
    assert changed and all("proj" in n for n in changed)


def _run(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "med2e3.training", str(config), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_dataset):
    fields = base_fields(
        tmp_path, tiny_dataset, "full", max_steps=12, save_steps=3, save_total_limit=None, lr=3e-3
    )
    full_cfg = write_config(tmp_path / "full.yaml", **fields)
    killed_cfg = write_config(tmp_path / "killed.yaml", **{**fields, "output_dir": str(tmp_path / "killed")})
    assert _run(full_cfg).wait(timeout=300) == 0

    proc = _run(killed_cfg)
    marker = tmp_path / "killed" / "checkpoint-6" / COMPLETE_MARKER
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    resumed = _run(killed_cfg)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    info = json.loads((tmp_path / "killed" / "training_info.json").read_text())
    assert info["resumed_from"] in {"checkpoint-6", "checkpoint-9"}
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_signal_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path, tiny_dataset, monkeypatch):
    """SIGTERM during step 5 (sent from its log record): step 6 finishes, checkpoint-6 is saved, the run
    stops without a final model, the handlers are restored, and the same config resumes to the weights of an
    uninterrupted run."""
    fields = base_fields(tmp_path, tiny_dataset, "full", max_steps=9, save_steps=1000, lr=3e-3)
    full = train(config_from_dict(fields))
    config = config_from_dict({**fields, "output_dir": str(tmp_path / "stopped")})
    log = CsvLossLog.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        log(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(CsvLossLog, "on_log", on_log)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM: stopped after saving .*stopped/checkpoint-6;"):
        train(config)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    stopped = tmp_path / "stopped"
    assert (stopped / "checkpoint-6" / COMPLETE_MARKER).is_file()
    assert not (stopped / "training_info.json").exists() and not (stopped / "model.safetensors").exists()
    monkeypatch.undo()
    assert train(config) == stopped
    assert json.loads((stopped / "training_info.json").read_text())["resumed_from"] == "checkpoint-6"
    a, b = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_interrupted_save_is_never_the_latest_checkpoint(tmp_path):
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    (good / COMPLETE_MARKER).write_text("4\n")
    broken = tmp_path / "checkpoint-8"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"trunc")
    assert last_complete_checkpoint(tmp_path) == good
    assert not broken.exists()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is installed with torch",
)
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_dataset):
    fields = base_fields(tmp_path, tiny_dataset, "ddp", epochs=2, batch_size=2, save_steps=1000)
    cfg = write_config(tmp_path / "ddp.yaml", **fields)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: two test runs at once must not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", port, "-m", "med2e3.training", str(cfg)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    out = tmp_path / "ddp"
    info = json.loads((out / "training_info.json").read_text())
    assert info["global_step"] == 2 * 8 // (2 * 2)  # 8 examples split over 2 ranks, batch 2 each, 2 epochs
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*rank*"))  # one set of outputs


def test_bad_configs_fail_before_training(tmp_path, tiny_dataset):
    fields = base_fields(tmp_path, tiny_dataset, "x", max_steps=1)
    with pytest.raises(ConfigError, match="unknown key 'data.trian'"):
        load_config(write_config(tmp_path / "a.yaml", **{**fields, "data": {"trian": []}}))
    with pytest.raises(ConfigError, match="lr must be float"):
        load_config(write_config(tmp_path / "b.yaml", **fields), ["lr=fast"])
    not_stage1 = tmp_path / "not-a-model"
    not_stage1.mkdir()
    stage2 = {**fields, "stage": "finetune", "model": {"init_from": str(not_stage1)}}
    with pytest.raises(ConfigError, match="no config.json"):
        train(load_config(write_config(tmp_path / "c.yaml", **stage2)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a"}\nnot json\n')
    bad_data = {
        **fields,
        "data": {"train": [{"format": "conversations", "path": str(broken)}], "on_error": "skip"},
    }
    with pytest.raises(DatasetError):
        train(load_config(write_config(tmp_path / "d.yaml", **bad_data)))
    assert not (tmp_path / "x").exists()
