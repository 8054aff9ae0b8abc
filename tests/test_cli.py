"""The med2e3 command: help texts, exit codes, --json schema, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
    assert set(record) == {"volume", "question", "answer", "slice_scores", "slice_ranges", "top_slices"}
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
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, message, model_dir, volume, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=model_dir, volume=volume) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("med2e3: error:") and message in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_batch_writes_jsonl(model_dir, volume, tmp_path, capsys):
    rows = tmp_path / "q.csv"
    rows.write_text(f"volume,question\n{volume},Where is the lesion?\n{volume},Which phase?\n")
    out = tmp_path / "answers.jsonl"
    assert (
        main(["batch", str(rows), "--model", str(model_dir), "--out", str(out), "--max-new-tokens", "3"]) == 0
    )
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["1", "2"]
