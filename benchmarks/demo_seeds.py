"""The default demo at several seeds, and one markdown table of what each measured (docs/results.md).

Each seed runs ``med2e3 demo --out OUT/seed-N --seed N`` in its own process (a finished run is reused:
the demo resumes), then the table is printed from the ``summary.json`` files: held-out closed-VQA letter
accuracy per question type of the starting point (before the demo's fine-tune) and of the fine-tuned model
with its own volume and with a swapped one, the blind prior, the answer loss both ways, and the TG-IS rows. Run from the repository root::

    python -m benchmarks.demo_seeds --out runs/demo-seeds --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from med2e3.demo import type_accuracy

TYPES = ("Plane", "Phase", "Organ", "Abnormality", "Location", "overall")


def run_seed(out: Path, seed: int) -> dict[str, Any]:
    """The demo's summary for one seed (run now unless its summary exists), with the blind prior
    recomputed from its data by today's `med2e3.demo.blind_prior` (older summaries used another rule)."""
    from med2e3.data.synth import benchmark_examples
    from med2e3.demo import blind_prior, closed_questions

    folder = out / f"seed-{seed}"
    summary = folder / "summary.json"
    if not summary.is_file():
        start = time.time()
        subprocess.run(
            [sys.executable, "-m", "med2e3.cli", "demo", "--out", str(folder), "--seed", str(seed)],
            check=True,
        )
        print(f"seed {seed}: {time.time() - start:.0f} s", file=sys.stderr)
    result = json.loads(summary.read_text())
    data = folder / "data"
    questions = closed_questions(data, result["closed_vqa_accuracy"]["n"])
    train = benchmark_examples(data, "vqa", "train", form="closed")
    result["closed_vqa_accuracy"]["blind_prior"] = blind_prior(train, questions)
    return result


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    shown = " / ".join(f"{v * scale:.{digits}f}" for v in values)
    if len(values) < 2:
        return shown
    return f"{shown} (mean {mean(values) * scale:.{digits}f} ± {stdev(values) * scale:.{digits}f})"


def table(summaries: dict[int, dict[str, Any]]) -> str:
    """Markdown rows, one value per seed then mean ± sample std."""
    runs = list(summaries.values())
    acc = [s["closed_vqa_accuracy"] for s in runs]
    rel = [s["image_reliance"] for s in runs]
    starts = [s.get("start") for s in runs]
    first = all(starts)  # the demo fine-tuned a starting point: its numbers come first
    seeds = ", ".join(map(str, summaries))
    lines = [
        f"| held-out closed VQA, % (seeds {seeds}) | "
        + ("starting point, own volume | " if first else "")
        + "own volume | swapped volume | blind prior | option text, own volume |",
        "|---|---|---|---|---|" + ("---|" if first else ""),
    ]
    for kind in TYPES:
        own = [type_accuracy(a, kind) for a in acc]
        swapped = [r["accuracy_swapped"][kind] for r in rel]
        blind = [a["blind_prior"][kind] for a in acc]
        text = _cell([a["text_accuracy"][kind] for a in acc]) if kind != "overall" else ""
        before = (
            f"{_cell([type_accuracy(s['closed_vqa_accuracy'], kind) for s in starts])} | " if first else ""
        )
        lines.append(
            f"| letter accuracy: {kind} | {before}{_cell(own)} | {_cell(swapped)} | {_cell(blind)} | {text} |"
        )
    before = f"{_cell([s['image_reliance']['loss'] for s in starts], 1, 3)} | " if first else ""
    lines.append(
        f"| mean answer loss per token | {before}{_cell([r['loss'] for r in rel], 1, 3)} | "
        f"{_cell([r['loss_swapped'] for r in rel], 1, 3)} | | |"
    )
    tgis = [a["tgis"] for a in acc]
    lines += [
        "",
        "| TG-IS (held-out volumes) | per seed |",
        "|---|---|",
        "| question dependence (median over volumes of the largest score difference between questions) | "
        + " / ".join(f"{t['question_dependence']:.1e}" for t in tgis)
        + " |",
    ]
    for kind in ("Phase", "Organ", "Abnormality", "Location", "overall"):
        lines.append(
            f"| mass on the relevant slices, {kind} (uniform weights) | "
            + " / ".join(
                f"{t['relevant_mass'][kind] * 100:.1f} ({t['uniform_mass'][kind] * 100:.1f})" for t in tgis
            )
            + " |"
        )
    lines.append(f"| demo wall time, s (as run) | {' / '.join(str(s['wall_seconds']) for s in runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds lists a seed more than once")
    summaries = {seed: run_seed(args.out, seed) for seed in args.seeds}
    print(table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
