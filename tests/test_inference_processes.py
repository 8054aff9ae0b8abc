"""Batch mode across processes: shares of whole volumes, part files merged once, resumable after a death."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from med2e3.errors import DatasetError
from med2e3.inference import (
    Med2E3Predictor,
    merge_parts,
    part_path,
    read_batch_input,
    shard_by_volume,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
QUESTIONS = ["Which organ has a lesion?", "In which plane is this image?", "What is in the left kidney?"]
ROWS_PER_VOLUME = (3, 1, 2, 2, 1)  # uneven, so that the shares are balanced by rows, not by volumes

# Process 1 dies (as if killed) right after writing its first chunk of answers.
DIES = """
import os, sys
import med2e3.inference as inference
from med2e3.cli import main

append = inference._append_lines

def append_then_die(out, records):
    append(out, records)
    if os.environ["RANK"] == "1":
        os._exit(3)

inference._append_lines = append_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    """A JSONL of rows about five small volumes, with uneven numbers of questions."""
    folder = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(0)
    lines = []
    for v, n in enumerate(ROWS_PER_VOLUME):
        np.save(folder / f"vol{v}.npy", rng.uniform(0, 1, size=(1, 32, 64, 64)).astype(np.float32))
        lines += [{"id": f"v{v}q{i}", "volume": f"vol{v}.npy", "question": QUESTIONS[i]} for i in range(n)]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, rows_file, tmp_path_factory) -> dict[str, str]:
    """id -> answer of one process answering every row."""
    out = tmp_path_factory.mktemp("one") / "answers.jsonl"
    predictor = Med2E3Predictor.from_pretrained(tiny_model_dir, device="cpu")
    predictor.run_batch(read_batch_input(rows_file), out, max_new_tokens=4, progress=False)
    return answers(out)


def answers(path: Path) -> dict[str, str]:
    """id -> answer of a batch output, checking that each id has exactly one line."""
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    ids = [x["id"] for x in lines]
    assert len(ids) == len(set(ids)), "a row has more than one line"
    return {x["id"]: x.get("answer") for x in lines}


def answered_in(part: Path) -> set[str]:
    """Ids answered in a part file, whose last line may be torn."""
    ids = set()
    for text in part.read_text().splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if "answer" in record:
            ids.add(record["id"])
    return ids


def line(row_id: str, **fields: str) -> str:
    return json.dumps({"id": row_id, **fields}) + "\n"


def test_shares_are_whole_volumes_balanced_by_rows():
    rows = [{"id": f"{v}-{i}", "volume": f"v{v}"} for v, n in enumerate((5, 1, 2, 2, 3, 1)) for i in range(n)]
    shares = shard_by_volume(rows, 2)
    assert sorted(r["id"] for share in shares for r in share) == sorted(r["id"] for r in rows)
    assert [len(share) for share in shares] == [7, 7]
    volumes = [{r["volume"] for r in share} for share in shares]
    assert not volumes[0] & volumes[1]
    assert all(share == sorted(share, key=rows.index) for share in shares)  # input order within a share
    assert shard_by_volume(rows, 2) == shares  # the same in every process
    assert shard_by_volume(rows, 1) == [rows]
    assert shard_by_volume(rows[:1], 3) == [rows[:1], [], []]


def test_merge_keeps_each_row_once_an_answer_over_an_error(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text(line("a", answer="A") + line("b", error="unreadable"))
    part_path(out, 0, 2).write_text(line("b", answer="B") + line("c", error="bad question"))
    part_path(out, 1, 2).write_text(line("c", error="still bad") + line("d", answer="D") + '{"id": "e", "ans')
    merge_parts(out)
    merged = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["id"], x.get("answer", x.get("error"))) for x in merged] == [
        ("a", "A"),
        ("b", "B"),
        ("c", "still bad"),
        ("d", "D"),
    ]
    assert not list(tmp_path.glob("*.part-*"))
    # a crash after the output was replaced but before the parts were removed: merging again changes nothing
    before = out.read_bytes()
    part_path(out, 1, 2).write_text(line("d", answer="D") + line("b", error="late error"))
    merge_parts(out)
    assert out.read_bytes() == before
    part_path(out, 0, 3).write_text('{"id": "f"}\nnot json\n{"id": "g"}\n')
    with pytest.raises(DatasetError, match=r"part-0-of-3.*row 2"):
        merge_parts(out)
    assert out.read_bytes() == before and part_path(out, 0, 3).exists()


def test_one_process_resumes_the_parts_of_a_dead_multi_process_run(
    tiny_model_dir, rows_file, reference, tmp_path
):
    rows = read_batch_input(rows_file)
    out = tmp_path / "answers.jsonl"
    first = next(r for r in rows if r["volume"].endswith("vol1.npy"))
    record = {"id": first["id"], "volume": first["volume"], "answer": reference[first["id"]]}
    part_path(out, 1, 2).write_text(json.dumps(record) + "\n" + '{"id": "v0q0", "answ')
    predictor = Med2E3Predictor.from_pretrained(tiny_model_dir, device="cpu")
    result = predictor.run_batch(rows, out, max_new_tokens=4, progress=False)
    assert (result.answered, result.failed, result.already_done) == (len(rows) - 1, 0, 1)
    assert answers(out) == reference
    assert not list(tmp_path.glob("*.part-*"))


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in 2 processes on CPU (gloo, CUDA hidden) with torchrun, on a free port."""
    with socket.socket() as probe:  # a free port: two test runs at once must not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", port, *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is installed with torch")
def test_two_processes_resume_after_one_dies_and_match_one_process(
    tiny_model_dir, rows_file, reference, tmp_path
):
    out = tmp_path / "answers.jsonl"
    batch = [
        "batch",
        str(rows_file),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
    ]
    (tmp_path / "dies.py").write_text(DIES)
    died = torchrun(["dies.py", *batch, "--device", "cpu"], tmp_path)
    assert died.returncode != 0
    parts = sorted(tmp_path.glob("answers.jsonl.part-*"))
    assert [p.name for p in parts] == ["answers.jsonl.part-0-of-2", "answers.jsonl.part-1-of-2"]
    assert not out.exists()  # nothing merged: the parts hold what was answered
    kept = {row_id for p in parts for row_id in answered_in(p)}
    assert len(kept) >= 2  # at least process 1's first volume

    resumed = torchrun(["-m", "med2e3.cli", *batch], tmp_path)  # no --device: the default, without CUDA
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    total = sum(ROWS_PER_VOLUME)
    assert f"{total - len(kept)} answers written to {out} ({len(kept)} were already there)" in resumed.stdout
    assert resumed.stdout.count("answers written") == 1  # the main process reports, once
    assert answers(out) == reference
    assert not list(tmp_path.glob("answers.jsonl.part-*"))
