"""Dataset readers: M3D-Cap, M3D-VQA, CT-RATE and the project's conversation JSONL.

Every ``read_*`` function checks the file (and its header) at once, then returns an
:class:`ExampleReader`: a lazy, re-iterable stream of :class:`Example` items. No reader loads a
volume; each only checks that the volume path exists.

Error policy (``on_error`` on every reader):

* ``"raise"``: the first bad row raises :class:`~med2e3.errors.DatasetError` naming the file and row.
* ``"skip"``: bad rows are skipped and counted per reason in ``reader.report.skipped``; after a full
  pass one :class:`DatasetWarning` summarises the counts.

Always errors, whatever the policy: a missing file, an unreadable JSON document, a wrong CSV header
(before anything is yielded), and a pass that yields no example at all (every row broken, or none).

Row numbers in errors: 1-based line numbers for CSV (the header is line 1; a record's first line)
and JSONL files, ``"<split>[<index>]"`` for M3D-Cap JSON entries.

Conversation JSONL schema (one object per line, written by :func:`write_conversations`)::

    {"id": str, "volume": str, "task": "caption"|"report"|"vqa_open"|"vqa_closed",
     "question": str,
     "conversations": [{"from": "human", "value": "<image3d>\\n" + prompt},
                       {"from": "gpt", "value": answer}],
     "question_type": str|null, "answer_letter": str|null,
     "relevant_slices": [int]|null, "orientation": "axial"|"acquisition"}

``volume`` is relative to the data root (default: the JSONL's folder) or absolute. The ``gpt`` turn is
omitted for inference examples (``answer`` None). Multi-turn conversations (more than one user turn
and one assistant turn) are rejected for now. ``question_type``, ``answer_letter``,
``relevant_slices`` and ``orientation`` may be absent (defaults: null, null, null, "axial").
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from med2e3.errors import DatasetError
from med2e3.files import atomic_path

Task = Literal["caption", "report", "vqa_open", "vqa_closed"]
Orientation = Literal["axial", "acquisition"]
OnError = Literal["raise", "skip"]
VqaForm = Literal["closed", "open", "both"]
SourceFormat = Literal["m3d_cap", "m3d_vqa", "ct_rate"]
DataFormat = Literal["conversations", "m3d_cap", "m3d_vqa", "ct_rate"]

TASKS: tuple[str, ...] = get_args(Task)
ORIENTATIONS: tuple[str, ...] = get_args(Orientation)
QUESTION_TYPES: tuple[str, ...] = ("Plane", "Phase", "Organ", "Abnormality", "Location")
ANSWER_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
IMAGE_PLACEHOLDER = "<image3d>"

#: Instructions for report generation (M3D-Cap, CT-RATE); one is picked per example from its id.
REPORT_INSTRUCTIONS: tuple[str, ...] = (
    "Please write a radiology report for this CT scan.",
    "Describe the findings of this CT scan.",
    "Write a radiology report describing this 3D medical image.",
    "What are the findings in this CT volume? Answer as a report.",
    "Generate a report for this CT image.",
    "Summarise this CT scan as a radiology report.",
)

#: Columns of an M3D-VQA CSV, all required; ``Relevant Slices`` is optional.
VQA_COLUMNS: tuple[str, ...] = (
    "Image Path",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)
VQA_OPTIONAL_COLUMNS: tuple[str, ...] = ("Relevant Slices",)

#: CT-RATE report columns: the first header name present wins (the ``_EN`` names of the release,
#: then the plain names). Other columns of the CSV are ignored.
CT_RATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "volume": ("VolumeName",),
    "findings": ("Findings_EN", "Findings"),
    "impression": ("Impressions_EN", "Impressions"),
}
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".npy")


class DatasetWarning(UserWarning):
    """Rows of a dataset file were skipped (``on_error="skip"``)."""


@dataclass(frozen=True)
class Example:
    """One volume with one instruction and its target text.

    ``question`` is the bare question or instruction (what TG-IS reads); ``prompt`` is the user turn
    shown to the LLM, without the image placeholder. ``relevant_slices`` are model-slice indices.
    """

    id: str
    volume: Path
    task: Task
    question: str
    prompt: str
    answer: str | None
    question_type: str | None = None
    answer_letter: str | None = None
    relevant_slices: tuple[int, ...] | None = None
    orientation: Orientation = "axial"

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume", Path(self.volume))
        if self.relevant_slices is not None:
            object.__setattr__(self, "relevant_slices", tuple(self.relevant_slices))
        if not self.id:
            raise ValueError("id is empty")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation {self.orientation!r} is not one of {ORIENTATIONS}")
        if self.question_type is not None and self.question_type not in QUESTION_TYPES:
            raise ValueError(f"question_type {self.question_type!r} is not one of {QUESTION_TYPES}")
        if self.answer_letter is not None and self.answer_letter not in ANSWER_LETTERS:
            raise ValueError(f"answer_letter {self.answer_letter!r} is not one of {ANSWER_LETTERS}")
        if self.relevant_slices is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.relevant_slices
        ):
            raise ValueError(f"relevant_slices {self.relevant_slices} must be non-negative integers")
        if IMAGE_PLACEHOLDER in self.prompt or IMAGE_PLACEHOLDER in self.question:
            raise ValueError(f"question and prompt must not contain {IMAGE_PLACEHOLDER}")


@dataclass
class ReadReport:
    """Counts of one pass over a dataset file."""

    path: Path
    rows: int = 0
    examples: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped_row: dict[str, int | str] = field(default_factory=dict)
    ignored_columns: tuple[str, ...] = ()

    @property
    def n_skipped(self) -> int:
        """Number of rows skipped, all reasons together."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: how many rows were skipped, per reason, and ignored columns."""
        reasons = ", ".join(
            f"{reason}: {n} (first at row {self.first_skipped_row[reason]})"
            for reason, n in self.skipped.most_common()
        )
        text = f"{self.path}: skipped {self.n_skipped} of {self.rows} rows"
        text += f" ({reasons})" if reasons else ""
        if self.ignored_columns:
            text += f"; ignored unknown columns {list(self.ignored_columns)}"
        return text


class _BadRow(Exception):
    """A row that cannot be turned into examples; ``reason`` is the skip-count key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_RowResult = list[Example] | _BadRow
_Rows = Callable[[], Iterator[tuple[int | str, _RowResult]]]


CHOICES_MARK = " Choices: "


def closed_prompt(question: str, choices: Sequence[str]) -> str:
    """The user turn of a closed question: ``"<question> Choices: A. x B. y C. z D. w"``."""
    listed = " ".join(f"{lt}. {c}" for lt, c in zip(ANSWER_LETTERS, choices, strict=True))
    return f"{question}{CHOICES_MARK}{listed}"


def closed_choices(prompt: str) -> list[str]:
    """The option texts of a `closed_prompt`, in letter order."""
    listed = prompt.split(CHOICES_MARK, 1)[1]
    parts = re.split(r"(?:^| )([A-D])\. ", listed)[1:]
    return [text.strip() for text in parts[1::2]]


class ExampleReader(Iterable[Example]):
    """Lazy, re-iterable stream of examples applying the error policy; ``report`` has the counts."""

    def __init__(self, path: Path, rows: _Rows, on_error: OnError, ignored_columns: tuple[str, ...] = ()):
        self.path = path
        self.on_error = on_error
        self._rows = rows
        self._ignored_columns = ignored_columns
        self.report = ReadReport(path, ignored_columns=ignored_columns)

    def __iter__(self) -> Iterator[Example]:
        report = self.report = ReadReport(self.path, ignored_columns=self._ignored_columns)
        for row, result in self._rows():
            report.rows += 1
            if isinstance(result, _BadRow):
                if self.on_error == "raise":
                    raise DatasetError(self.path, result.detail, row=row)
                report.skipped[result.reason] += 1
                report.first_skipped_row.setdefault(result.reason, row)
                continue
            report.examples += len(result)
            yield from result
        if report.examples == 0:
            reason = "every row is broken: " + report.summary() if report.rows else "contains no examples"
            raise DatasetError(self.path, reason)
        if report.skipped or report.ignored_columns:
            warnings.warn(report.summary(), DatasetWarning, stacklevel=2)


def report_instruction(key: str) -> str:
    """Pick a report-generation instruction deterministically from ``key`` (an example id)."""
    return REPORT_INSTRUCTIONS[zlib.crc32(key.encode("utf-8")) % len(REPORT_INSTRUCTIONS)]


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_policy(on_error: str) -> None:
    if on_error not in get_args(OnError):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _existing_file(path: str | Path) -> Path:
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.is_file():
        raise DatasetError(path, "file not found")
    return path


def _root(data_root: str | Path | None, default: Path) -> Path:
    return Path(os.path.abspath(Path(data_root).expanduser() if data_root is not None else default))


def _resolve(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else root / p))


def _volume(root: Path, value: str) -> Path:
    path = _resolve(root, value)
    if not path.exists():
        raise _BadRow("missing volume", f"volume not found: {path}")
    return path


def _example(**fields: Any) -> list[Example]:
    try:
        return [Example(**fields)]
    except ValueError as e:
        raise _BadRow("invalid field", str(e)) from None


def _attempt(parse: Callable[..., list[Example]], *args: Any) -> _RowResult:
    try:
        return parse(*args)
    except _BadRow as bad:
        return bad


def _read_csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            header = next(csv.reader(f), None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetError(path, f"unreadable CSV header: {e}", row=1) from None
    if not header:
        raise DatasetError(path, "empty file, expected a CSV header", row=1)
    return [name.strip() for name in header]


def _csv_records(path: Path, header: list[str]) -> Iterator[tuple[int, dict[str, str] | _BadRow]]:
    """Yield (first line number, cells by column) for each non-blank data record of a CSV."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield line, _BadRow("unreadable row", f"unreadable CSV record: {e}")
                continue
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield line, _BadRow("missing field", f"expected {len(header)} cells, found {len(cells)}")
                continue
            yield line, {name: cell.strip() for name, cell in zip(header, cells, strict=True)}


def _need(record: dict[str, str], column: str) -> str:
    value = record.get(column, "")
    if not value:
        raise _BadRow("missing field", f"empty {column!r}")
    return value


# ---------------------------------------------------------------------------------------------
# M3D-Cap


def read_m3d_cap(
    json_path: str | Path,
    split: str,
    data_root: str | Path | None = None,
    *,
    orientation: Orientation = "axial",
    on_error: OnError = "raise",
) -> ExampleReader:
    """Read one split of an M3D-Cap JSON (``{"train": [{"image": ..., "text": ...}], ...}``).

    Paths are relative to ``data_root`` (default: the JSON's folder). Each entry gives a
    ``task="caption"`` example whose answer is the text of its ``.txt`` file and whose question is
    :func:`report_instruction` of its id ``"<json stem>-<split>-<index>"``.
    """
    _check_policy(on_error)
    path = _existing_file(json_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(path, f"no list for split {split!r} (found: {found})")
    entries: list[Any] = data[split]
    root = _root(data_root, path.parent)

    def parse(index: int, entry: Any) -> list[Example]:
        if not isinstance(entry, dict):
            raise _BadRow("missing field", "entry is not an object with 'image' and 'text'")
        image, text = entry.get("image"), entry.get("text")
        if not isinstance(image, str) or not image or not isinstance(text, str) or not text:
            raise _BadRow("missing field", "entry needs string fields 'image' and 'text'")
        volume = _volume(root, image)
        text_path = _resolve(root, text)
        try:
            caption = text_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise _BadRow(
                "missing caption", f"caption not readable: {text_path} ({e.__class__.__name__})"
            ) from None
        if not caption:
            raise _BadRow("missing caption", f"caption file is empty: {text_path}")
        example_id = f"{path.stem}-{split}-{index}"
        instruction = report_instruction(example_id)
        return _example(
            id=example_id,
            volume=volume,
            task="caption",
            question=instruction,
            prompt=instruction,
            answer=caption,
            orientation=orientation,
        )

    def rows() -> Iterator[tuple[int | str, _RowResult]]:
        for index, entry in enumerate(entries):
            yield f"{split}[{index}]", _attempt(parse, index, entry)

    return ExampleReader(path, rows, on_error)


# ---------------------------------------------------------------------------------------------
# M3D-VQA


def _question_type(value: str) -> str:
    if value.isdigit() and 1 <= int(value) <= len(QUESTION_TYPES):
        return QUESTION_TYPES[int(value) - 1]
    for name in QUESTION_TYPES:
        if value.lower() == name.lower():
            return name
    raise _BadRow("bad question type", f"question type {value!r} is not 1-5 or one of {list(QUESTION_TYPES)}")


def _relevant_slices(value: str) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        slices = tuple(int(v) for v in value.split())
    except ValueError:
        raise _BadRow("bad relevant slices", f"relevant slices {value!r} are not integers") from None
    if any(i < 0 for i in slices):
        raise _BadRow("bad relevant slices", f"relevant slices {value!r} must be non-negative")
    return slices


def read_m3d_vqa(
    csv_path: str | Path,
    data_root: str | Path | None = None,
    form: VqaForm = "both",
    *,
    orientation: Orientation = "axial",
    on_error: OnError = "raise",
) -> ExampleReader:
    """Read an M3D-VQA CSV (columns :data:`VQA_COLUMNS`, optionally ``Relevant Slices``).

    ``form="both"`` yields the closed example then the open one for each row. Closed: the prompt
    lists the choices and the answer is ``"<letter>. <choice>"``; open: the answer is ``Answer``.
    Ids are ``"<csv stem>-<data row index>-<closed|open>"``. Image paths are relative to
    ``data_root`` (default: the CSV's folder). An unknown column raises, or is ignored with
    ``on_error="skip"`` (named in the warning and ``report.ignored_columns``).
    """
    _check_policy(on_error)
    if form not in get_args(VqaForm):
        raise ValueError(f"form must be 'closed', 'open' or 'both', got {form!r}")
    path = _existing_file(csv_path)
    header = _read_csv_header(path)
    missing = [c for c in VQA_COLUMNS if c not in header]
    if missing:
        raise DatasetError(path, f"header lacks column(s) {missing}; expected {list(VQA_COLUMNS)}", row=1)
    unknown = tuple(c for c in header if c not in VQA_COLUMNS + VQA_OPTIONAL_COLUMNS)
    if unknown and on_error == "raise":
        raise DatasetError(path, f"unknown column(s) {list(unknown)}", row=1)
    root = _root(data_root, path.parent)

    def parse(index: int, record: dict[str, str]) -> list[Example]:
        volume = _volume(root, _need(record, "Image Path"))
        question_type = _question_type(_need(record, "Question Type"))
        question = _need(record, "Question")
        common = dict(
            volume=volume,
            question=question,
            question_type=question_type,
            relevant_slices=_relevant_slices(record.get("Relevant Slices", "")),
            orientation=orientation,
        )
        examples: list[Example] = []
        if form in ("closed", "both"):
            choices = [_need(record, f"Choice {letter}") for letter in ANSWER_LETTERS]
            letter = _need(record, "Answer Choice").upper()
            if letter not in ANSWER_LETTERS:
                raise _BadRow("bad answer letter", f"answer choice {letter!r} is not one of A-D")
            examples += _example(
                id=f"{path.stem}-{index}-closed",
                task="vqa_closed",
                prompt=closed_prompt(question, choices),
                answer=f"{letter}. {choices[ANSWER_LETTERS.index(letter)]}",
                answer_letter=letter,
                **common,
            )
        if form in ("open", "both"):
            examples += _example(
                id=f"{path.stem}-{index}-open",
                task="vqa_open",
                prompt=question,
                answer=_need(record, "Answer"),
                **common,
            )
        return examples

    def rows() -> Iterator[tuple[int | str, _RowResult]]:
        for index, (line, record) in enumerate(_csv_records(path, header)):
            yield line, record if isinstance(record, _BadRow) else _attempt(parse, index, record)

    return ExampleReader(path, rows, on_error, ignored_columns=unknown)


# ---------------------------------------------------------------------------------------------
# CT-RATE


def _strip_volume_suffix(name: str) -> str:
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _index_volumes(volume_dir: Path) -> dict[str, list[Path]]:
    """Map file name -> paths of every volume file under ``volume_dir`` (recursive)."""
    index: dict[str, list[Path]] = {}
    for p in sorted(volume_dir.rglob("*")):
        if p.name.endswith(VOLUME_SUFFIXES) and p.is_file():
            index.setdefault(p.name, []).append(Path(os.path.abspath(p)))
    return index


def _ct_rate_report(findings: str, impression: str) -> str:
    """Join findings and impression as ``findings + "\\n\\nImpression: " + impression``."""
    if not findings and not impression:
        raise _BadRow("missing field", "both findings and impression are empty")
    if not impression:
        return findings
    return f"{findings}\n\nImpression: {impression}" if findings else f"Impression: {impression}"


def read_ct_rate(
    reports_csv: str | Path,
    volume_dir: str | Path,
    *,
    orientation: Orientation = "axial",
    on_error: OnError = "raise",
) -> ExampleReader:
    """Read a CT-RATE reports CSV with its NIfTI volumes found by file name under ``volume_dir``.

    Columns: ``VolumeName``, ``Findings_EN`` (or ``Findings``), ``Impressions_EN`` (or
    ``Impressions``); other columns are ignored. Yields ``task="report"`` examples with answer
    ``findings + "\\n\\nImpression: " + impression`` (only the non-empty part when one is empty)
    and id the volume name without extension. The volume index is built once, on first iteration.
    """
    _check_policy(on_error)
    path = _existing_file(reports_csv)
    vol_dir = Path(os.path.abspath(Path(volume_dir).expanduser()))
    if not vol_dir.is_dir():
        raise DatasetError(vol_dir, "volume folder not found")
    header = _read_csv_header(path)
    columns: dict[str, str] = {}
    for key, names in CT_RATE_COLUMNS.items():
        found = next((n for n in names if n in header), None)
        if found is None:
            raise DatasetError(path, f"header lacks a column named {' or '.join(names)}", row=1)
        columns[key] = found
    index: dict[str, list[Path]] = {}

    def lookup(name: str) -> Path:
        candidates = index.get(name) or [
            p for suffix in VOLUME_SUFFIXES if not name.endswith(suffix) for p in index.get(name + suffix, [])
        ]
        if not candidates:
            raise _BadRow("missing volume", f"volume {name!r} not found under {vol_dir}")
        if len(candidates) > 1:
            raise _BadRow(
                "ambiguous volume", f"volume {name!r} found {len(candidates)} times under {vol_dir}"
            )
        return candidates[0]

    def parse(record: dict[str, str], seen: set[str]) -> list[Example]:
        name = _need(record, columns["volume"])
        example_id = _strip_volume_suffix(name)
        if example_id in seen:
            raise _BadRow("duplicate id", f"volume {name!r} listed twice")
        answer = _ct_rate_report(record[columns["findings"]], record[columns["impression"]])
        volume = lookup(name)
        seen.add(example_id)
        instruction = report_instruction(example_id)
        return _example(
            id=example_id,
            volume=volume,
            task="report",
            question=instruction,
            prompt=instruction,
            answer=answer,
            orientation=orientation,
        )

    def rows() -> Iterator[tuple[int | str, _RowResult]]:
        if not index:
            index.update(_index_volumes(vol_dir))
        seen: set[str] = set()
        for line, record in _csv_records(path, header):
            yield line, record if isinstance(record, _BadRow) else _attempt(parse, record, seen)

    return ExampleReader(path, rows, on_error)


# ---------------------------------------------------------------------------------------------
# Conversation JSONL (the project's own format)

_JSONL_REQUIRED: tuple[str, ...] = ("id", "volume", "task", "question", "conversations")
_JSONL_OPTIONAL: tuple[str, ...] = ("question_type", "answer_letter", "relevant_slices", "orientation")


def _turns(conversations: Any) -> tuple[str, str | None]:
    """Return (prompt without placeholder, answer or None) from the ``conversations`` list."""
    if not isinstance(conversations, list) or not conversations:
        raise _BadRow("bad conversation", "'conversations' must be a non-empty list of turns")
    if len(conversations) > 2:
        raise _BadRow(
            "multi-turn",
            f"multi-turn conversations are not supported ({len(conversations)} turns); "
            "split them into one example per question",
        )
    expected = ("human", "gpt")
    for turn, speaker in zip(conversations, expected, strict=False):
        if (
            not isinstance(turn, dict)
            or turn.get("from") != speaker
            or not isinstance(turn.get("value"), str)
        ):
            raise _BadRow("bad conversation", f"expected a turn {{'from': {speaker!r}, 'value': str}}")
    human: str = conversations[0]["value"]
    if human.count(IMAGE_PLACEHOLDER) != 1:
        raise _BadRow("bad conversation", f"the human turn must contain {IMAGE_PLACEHOLDER} exactly once")
    lead = IMAGE_PLACEHOLDER + "\n"
    prompt = human[len(lead) :] if human.startswith(lead) else human.replace(IMAGE_PLACEHOLDER, "").strip()
    answer = conversations[1]["value"] if len(conversations) == 2 else None
    return prompt, answer


def _conversation_example(obj: Any, root: Path, seen: set[str]) -> list[Example]:
    if not isinstance(obj, dict):
        raise _BadRow("broken JSON", "line is not a JSON object")
    missing = [k for k in _JSONL_REQUIRED if k not in obj]
    if missing:
        raise _BadRow("missing field", f"missing field(s) {missing}")
    unknown = [k for k in obj if k not in _JSONL_REQUIRED + _JSONL_OPTIONAL]
    if unknown:
        raise _BadRow("unknown field", f"unknown field(s) {unknown}")
    for key in ("id", "volume", "question"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise _BadRow("invalid field", f"{key!r} must be a non-empty string")
    if obj["id"] in seen:
        raise _BadRow("duplicate id", f"duplicate id {obj['id']!r}")
    slices = obj.get("relevant_slices")
    if slices is not None and not isinstance(slices, list):
        raise _BadRow("invalid field", "'relevant_slices' must be a list of integers or null")
    prompt, answer = _turns(obj["conversations"])
    examples = _example(
        id=obj["id"],
        volume=_volume(root, obj["volume"]),
        task=obj["task"],
        question=obj["question"],
        prompt=prompt,
        answer=answer,
        question_type=obj.get("question_type"),
        answer_letter=obj.get("answer_letter"),
        relevant_slices=None if slices is None else tuple(slices),
        orientation=obj.get("orientation", "axial"),
    )
    seen.add(obj["id"])
    return examples


def read_conversations(
    jsonl_path: str | Path,
    data_root: str | Path | None = None,
    *,
    on_error: OnError = "raise",
) -> ExampleReader:
    """Read the conversation JSONL (schema in the module docstring); volumes relative to ``data_root``."""
    _check_policy(on_error)
    path = _existing_file(jsonl_path)
    root = _root(data_root, path.parent)

    def parse(text: str, seen: set[str]) -> list[Example]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _BadRow("broken JSON", f"not valid JSON: {e.msg} (column {e.colno})") from None
        return _conversation_example(obj, root, seen)

    def rows() -> Iterator[tuple[int | str, _RowResult]]:
        seen: set[str] = set()
        with path.open(encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if text.strip():
                    yield line_no, _attempt(parse, text, seen)

    return ExampleReader(path, rows, on_error)


def example_to_record(example: Example, base: Path) -> dict[str, Any]:
    """The JSONL object for ``example``; the volume is made relative to ``base`` when under it."""
    volume = Path(os.path.abspath(example.volume))
    base = Path(os.path.abspath(base))
    turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{example.prompt}"}]
    if example.answer is not None:
        turns.append({"from": "gpt", "value": example.answer})
    return {
        "id": example.id,
        "volume": str(volume.relative_to(base) if volume.is_relative_to(base) else volume),
        "task": example.task,
        "question": example.question,
        "conversations": turns,
        "question_type": example.question_type,
        "answer_letter": example.answer_letter,
        "relevant_slices": None if example.relevant_slices is None else list(example.relevant_slices),
        "orientation": example.orientation,
    }


def write_conversations(examples: Iterable[Example], jsonl_path: str | Path) -> Path:
    """Write ``examples`` as conversation JSONL atomically (temp file + ``os.replace``); return the path.

    Volumes under the JSONL's folder are written relative to it, others as absolute paths. Duplicate
    ids raise :class:`DatasetError`; on any error the target file is left untouched.
    """
    path = Path(os.path.abspath(Path(jsonl_path).expanduser()))
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        seen: set[str] = set()
        for n, example in enumerate(examples, start=1):
            if example.id in seen:
                raise DatasetError(path, f"duplicate id {example.id!r}", row=n)
            seen.add(example.id)
            f.write(json.dumps(example_to_record(example, path.parent), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


# ---------------------------------------------------------------------------------------------
# The registry: one place that knows every format


@dataclass
class DatasetSource:
    """One dataset file in a known format (a ``data.train`` / ``data.eval`` entry of a training config).

    ``split``: M3D-Cap's split; ``form``: which M3D-VQA questions; ``volume_dir``: CT-RATE's volumes;
    ``data_root``: the folder relative volume paths start from; ``limit``: the first N examples only.
    """

    format: DataFormat
    path: str
    split: str | None = None
    form: VqaForm = "both"
    volume_dir: str | None = None
    data_root: str | None = None
    orientation: Orientation = "axial"
    limit: int | None = None


def _open_m3d_cap(source: DatasetSource, on_error: OnError) -> ExampleReader:
    if not source.split:
        raise DatasetError(source.path, "an m3d_cap source needs a split (train / validation / test)")
    return read_m3d_cap(
        source.path, source.split, source.data_root, orientation=source.orientation, on_error=on_error
    )


def _open_m3d_vqa(source: DatasetSource, on_error: OnError) -> ExampleReader:
    return read_m3d_vqa(
        source.path, source.data_root, source.form, orientation=source.orientation, on_error=on_error
    )


def _open_ct_rate(source: DatasetSource, on_error: OnError) -> ExampleReader:
    if not source.volume_dir:
        raise DatasetError(source.path, "a ct_rate source needs volume_dir (the folder of its NIfTI files)")
    return read_ct_rate(source.path, source.volume_dir, orientation=source.orientation, on_error=on_error)


def _open_conversations(source: DatasetSource, on_error: OnError) -> ExampleReader:
    return read_conversations(source.path, source.data_root, on_error=on_error)


@dataclass(frozen=True)
class DatasetFormat:
    """A known format: its reader (the file's own arguments) and how a `DatasetSource` opens it."""

    reader: Callable[..., ExampleReader]
    open: Callable[[DatasetSource, OnError], ExampleReader]


#: Format name -> reader. Adding a format: a reader, an entry here, its name in `DataFormat`.
DATASET_FORMATS: dict[str, DatasetFormat] = {
    "conversations": DatasetFormat(read_conversations, _open_conversations),
    "m3d_cap": DatasetFormat(read_m3d_cap, _open_m3d_cap),
    "m3d_vqa": DatasetFormat(read_m3d_vqa, _open_m3d_vqa),
    "ct_rate": DatasetFormat(read_ct_rate, _open_ct_rate),
}


def open_dataset(source: DatasetSource, on_error: OnError = "raise") -> ExampleReader:
    """The reader of ``source`` (its examples, lazily; ``source.limit`` is applied by `read_dataset`)."""
    if source.format not in DATASET_FORMATS:
        raise DatasetError(
            source.path, f"unknown format {source.format!r}; known: {', '.join(DATASET_FORMATS)}"
        )
    return DATASET_FORMATS[source.format].open(source, on_error)


def read_dataset(source: DatasetSource, on_error: OnError = "raise") -> list[Example]:
    """All examples of ``source`` (the first ``source.limit`` when set)."""
    if source.limit is not None and source.limit < 1:
        raise DatasetError(source.path, f"limit must be at least 1, got {source.limit}")
    examples = list(open_dataset(source, on_error))
    return examples[: source.limit] if source.limit else examples


def format_of(path: str | Path) -> str:
    """The format a dataset file's name implies: .csv M3D-VQA, .json M3D-Cap, .jsonl conversations."""
    name = Path(path).name.lower()
    for suffix, fmt in ((".jsonl", "conversations"), (".json", "m3d_cap"), (".csv", "m3d_vqa")):
        if name.endswith(suffix):
            return fmt
    raise DatasetError(path, "unknown dataset format: expected .csv (M3D-VQA), .json (M3D-Cap) or .jsonl")


def convert(
    source_format: SourceFormat, *inputs: str | Path, out_jsonl: str | Path, **options: Any
) -> ReadReport:
    """Convert a source dataset to conversation JSONL; return the reader's counts.

    ``inputs`` and ``options`` go to the reader, e.g.
    ``convert("m3d_vqa", "M3D_VQA_train.csv", out_jsonl="vqa.jsonl", form="closed")`` or
    ``convert("m3d_cap", "M3D_Cap.json", "train", out_jsonl="cap.jsonl", on_error="skip")``.
    """
    if source_format not in get_args(SourceFormat):
        raise ValueError(f"unknown source format {source_format!r}; expected one of {get_args(SourceFormat)}")
    reader = DATASET_FORMATS[source_format].reader(*inputs, **options)
    write_conversations(reader, out_jsonl)
    return reader.report
