"""The med2e3 command: help texts, exit codes, --json schema, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from dicom_helpers import ct_slice
from med2e3.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v") / "scan.npy"
    np.save(path, np.random.default_rng(0).uniform(0, 1, size=(1, 32, 64, 64)).astype(np.float32))
    return path


def subcommands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = [[n] for n in sub.choices if n != "data"]
    return names + [["data", "synth"]]


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "example: med2e3" in capsys.readouterr().out


def test_ask_json_schema_and_figure(model_dir, volume, tmp_path, capsys):
    plot = tmp_path / "slices.png"
    code = main(
        [
            "ask",
            str(volume),
            "Which organ has a lesion?",
            "--model",
            str(model_dir),
            "--json",
            "--max-new-tokens",
            "4",
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {
        "volume",
        "question",
        "answer",
        "slice_scores",
        "slice_ranges",
        "top_slices",
        "notes",
    }
    assert record["notes"] == []
    assert len(record["slice_scores"]) == 32 and abs(sum(record["slice_scores"]) - 1) < 1e-5
    assert len(record["slice_ranges"]) == 32 and len(record["top_slices"]) == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_prints_text(model_dir, volume, capsys):
    assert main(["report", str(volume), "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ask", "{tmp}/missing.nii.gz", "q", "--model", "{model}"], "missing.nii.gz"),
        (["ask", "{volume}", "  ", "--model", "{model}"], "question is empty"),
        (["ask", "{volume}", "q", "--model", "{tmp}"], "not a med2e3 model folder"),
        (["batch", "{tmp}/none.csv", "--model", "{model}", "--out", "{tmp}/o.jsonl"], "none.csv"),
        (
            ["ask", "{tmp}/cube.npy", "q", "--model", "{model}"],
            "cube.npy: 2x2x2 voxels is too small to be a scan",
        ),
        (
            ["ask", "{tmp}/big.nii.gz", "q", "--model", "{model}", "--max-volume-mb", "1"],
            "more than the 1.0 MiB",
        ),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, message, model_dir, volume, tmp_path, capsys):
    np.save(tmp_path / "cube.npy", np.random.default_rng(0).uniform(0, 1, (2, 2, 2)))
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 64)), np.eye(4)), tmp_path / "big.nii.gz")  # 2 MiB of float64
    argv = [a.format(tmp=tmp_path, model=model_dir, volume=volume) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("med2e3: error:") and message in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def broken_model(model_dir: Path, folder: Path, problem: str) -> Path:
    shutil.copytree(model_dir, folder)
    if problem == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("csv not utf-8", r"q.csv: not UTF-8 text \(byte 0xff at offset 25\)"),
        ("csv empty", "q.csv: no rows"),
        ("truncated weights", "model.safetensors: truncated or corrupt weights file"),
        ("no tokenizer", "broken: no tokenizer files"),
    ],
)
def test_broken_files_print_one_line_naming_the_file(case, message, model_dir, volume, tmp_path, capsys):
    rows = tmp_path / "q.csv"
    rows.write_text(f"volume,question\n{volume},Which organ?\n")
    model = model_dir
    if case == "csv not utf-8":
        rows.write_bytes(b"volume,question\nscan.npy,\xff\n")
    elif case == "csv empty":
        rows.write_bytes(b"")
    else:
        model = broken_model(model_dir, tmp_path / "broken", case)
    assert main(["batch", str(rows), "--model", str(model), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("med2e3: error:")
    assert re.search(message, err[0]), err[0]
    if case in ("truncated weights", "no tokenizer"):
        assert main(["ask", str(volume), "Which organ?", "--model", str(model)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_batch_goes_on_after_a_bad_volume_and_exits_1(model_dir, volume, tmp_path, capsys):
    rows = tmp_path / "q.csv"
    rows.write_text(f"volume,question\nmissing.nii.gz,Which organ?\n{volume},Which organ?\n")
    out = tmp_path / "answers.jsonl"
    argv = ["batch", str(rows), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "3"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "1 answers written" in captured.out and "1 of 2 rows failed" in captured.out
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert "missing.nii.gz" in lines[0]["error"] and "answer" in lines[1]
    assert main(argv) == 1  # the failed row is tried again, the answered one is not
    assert "0 answers written" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2


def test_batch_writes_jsonl(model_dir, volume, tmp_path, capsys):
    rows = tmp_path / "q.csv"
    rows.write_text(f"volume,question\n{volume},Where is the lesion?\n{volume},Which phase?\n")
    out = tmp_path / "answers.jsonl"
    assert (
        main(["batch", str(rows), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "3"]) == 0
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["question"] for x in lines] == ["Where is the lesion?", "Which phase?"]
    assert len({x["id"] for x in lines}) == 2


def _series(folder: Path, n: int = 5) -> list[Path]:
    """An axial CT series of ``n`` 32 x 32 slices; its files in slice order."""
    folder.mkdir()
    series, study = generate_uid(), generate_uid()
    image = np.random.default_rng(0).integers(0, 2000, (32, 32))
    for k in range(n):
        ct_slice(image, k, series, study, (0, 0, 2.5 * k)).save_as(
            folder / f"IM{k:04d}", enforce_file_format=True
        )
    return [folder / f"IM{k:04d}" for k in range(n)]


def test_a_corrupt_dicom_file_is_an_error_unless_skipped(model_dir, tmp_path, capsys):
    files = _series(tmp_path / "series")
    files[-1].write_bytes(files[-1].read_bytes()[:300])
    args = [
        "ask",
        str(tmp_path / "series"),
        "Which organ?",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "2",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DICOM file IM0004 has no pixel data" in err[0]
    assert main([*args, "--skip-bad-slices"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warning = [line for line in err if line.startswith("med2e3: warning:")]
    assert len(warning) == 1 and "IM0004" in warning[0] and "kept 4 of 5 slices" in warning[0]


def test_mri_with_a_ct_window_warns_in_one_line(model_dir, tmp_path, capsys):
    data = np.zeros((48, 48, 40), np.float32)
    data[8:40, 8:40, 5:35] = np.random.default_rng(0).uniform(2000, 8000, (32, 32, 30))
    nib.save(nib.Nifti1Image(data, np.eye(4)), path := tmp_path / "t1.nii.gz")
    args = ["ask", str(path), "Which organ?", "--model", str(model_dir), "--max-new-tokens", "2"]
    assert main(args) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert (
        len(warning) == 1 and warning[0].startswith("med2e3: warning: ") and "--window minmax" in warning[0]
    )
    assert main([*args, "--window", "minmax"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_long_question_is_answered_with_a_note(model_dir, volume, capsys):
    question = "Is there a lesion in the liver near the portal vein, and how large is it? " * 10
    assert main(["ask", str(volume), question, "--model", str(model_dir), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "med2e3: note: TG-IS read only the first 128" in err
    assert (
        main(["ask", str(volume), question, "--model", str(model_dir), "--max-new-tokens", "2", "--json"])
        == 0
    )
    assert "TG-IS read only the first 128" in json.loads(capsys.readouterr().out)["notes"][0]
