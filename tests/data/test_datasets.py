"""Tests for med2e3.data.datasets: readers, error policy, conversation JSONL and converters."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from med2e3.data.datasets import (
    DATASET_FORMATS,
    IMAGE_PLACEHOLDER,
    REPORT_INSTRUCTIONS,
    VQA_COLUMNS,
    DatasetSource,
    DatasetWarning,
    Example,
    convert,
    format_of,
    read_conversations,
    read_ct_rate,
    read_dataset,
    read_m3d_cap,
    read_m3d_vqa,
    write_conversations,
)
from med2e3.errors import DatasetError

# ---------------------------------------------------------------------------------------------
# fixture builders


def make_volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.zeros((4, 8, 8), dtype=np.float32))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def vqa_row(
    image: str = "vol/a.npy", qtype: str = "1", letter: str = "B", question: str = "Which plane?"
) -> list[str]:
    return [image, qtype, question, "Sagittal", "Axial", "Coronal", "Oblique", "Axial", letter]


@pytest.fixture
def cap_json(tmp_path: Path) -> Path:
    data = {"train": [], "validation": [], "test": []}
    for i in range(3):
        make_volume(tmp_path / f"ct/{i}/image.npy")
        (tmp_path / f"ct/{i}/text.txt").write_text(f"  Report number {i}.\n", encoding="utf-8")
        data["train"].append({"image": f"ct/{i}/image.npy", "text": f"ct/{i}/text.txt"})
    data["test"].append({"image": "ct/0/image.npy", "text": "ct/0/text.txt"})
    path = tmp_path / "M3D_Cap.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def vqa_csv(tmp_path: Path) -> Path:
    make_volume(tmp_path / "vol/a.npy")
    make_volume(tmp_path / "vol/b.npy")
    header = [*VQA_COLUMNS, "Relevant Slices"]
    rows = [
        [*vqa_row(qtype="1"), "3 4 5"],
        [*vqa_row(image="vol/b.npy", qtype="Abnormality", letter="D", question="What is abnormal?"), ""],
    ]
    return write_csv(tmp_path / "M3D_VQA_test.csv", header, rows)


@pytest.fixture
def ct_rate(tmp_path: Path) -> tuple[Path, Path]:
    vol_dir = tmp_path / "volumes"
    for name in ("train_1_a_1", "train_2_a_1"):
        target = vol_dir / name.rsplit("_", 2)[0] / f"{name}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not read by the reader")
    header = ["VolumeName", "ClinicalInformation_EN", "Findings_EN", "Impressions_EN"]
    rows = [
        ["train_1_a_1.nii.gz", "cough", "Lungs are clear.", "Normal chest CT."],
        ["train_2_a_1.nii.gz", "", "Nodule in the right upper lobe.", ""],
    ]
    return write_csv(tmp_path / "reports.csv", header, rows), vol_dir


# ---------------------------------------------------------------------------------------------
# M3D-Cap


def test_m3d_cap_reads_split_with_report_instruction(cap_json: Path) -> None:
    examples = list(read_m3d_cap(cap_json, "train"))
    assert [e.answer for e in examples] == ["Report number 0.", "Report number 1.", "Report number 2."]
    for e in examples:
        assert e.task == "caption"
        assert e.question == e.prompt and e.prompt in REPORT_INSTRUCTIONS
        assert e.volume.is_absolute() and e.volume.exists()
        assert e.orientation == "axial"
    assert examples == list(read_m3d_cap(cap_json, "train"))  # deterministic instructions
    assert len({e.id for e in examples}) == 3
    assert len(list(read_m3d_cap(cap_json, "test"))) == 1


def test_m3d_cap_orientation_and_data_root(cap_json: Path, tmp_path: Path) -> None:
    moved = tmp_path / "meta" / "cap.json"
    moved.parent.mkdir()
    moved.write_text(cap_json.read_text())
    examples = list(read_m3d_cap(moved, "train", data_root=tmp_path, orientation="acquisition"))
    assert all(e.orientation == "acquisition" for e in examples)
    assert examples[0].volume == tmp_path / "ct/0/image.npy"


def test_m3d_cap_file_level_errors(cap_json: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        read_m3d_cap(tmp_path / "nope.json", "train", on_error="skip")
    with pytest.raises(DatasetError, match="split 'val'"):
        read_m3d_cap(cap_json, "val")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_m3d_cap(broken, "train")


@pytest.mark.parametrize(
    ("remove", "reason"),
    [("ct/1/image.npy", "missing volume"), ("ct/1/text.txt", "missing caption")],
)
def test_m3d_cap_row_errors(cap_json: Path, tmp_path: Path, remove: str, reason: str) -> None:
    (tmp_path / remove).unlink()
    with pytest.raises(DatasetError) as info:
        list(read_m3d_cap(cap_json, "train"))
    assert str(cap_json) in str(info.value) and "train[1]" in str(info.value)
    reader = read_m3d_cap(cap_json, "train", on_error="skip")
    with pytest.warns(DatasetWarning, match=f"{reason}: 1"):
        examples = list(reader)
    assert len(examples) == 2
    assert reader.report.skipped == {reason: 1} and reader.report.rows == 3


# ---------------------------------------------------------------------------------------------
# M3D-VQA


def test_m3d_vqa_both_forms(vqa_csv: Path, tmp_path: Path) -> None:
    examples = list(read_m3d_vqa(vqa_csv))
    assert [e.task for e in examples] == ["vqa_closed", "vqa_open", "vqa_closed", "vqa_open"]
    closed, opened = examples[0], examples[1]
    assert closed.question == "Which plane?"
    assert closed.prompt == "Which plane? Choices: A. Sagittal B. Axial C. Coronal D. Oblique"
    assert closed.answer == "B. Axial" and closed.answer_letter == "B"
    assert opened.prompt == opened.question == "Which plane?"
    assert opened.answer == "Axial" and opened.answer_letter is None
    assert closed.question_type == opened.question_type == "Plane"
    assert closed.relevant_slices == opened.relevant_slices == (3, 4, 5)
    assert examples[2].question_type == "Abnormality" and examples[2].relevant_slices is None
    assert examples[2].answer == "D. Oblique"
    assert closed.volume == tmp_path / "vol/a.npy"
    ids = [e.id for e in examples]
    assert len(set(ids)) == len(ids)
    assert ids == [e.id for e in read_m3d_vqa(vqa_csv)]


def test_m3d_vqa_single_form_and_orientation(vqa_csv: Path) -> None:
    closed = list(read_m3d_vqa(vqa_csv, form="closed", orientation="acquisition"))
    assert [e.task for e in closed] == ["vqa_closed"] * 2
    assert all(e.orientation == "acquisition" for e in closed)
    opened = list(read_m3d_vqa(vqa_csv, form="open"))
    assert [e.task for e in opened] == ["vqa_open"] * 2
    with pytest.raises(ValueError, match="form"):
        read_m3d_vqa(vqa_csv, form="mixed")  # type: ignore[arg-type]


def test_m3d_vqa_without_relevant_slices_column(tmp_path: Path) -> None:
    make_volume(tmp_path / "vol/a.npy")
    path = write_csv(tmp_path / "q.csv", list(VQA_COLUMNS), [vqa_row(qtype="location")])
    (example,) = read_m3d_vqa(path, form="open")
    assert example.question_type == "Location" and example.relevant_slices is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ([*vqa_row(qtype="7"), ""], "bad question type"),
        ([*vqa_row(qtype="Size"), ""], "bad question type"),
        ([*vqa_row(question=""), ""], "missing field"),
        ([*vqa_row(letter="E"), ""], "bad answer letter"),
        ([*vqa_row(image="vol/missing.npy"), ""], "missing volume"),
        ([*vqa_row(), "3 x"], "bad relevant slices"),
        (vqa_row()[:5], "missing field"),
    ],
)
def test_m3d_vqa_row_errors(tmp_path: Path, row: list[str], reason: str) -> None:
    make_volume(tmp_path / "vol/a.npy")
    rows = [[*vqa_row(), ""], row, [*vqa_row(), "1"]]
    path = write_csv(tmp_path / "q.csv", [*VQA_COLUMNS, "Relevant Slices"], rows)
    with pytest.raises(DatasetError) as info:
        list(read_m3d_vqa(path))
    assert str(path) in str(info.value) and "(row 3)" in str(info.value)
    assert info.value.row == 3
    reader = read_m3d_vqa(path, on_error="skip")
    with pytest.warns(DatasetWarning, match="skipped 1 of 3 rows"):
        examples = list(reader)
    assert len(examples) == 4
    assert reader.report.skipped == {reason: 1}
    assert reader.report.first_skipped_row == {reason: 3}


def test_m3d_vqa_unknown_column(tmp_path: Path) -> None:
    make_volume(tmp_path / "vol/a.npy")
    path = write_csv(tmp_path / "q.csv", [*VQA_COLUMNS, "Extra"], [[*vqa_row(), "x"]])
    with pytest.raises(DatasetError, match="unknown column.*Extra"):
        read_m3d_vqa(path)
    reader = read_m3d_vqa(path, on_error="skip")
    with pytest.warns(DatasetWarning, match="ignored unknown columns"):
        assert len(list(reader)) == 2
    assert reader.report.ignored_columns == ("Extra",)


def test_m3d_vqa_header_errors_always_raise(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.csv", list(VQA_COLUMNS[:-1]), [vqa_row()[:-1]])
    with pytest.raises(DatasetError, match="Answer Choice"):
        read_m3d_vqa(path, on_error="skip")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_m3d_vqa(empty, on_error="skip")
    with pytest.raises(DatasetError, match="file not found"):
        read_m3d_vqa(tmp_path / "missing.csv", on_error="skip")


def test_all_broken_rows_raise_even_when_skipping(tmp_path: Path) -> None:
    rows = [vqa_row(image="vol/none.npy"), vqa_row(letter="Z")]
    path = write_csv(tmp_path / "q.csv", list(VQA_COLUMNS), rows)
    with pytest.raises(DatasetError, match="every row is broken") as info:
        list(read_m3d_vqa(path, on_error="skip"))
    assert "missing volume: 2" in str(info.value)
    header_only = write_csv(tmp_path / "h.csv", list(VQA_COLUMNS), [])
    with pytest.raises(DatasetError, match="no examples"):
        list(read_m3d_vqa(header_only, on_error="skip"))


def test_no_warning_when_nothing_skipped(vqa_csv: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = read_m3d_vqa(vqa_csv, on_error="skip")
        list(reader)
    assert reader.report.n_skipped == 0 and reader.report.examples == 4


def test_invalid_policy(vqa_csv: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        read_m3d_vqa(vqa_csv, on_error="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# CT-RATE


def test_ct_rate_finds_volumes_recursively(ct_rate: tuple[Path, Path]) -> None:
    reports, vol_dir = ct_rate
    first, second = read_ct_rate(reports, vol_dir)
    assert first.id == "train_1_a_1" and first.task == "report"
    assert first.volume == vol_dir / "train_1" / "train_1_a_1.nii.gz"
    assert first.answer == "Lungs are clear.\n\nImpression: Normal chest CT."
    assert second.answer == "Nodule in the right upper lobe."
    assert first.prompt == first.question and first.question in REPORT_INSTRUCTIONS


def test_ct_rate_alternative_headers(ct_rate: tuple[Path, Path], tmp_path: Path) -> None:
    _, vol_dir = ct_rate
    path = write_csv(
        tmp_path / "alt.csv", ["VolumeName", "Findings", "Impressions"], [["train_2_a_1", "F", "I"]]
    )
    (example,) = read_ct_rate(path, vol_dir, orientation="acquisition")
    assert example.answer == "F\n\nImpression: I" and example.orientation == "acquisition"
    bad = write_csv(tmp_path / "bad.csv", ["VolumeName", "Findings_EN"], [["train_2_a_1", "F"]])
    with pytest.raises(DatasetError, match="Impressions_EN or Impressions"):
        read_ct_rate(bad, vol_dir, on_error="skip")
    with pytest.raises(DatasetError, match="volume folder not found"):
        read_ct_rate(path, tmp_path / "nowhere")


def test_ct_rate_row_errors(ct_rate: tuple[Path, Path], tmp_path: Path) -> None:
    _, vol_dir = ct_rate
    dup = vol_dir / "other" / "train_2_a_1.nii.gz"
    dup.parent.mkdir()
    dup.write_bytes(b"")
    header = ["VolumeName", "Findings_EN", "Impressions_EN"]
    rows = [
        ["train_1_a_1.nii.gz", "F", "I"],
        ["train_9_a_1.nii.gz", "F", "I"],
        ["train_2_a_1.nii.gz", "F", "I"],
        ["train_1_a_1.nii.gz", "F", "I"],
        ["train_1_a_2.nii.gz", "", ""],
    ]
    path = write_csv(tmp_path / "r.csv", header, rows)
    with pytest.raises(DatasetError, match=r"\(row 3\): volume 'train_9_a_1.nii.gz' not found"):
        list(read_ct_rate(path, vol_dir))
    reader = read_ct_rate(path, vol_dir, on_error="skip")
    with pytest.warns(DatasetWarning):
        assert len(list(reader)) == 1
    assert reader.report.skipped == {
        "missing volume": 1,
        "ambiguous volume": 1,
        "duplicate id": 1,
        "missing field": 1,
    }


# ---------------------------------------------------------------------------------------------
# conversation JSONL


def sample_examples(tmp_path: Path) -> list[Example]:
    inside = make_volume(tmp_path / "data" / "v" / "a.npy")
    outside = make_volume(tmp_path / "elsewhere" / "b.npy")
    return [
        Example("c1", inside, "caption", "Describe.", "Describe.", "A report."),
        Example(
            "q1",
            outside,
            "vqa_closed",
            "Which organ?",
            "Which organ? Choices: A. Liver B. Lung C. Heart D. Kidney",
            "B. Lung",
            question_type="Organ",
            answer_letter="B",
            relevant_slices=(0, 31),
            orientation="acquisition",
        ),
        Example("q2", inside, "vqa_open", "Which phase?", "Which phase?", None, question_type="Phase"),
    ]


def test_conversations_round_trip(tmp_path: Path) -> None:
    examples = sample_examples(tmp_path)
    path = write_conversations(examples, tmp_path / "data" / "train.jsonl")
    assert list(read_conversations(path)) == examples
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["volume"] == str(Path("v") / "a.npy")  # relative when under the JSONL folder
    assert records[1]["volume"] == str(tmp_path / "elsewhere" / "b.npy")
    assert records[0]["conversations"] == [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nDescribe."},
        {"from": "gpt", "value": "A report."},
    ]
    assert len(records[2]["conversations"]) == 1  # inference example: no gpt turn
    assert records[1]["relevant_slices"] == [0, 31]


def test_conversations_placeholder_anywhere_and_defaults(tmp_path: Path) -> None:
    make_volume(tmp_path / "a.npy")
    record = {
        "id": "x",
        "volume": "a.npy",
        "task": "report",
        "question": "Describe.",
        "conversations": [{"from": "human", "value": "Describe.\n<image3d>"}, {"from": "gpt", "value": "R"}],
    }
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(record) + "\n\n")
    (example,) = read_conversations(path)
    assert example.prompt == "Describe." and example.orientation == "axial" and example.question_type is None


def test_write_conversations_is_atomic(tmp_path: Path) -> None:
    examples = sample_examples(tmp_path)
    path = write_conversations(examples, tmp_path / "data" / "out.jsonl")
    before = path.read_text()

    def failing():
        yield examples[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_conversations(failing(), path)
    with pytest.raises(DatasetError, match="duplicate id 'c1'"):
        write_conversations([examples[0], examples[0]], path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl", "v"]


def good_record(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "id": "r",
        "volume": "a.npy",
        "task": "vqa_open",
        "question": "Q?",
        "conversations": [{"from": "human", "value": "<image3d>\nQ?"}, {"from": "gpt", "value": "A"}],
    }
    return record | overrides


TURN = {"from": "human", "value": "<image3d>\nQ?"}
REPLY = {"from": "gpt", "value": "A"}


@pytest.mark.parametrize(
    ("line", "reason", "message"),
    [
        ("{broken", "broken JSON", "not valid JSON"),
        (json.dumps(good_record(conversations=[TURN, REPLY, TURN, REPLY])), "multi-turn", "multi-turn"),
        (
            json.dumps(good_record(conversations=[{"from": "human", "value": "<image3d><image3d>Q"}, REPLY])),
            "bad conversation",
            "exactly once",
        ),
        (json.dumps(good_record(conversations=[REPLY, TURN])), "bad conversation", "expected a turn"),
        (json.dumps(good_record(extra=1)), "unknown field", "unknown field"),
        (json.dumps({"id": "r", "volume": "a.npy"}), "missing field", "missing field"),
        (json.dumps(good_record(volume="gone.npy")), "missing volume", "volume not found"),
        (json.dumps(good_record(id="ok")), "duplicate id", "duplicate id"),
        (json.dumps(good_record(answer_letter="E")), "invalid field", "answer_letter"),
        (json.dumps(good_record(task="segment")), "invalid field", "task"),
    ],
)
def test_conversations_row_errors(tmp_path: Path, line: str, reason: str, message: str) -> None:
    make_volume(tmp_path / "a.npy")
    path = tmp_path / "c.jsonl"
    path.write_text(
        "\n".join([json.dumps(good_record(id="ok")), line, json.dumps(good_record(id="z"))]) + "\n"
    )
    with pytest.raises(DatasetError, match=message) as info:
        list(read_conversations(path))
    assert str(path) in str(info.value) and "(row 2)" in str(info.value)
    reader = read_conversations(path, on_error="skip")
    with pytest.warns(DatasetWarning, match=f"{reason}: 1"):
        assert [e.id for e in reader] == ["ok", "z"]
    assert reader.report.skipped == {reason: 1}


def test_reader_is_reiterable_and_report_resets(tmp_path: Path) -> None:
    make_volume(tmp_path / "a.npy")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good_record()) + "\n{bad\n")
    reader = read_conversations(path, on_error="skip")
    for _ in range(2):
        with pytest.warns(DatasetWarning):
            assert len(list(reader)) == 1
        assert reader.report.rows == 2 and reader.report.n_skipped == 1


# ---------------------------------------------------------------------------------------------
# converters


def test_convert_each_format_reads_back(
    cap_json: Path, vqa_csv: Path, ct_rate: tuple[Path, Path], tmp_path: Path
) -> None:
    reports, vol_dir = ct_rate
    cases = [
        ("m3d_cap", (cap_json, "train"), {}, read_m3d_cap(cap_json, "train")),
        ("m3d_vqa", (vqa_csv,), {"form": "closed"}, read_m3d_vqa(vqa_csv, form="closed")),
        (
            "ct_rate",
            (reports, vol_dir),
            {"orientation": "acquisition"},
            read_ct_rate(reports, vol_dir, orientation="acquisition"),
        ),
    ]
    for name, inputs, options, source in cases:
        out = tmp_path / "out" / f"{name}.jsonl"
        report = convert(name, *inputs, out_jsonl=out, **options)  # type: ignore[arg-type]
        expected = list(source)
        assert report.examples == len(expected) > 0
        assert list(read_conversations(out)) == expected
    with pytest.raises(ValueError, match="unknown source format"):
        convert("mimic", out_jsonl=tmp_path / "x.jsonl")  # type: ignore[arg-type]


def test_convert_skip_reports_counts(vqa_csv: Path, tmp_path: Path) -> None:
    (tmp_path / "vol/b.npy").unlink()
    with pytest.warns(DatasetWarning):
        report = convert("m3d_vqa", vqa_csv, out_jsonl=tmp_path / "o.jsonl", on_error="skip")
    assert report.skipped == {"missing volume": 1} and report.examples == 2
    assert len(list(read_conversations(tmp_path / "o.jsonl"))) == 2


# ---------------------------------------------------------------------------------------------
# Example


def test_example_validates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        Example("a", tmp_path, "summarise", "q", "q", "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not contain"):
        Example("a", tmp_path, "vqa_open", "q", f"{IMAGE_PLACEHOLDER} q", "a")
    with pytest.raises(ValueError, match="relevant_slices"):
        Example("a", tmp_path, "vqa_open", "q", "q", "a", relevant_slices=(-1,))
    example = Example("a", str(tmp_path), "vqa_open", "q", "q", "a", relevant_slices=[1, 2])  # type: ignore[arg-type]
    assert example.volume == tmp_path and example.relevant_slices == (1, 2)


def test_registry_opens_every_format_from_one_source_type(
    cap_json: Path, vqa_csv: Path, ct_rate: tuple[Path, Path], tmp_path: Path
) -> None:
    reports, vol_dir = ct_rate
    conversations = write_conversations(list(read_m3d_vqa(vqa_csv)), tmp_path / "conv.jsonl")
    cases = {
        "m3d_cap": (DatasetSource("m3d_cap", str(cap_json), split="train"), read_m3d_cap(cap_json, "train")),
        "m3d_vqa": (DatasetSource("m3d_vqa", str(vqa_csv), form="open"), read_m3d_vqa(vqa_csv, form="open")),
        "ct_rate": (
            DatasetSource("ct_rate", str(reports), volume_dir=str(vol_dir)),
            read_ct_rate(reports, vol_dir),
        ),
        "conversations": (
            DatasetSource("conversations", str(conversations)),
            read_conversations(conversations),
        ),
    }
    assert set(cases) == set(DATASET_FORMATS)
    for source, expected in cases.values():
        assert read_dataset(source) == list(expected)
    assert len(read_dataset(DatasetSource("m3d_vqa", str(vqa_csv), limit=1))) == 1
    assert format_of(cap_json) == "m3d_cap" and format_of(conversations) == "conversations"
    with pytest.raises(DatasetError, match="needs a split"):
        read_dataset(DatasetSource("m3d_cap", str(cap_json)))
    with pytest.raises(DatasetError, match="needs volume_dir"):
        read_dataset(DatasetSource("ct_rate", str(reports)))
    with pytest.raises(DatasetError, match="unknown format 'mimic'"):
        read_dataset(DatasetSource("mimic", str(reports)))  # type: ignore[arg-type]
