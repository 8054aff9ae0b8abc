"""Render benchmark JSON lines as the markdown tables of docs/performance.md.

Run from the repository root::

    python -m benchmarks.report inference.jsonl training.jsonl > tables.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAGES = ("preprocess", "encode2d", "encode3d", "encode_volume", "tgis", "prefill", "encode_plus_prefill")


def fmt(stats: dict[str, Any] | None) -> str:
    """``median (min–max)`` in ms, or a dash."""
    if not stats:
        return "–"
    return f"{stats['median_ms']:.1f} ({stats['min_ms']:.1f}–{stats['max_ms']:.1f})"


def num(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def utilisation(r: dict[str, Any]) -> str:
    if "mfu" in r:
        return f"{100 * r['mfu']:.1f}% MFU"
    return f"{r['achieved_tflops']:.4f} TFLOP/s" if "achieved_tflops" in r else ""


def stages(records: list[dict]) -> str:
    rows = [
        [r["name"], fmt(r.get("naive")), fmt(r.get("optimised")), num(r.get("speedup")), utilisation(r)]
        for r in records
        if r["name"] in STAGES
    ]
    return table(["stage", "naive ms", "optimised ms", "speedup", "utilisation"], rows)


def decode(records: list[dict]) -> str:
    rows = []
    for r in (r for r in records if r["name"] == "decode"):
        for name, v in r["variants"].items():
            rows.append(
                [
                    name,
                    fmt(v["ms_per_token"]),
                    num(v["tokens_per_s"], 1),
                    num(v["speedup_vs_dynamic"]),
                    num(v.get("ratio_to_bound")),
                    num(v["first_call_s"]),
                    str(len(v["graph_breaks"])),
                    str(r["tokens_equal"]),
                ]
            )
    header = [
        "cache",
        "ms/token",
        "tokens/s",
        "vs dynamic",
        "x bound",
        "first call s",
        "graph breaks",
        "same tokens",
    ]
    return table(header, rows)


def questions(records: list[dict]) -> str:
    rows = [
        [
            str(r["n_questions"]),
            fmt(r["naive"]),
            fmt(r["cached"]),
            fmt(r["optimised"]),
            num(r["speedup"]),
            num(r["speedup_cached"]),
            str(r["answers_equal"]),
        ]
        for r in records
        if r["name"] == "questions"
    ]
    header = ["questions", "naive ms", "cached ms", "optimised ms", "speedup", "cache only", "same answers"]
    return table(header, rows)


def batch(records: list[dict]) -> str:
    encode = {r["volumes"]: r for r in records if r["name"] == "batch_encode"}
    rows = []
    for r in (r for r in records if r["name"] == "batch_answer"):
        e = encode.get(r["volumes"], {})
        rows.append(
            [
                str(r["volumes"]),
                f"{num(e.get('per_volume_ms', {}).get('naive'), 1)} / {num(e.get('per_volume_ms', {}).get('optimised'), 1)}",
                num(e.get("speedup")),
                f"{r['per_volume_ms']['naive']:.1f} / {r['per_volume_ms']['optimised']:.1f}",
                f"{r['volumes_per_s']['naive']:.1f} / {r['volumes_per_s']['optimised']:.1f}",
                num(r["speedup"]),
                str(r["answers_equal"]),
            ]
        )
    header = [
        "volumes",
        "encode ms/volume (naive / batched)",
        "speedup",
        "answer ms/volume (naive / batched)",
        "volumes/s",
        "speedup",
        "same answers",
    ]
    return table(header, rows)


def batch_mode(records: list[dict]) -> str:
    rows = [
        [
            f"{r['volumes']} x {r['questions_per_volume']}",
            fmt(r["naive"]),
            fmt(r["optimised"]),
            f"{r['per_row_ms']['naive']:.1f} / {r['per_row_ms']['optimised']:.1f}",
            num(r["speedup"]),
            str(r["answers_equal"]),
        ]
        for r in records
        if r["name"] == "batch_mode"
    ]
    header = [
        "volumes x questions",
        "naive ms",
        "run_batch ms",
        "ms/row (naive / run_batch)",
        "speedup",
        "same",
    ]
    return table(header, rows)


def depth(records: list[dict]) -> str:
    rows = [
        [str(r["depth"]), str(r["image_tokens"]), str(r["prompt_tokens"])]
        + [f"{fmt(r[k])} [x{r['ratio_to_first'][k]:.2f}]" for k in ("encode", "tgis", "prefill", "answer")]
        for r in records
        if r["name"] == "depth"
    ]
    return table(
        ["depth", "image tokens", "prompt tokens", "encode ms", "TG-IS ms", "prefill ms", "answer ms"], rows
    )


def training(records: list[dict]) -> str:
    rows = [
        [
            r["stage"],
            r["variant"],
            f"{r['attention']}{' + ckpt' if r['gradient_checkpointing'] else ''}",
            f"{r['batch']} x {r['seq_len']}",
            fmt(r["step"]),
            num(r["samples_per_s"]),
            num(r["peak_memory_mb"], 0),
            utilisation(r),
        ]
        for r in records
        if r["name"] == "train_step" and "step" in r
    ]
    header = [
        "stage",
        "variant",
        "attention",
        "batch x tokens",
        "step ms",
        "samples/s",
        "peak MB",
        "utilisation",
    ]
    return table(header, rows)


def compiled(records: list[dict]) -> str:
    rows = [
        [
            str(r["n_questions"]),
            fmt(r["eager"]),
            fmt(r["compiled"]),
            num(r["speedup"]),
            num(r["first_call_s"], 1),
            f"{r['same_answers']} / {r['n_questions']}",
        ]
        for r in records
        if r["name"] == "compiled_questions"
    ]
    header = ["questions", "default ms", "compile=True ms", "speedup", "first call s", "same answers"]
    return table(header, rows)


def render(records: list[dict]) -> str:
    """Every table that has records, each under a heading."""
    parts = []
    measured = [r for r in records if "skipped" not in r]
    for title, fn, names in (
        ("Stages", stages, STAGES),
        ("Decode (batch 1)", decode, ("decode",)),
        ("Questions on one volume", questions, ("questions",)),
        ("Batch of volumes (one question each)", batch, ("batch_answer",)),
        ("Batch mode (files to JSONL)", batch_mode, ("batch_mode",)),
        ("Volume depth", depth, ("depth",)),
        ("Training step", training, ("train_step",)),
        ("Compiled decoding (`Med2E3Predictor(compile=True)`)", compiled, ("compiled_questions",)),
    ):
        if any(r["name"] in names for r in measured):
            parts.append(f"#### {title}\n\n{fn(measured)}\n")
    for r in records:
        if r["name"] in ("equivalence", "error") or "skipped" in r or "error" in r:
            parts.append(f"- {json.dumps({k: v for k, v in r.items() if k not in ('bench', 'preset')})}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", help="JSONL files (default: stdin)")
    args = parser.parse_args(argv)
    texts = [Path(f).read_text() for f in args.files] if args.files else [sys.stdin.read()]
    records = [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
    print(render(records))


if __name__ == "__main__":
    main()
