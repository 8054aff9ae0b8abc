"""The preprocessing a model was trained with (window, orientation) travels with it to every path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from med2e3 import inference
from med2e3.cli import build_parser
from med2e3.data.io import load_volume
from med2e3.data.processor import PROCESSOR_CONFIG, Med2E3Processor
from med2e3.data.transforms import prepare_volume
from med2e3.errors import ConfigError
from med2e3.evaluation import runner
from med2e3.inference import BatchResult, Med2E3Predictor
from med2e3.server.cli import load_predictor
from med2e3.training import train
from med2e3.training.config import config_from_dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny model trained one step on acquisition-oriented volumes with the bone window, the benchmark)."""
    from med2e3.data.synth import generate_benchmark

    root = tmp_path_factory.mktemp("preprocessing")
    bench = root / "synth"
    generate_benchmark(bench, 8, seed=0, workers=1, progress=False)
    source = {"format": "m3d_cap", "path": str(bench / "M3D_Cap.json"), "split": "train"}
    config = {
        "stage": "pretrain",
        "output_dir": str(root / "model"),
        "data": {"train": [{**source, "orientation": "acquisition"}], "window": "bone", "augment": False},
        "max_steps": 1,
        "batch_size": 1,
        "report_to": [],
    }
    return train(config_from_dict(config)), bench


def _sagittal_volume(bench: Path) -> Path:
    """A benchmark volume whose acquisition axis is not axial (so the two readings differ)."""
    for line in (bench / "labels.jsonl").read_text().splitlines():
        label = json.loads(line)
        if label["plane"] != "axial":
            return bench / label["image"]
    raise AssertionError("the benchmark has no coronal or sagittal volume")


def test_training_saves_window_and_orientation(trained):
    folder, _ = trained
    settings = json.loads((folder / PROCESSOR_CONFIG).read_text())
    assert (settings["window"], settings["orientation"]) == ("bone", "acquisition")
    processor = Med2E3Processor.from_pretrained(folder)
    assert (processor.window, processor.orientation) == ("bone", "acquisition")


def test_predictor_preprocesses_as_trained(trained):
    folder, bench = trained
    predictor = Med2E3Predictor.from_pretrained(folder, device="cpu")
    assert (predictor.window, predictor.orientation) == ("bone", "acquisition")
    path = _sagittal_volume(bench)
    size = tuple(predictor.model.config.vision3d_config.image_size)
    expected = prepare_volume(load_volume(path, orientation="acquisition"), size, window="bone")
    axial = prepare_volume(load_volume(path, orientation="axial"), size, window="bone")
    got = predictor.load(path).pixel_values[0]
    assert torch.equal(got, expected) and not torch.equal(got, axial)
    assert torch.equal(predictor.load(path, "axial").pixel_values[0], axial)  # one volume read otherwise
    assert predictor.orientation == "acquisition"


def test_ask_and_serve_use_the_model_settings_without_flags(trained):
    folder, bench = trained
    from med2e3.cli import _predictor

    ask = build_parser().parse_args(
        ["ask", str(_sagittal_volume(bench)), "Which plane?", "--model", str(folder)]
    )
    serve = build_parser().parse_args(["serve", "--model", str(folder), "--device", "cpu"])
    for predictor in (_predictor(ask), load_predictor(serve)):
        assert (predictor.window, predictor.orientation) == ("bone", "acquisition")


def test_eval_reads_the_dataset_as_the_model_was_trained(trained, tmp_path, monkeypatch):
    folder, bench = trained
    seen: list[str] = []
    real = runner.load_dataset

    def spy(*args, **kwargs):
        seen.append(kwargs["orientation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "load_dataset", spy)
    args = build_parser().parse_args(
        ["eval", str(tmp_path / "p.jsonl"), "--dataset", str(bench / "M3D_VQA_train.csv"), "--form", "closed"]
        + ["--limit", "2", "--max-new-tokens", "2", "--model", str(folder)]
    )
    assert args.handler(args) == 0
    assert seen == ["acquisition"]


def test_batch_rows_may_name_their_orientation(trained, tmp_path, monkeypatch):
    """A row's ``orientation`` reads its volume file so (one encoding per volume and orientation); others
    take the model's; an unknown one fails that row alone, with its name."""
    folder, bench = trained
    predictor = Med2E3Predictor.from_pretrained(folder, device="cpu")
    path = str(_sagittal_volume(bench))
    seen: list[str] = []
    real = inference.load_volume

    def spy(volume, orientation, *args):
        seen.append(orientation)
        return real(volume, orientation, *args)

    monkeypatch.setattr(inference, "load_volume", spy)
    rows = [
        {"id": "a", "volume": path, "question": "Which plane?"},
        {"id": "b", "volume": path, "question": "Which plane?", "orientation": "axial"},
        {"id": "c", "volume": path, "question": "Which organ?", "orientation": "axial"},
        {"id": "d", "volume": path, "question": "Which plane?", "orientation": "sideways"},
    ]
    out = tmp_path / "answers.jsonl"
    assert predictor.run_batch(rows, out, max_new_tokens=2, progress=False) == BatchResult(3, 1, 0)
    assert seen == ["acquisition", "axial"] and predictor.orientation == "acquisition"
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "unknown orientation 'sideways'" in lines["d"]["error"]
    assert lines["a"]["slice_scores"] != lines["b"]["slice_scores"]  # two readings of one file


def test_a_flag_overrides_with_a_notice(trained, caplog):
    folder, _ = trained
    with caplog.at_level(logging.WARNING):
        predictor = Med2E3Predictor.from_pretrained(
            folder, device="cpu", window="abdomen", orientation="axial"
        )
    assert (predictor.window, predictor.orientation) == ("abdomen", "axial")
    assert "window='abdomen' overrides the model's window='bone'" in caplog.text
    assert "orientation='axial' overrides" in caplog.text
    with pytest.raises(ConfigError, match="unknown window 'foo'"):
        Med2E3Predictor.from_pretrained(folder, device="cpu", window="foo")


def test_folders_written_before_still_load_with_a_notice(tiny_model_dir, tmp_path, caplog):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    settings = json.loads((old / PROCESSOR_CONFIG).read_text())
    for key in ("window", "orientation"):
        settings.pop(key)
    (old / PROCESSOR_CONFIG).write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING):
        predictor = Med2E3Predictor.from_pretrained(old, device="cpu")
    assert (predictor.window, predictor.orientation) == ("abdomen", "axial")
    assert "written before preprocessing was saved with the model" in caplog.text


def test_an_unknown_window_is_one_line(trained, capsys):
    from med2e3.cli import main

    folder, bench = trained
    assert (
        main(["ask", str(_sagittal_volume(bench)), "Which plane?", "--model", str(folder), "--window", "foo"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["med2e3: error: unknown window 'foo'; valid names: abdomen, lung, bone, brain, minmax"]
