"""Writing the benchmark: volume, caption and record files, resumable generation, index and README.

`generate_benchmark` draws the volumes (`med2e3.data.synth.anatomy`) and their text
(`med2e3.data.synth.text`) in worker processes and writes them in the M3D-Data layout (see
``docs/data.md``); `benchmark_source` and `benchmark_examples` read one of its files back.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from tqdm import tqdm

from med2e3.data.datasets import VQA_COLUMNS, VQA_OPTIONAL_COLUMNS, DatasetSource, Example, read_dataset
from med2e3.data.synth.anatomy import SynthConfig, case_rng, generate_volume
from med2e3.data.synth.text import _caption, _questions, _text_rng
from med2e3.errors import ConfigError
from med2e3.files import write_atomic

#: Version of what `anatomy` and `text` draw; part of the fingerprint that lets a rerun skip done volumes.
GENERATOR_VERSION = 1
#: Columns of the VQA CSVs: the M3D-VQA columns plus ``Relevant Slices``.
VQA_HEADER: tuple[str, ...] = VQA_COLUMNS + VQA_OPTIONAL_COLUMNS
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic .nii.gz bytes (int16, qform = sform = affine, mm units)."""
    img = nib.Nifti1Image(volume.astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"med2e3 synthetic CT"
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=4, mtime=0)


@dataclass(frozen=True)
class _Task:
    out_dir: str
    index: int
    case_id: str
    split: str
    seed: int
    cfg: SynthConfig
    fingerprint: str


def _record_path(out: Path, case_id: str) -> Path:
    return out / "labels" / f"{case_id}.json"


def _run_task(task: _Task) -> dict[str, Any]:
    """Generate, write and return the record of one volume (runs in a worker process)."""
    out = Path(task.out_dir)
    volume, affine, labels = generate_volume(case_rng(task.seed, task.index), task.cfg)
    rng = _text_rng(task.seed, task.index)
    image = f"volumes/{task.split}/{task.case_id}.nii.gz"
    caption = f"captions/{task.case_id}.txt"
    labels = {
        "id": task.case_id,
        "index": task.index,
        "split": task.split,
        "image": image,
        "caption": caption,
        **labels,
    }
    questions = _questions(rng, labels)
    text = _caption(rng, labels)
    write_atomic(out / image, _nifti_bytes(volume, affine))
    write_atomic(out / caption, (text + "\n").encode())
    record = {"fingerprint": task.fingerprint, "labels": labels, "questions": questions}
    write_atomic(_record_path(out, task.case_id), json.dumps(record).encode())  # written last: marks "done"
    return record


def _load_done(out: Path, task: _Task) -> dict[str, Any] | None:
    """The record of a volume already complete under the same arguments, else None."""
    path = _record_path(out, task.case_id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    labels = record.get("labels", {})
    if record.get("fingerprint") != task.fingerprint or labels.get("split") != task.split:
        return None
    files = [labels.get("image"), labels.get("caption")]
    if not all(isinstance(f, str) and (out / f).is_file() for f in files):
        return None
    return record


def _split_names(n: int, seed: int, splits: Sequence[float]) -> list[str]:
    """Split of each index: a seeded permutation cut at the rounded fractions."""
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ConfigError(
            f"splits: need three non-negative fractions (train, validation, test), got {splits}"
        )
    frac = np.array(splits, dtype=float) / sum(splits)
    n_train = int(round(frac[0] * n))
    n_val = min(n - n_train, int(round(frac[1] * n)))
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**32 - 1,))).permutation(n)
    names = [""] * n
    for rank, i in enumerate(order):
        names[int(i)] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    return names


CAPTIONS_FILE = "M3D_Cap.json"
VQA_FILE = "M3D_VQA_{split}.csv"


def benchmark_source(
    root: str | Path, kind: Literal["caption", "vqa"], split: str, form: str = "both"
) -> dict[str, str]:
    """One file of a generated benchmark as a dataset source (a training config's ``data`` entry; see
    `med2e3.data.datasets.DatasetSource`). The benchmark is read in acquisition orientation (docs/data.md)."""
    root = Path(root)
    if kind == "caption":
        return {
            "format": "m3d_cap",
            "path": str(root / CAPTIONS_FILE),
            "split": split,
            "orientation": "acquisition",
        }
    path = root / VQA_FILE.format(split=split)
    return {"format": "m3d_vqa", "path": str(path), "form": form, "orientation": "acquisition"}


def benchmark_examples(
    root: str | Path, kind: Literal["caption", "vqa"], split: str, form: str = "both"
) -> list[Example]:
    """The examples of one file of a generated benchmark (see `benchmark_source`)."""
    return read_dataset(DatasetSource(**benchmark_source(root, kind, split, form)))


def generate_benchmark(
    out_dir: str | Path,
    n_volumes: int,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic M3D-style benchmark under ``out_dir`` (see docs/data.md for the layout).

    Volumes are drawn in ``workers`` processes; the result depends only on (seed, cfg, n_volumes,
    splits). Rerunning with the same arguments skips volumes already complete. Returns a summary:
    counts per split (volumes, questions), how many were generated / skipped, and the file paths.
    """
    cfg = cfg or SynthConfig()
    if n_volumes < 1:
        raise ConfigError(f"n_volumes: must be >= 1, got {n_volumes}")
    out = Path(out_dir)
    names = _split_names(n_volumes, seed, splits)
    folders = [out / sub for sub in ("captions", "labels", *(f"volumes/{s}" for s in SPLITS))]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for folder in [out, *folders]:  # temporary files left by an interrupted run
        for stale in folder.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
    fingerprint = hashlib.sha256(
        json.dumps(
            {"version": GENERATOR_VERSION, "seed": seed, "cfg": cfg.to_dict()}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    width = max(5, len(str(n_volumes - 1)))
    tasks = [
        _Task(str(out), i, f"synth_{i:0{width}d}", names[i], seed, cfg, fingerprint) for i in range(n_volumes)
    ]
    records: dict[int, dict[str, Any]] = {}
    for task in tasks:
        done = _load_done(out, task)
        if done is not None:
            records[task.index] = done
    todo = [t for t in tasks if t.index not in records]
    start = time.perf_counter()
    n_proc = min(workers, len(todo))
    pool = mp.get_context().Pool(n_proc) if n_proc > 1 else None  # before tqdm starts its thread
    try:
        results = pool.imap_unordered(_run_task, todo, chunksize=2) if pool else map(_run_task, todo)
        with tqdm(
            total=n_volumes, initial=len(records), desc="synth", unit="vol", disable=not progress
        ) as bar:
            for record in results:
                records[record["labels"]["index"]] = record
                bar.update()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    elapsed = time.perf_counter() - start
    summary = _write_index(out, [records[i] for i in range(n_volumes)], seed, cfg, splits)
    summary.update({"generated": len(todo), "skipped": n_volumes - len(todo), "seconds": round(elapsed, 2)})
    return summary


def _write_index(
    out: Path, records: list[dict[str, Any]], seed: int, cfg: SynthConfig, splits: Sequence[float]
) -> dict[str, Any]:
    """M3D_Cap.json, M3D_VQA_<split>.csv, labels.jsonl and README.md from the per-volume records."""
    cap: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    rows: dict[str, list[list[str]]] = {s: [] for s in SPLITS}
    for rec in records:
        lab = rec["labels"]
        cap[lab["split"]].append({"image": lab["image"], "text": lab["caption"]})
        for q in rec["questions"]:
            rows[lab["split"]].append(
                [
                    lab["image"],
                    str(q["type"]),
                    q["question"],
                    *q["choices"],
                    q["answer"],
                    q["letter"],
                    " ".join(str(m) for m in q["slices"]),
                ]
            )
    paths = {
        "cap": out / CAPTIONS_FILE,
        "labels": out / "labels.jsonl",
        "readme": out / "README.md",
        **{f"vqa_{s}": out / VQA_FILE.format(split=s) for s in SPLITS},
    }
    write_atomic(paths["cap"], json.dumps(cap, indent=1).encode())
    for s in SPLITS:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(VQA_HEADER)
        writer.writerows(rows[s])
        write_atomic(paths[f"vqa_{s}"], buf.getvalue().encode())
    write_atomic(paths["labels"], "".join(json.dumps(r["labels"]) + "\n" for r in records).encode())
    counts = {s: len(cap[s]) for s in SPLITS}
    questions = {s: len(rows[s]) for s in SPLITS}
    write_atomic(paths["readme"], _readme(seed, cfg, splits, counts, questions).encode())
    return {
        "out_dir": str(out),
        "n_volumes": len(records),
        "volumes": counts,
        "questions": questions,
        "paths": {k: str(v) for k, v in paths.items()},
    }


def _readme(
    seed: int, cfg: SynthConfig, splits: Sequence[float], counts: dict[str, int], questions: dict[str, int]
) -> str:
    return f"""# Synthetic CT benchmark (med2e3)

Labelled CT-like volumes with exact answers, laid out like M3D-Data (M3D-Cap + M3D-VQA).
Generated by `med2e3.data.synth.generate_benchmark` (generator version {GENERATOR_VERSION}).

- seed: {seed}
- splits (train, validation, test): {list(splits)}
- volumes: {counts}
- questions: {questions}

Read the volumes with `orientation="acquisition"`: every label (`Relevant Slices`, `model_slices`)
indexes the stored 3rd NIfTI axis (k, the slice axis) resized to {cfg.n_model_slices} model slices;
model slice m covers stored slices [m*K/{cfg.n_model_slices}, (m+1)*K/{cfg.n_model_slices}).

Files: `volumes/<split>/<id>.nii.gz` (int16 HU), `captions/<id>.txt`, `M3D_Cap.json`,
`M3D_VQA_<split>.csv` (M3D-VQA columns + `Relevant Slices`), `labels.jsonl` (full ground truth),
`labels/<id>.json` (per-volume record; used to resume an interrupted run).

Config:

```json
{json.dumps(cfg.to_dict(), indent=2)}
```
"""
