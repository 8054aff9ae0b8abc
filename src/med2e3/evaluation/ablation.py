"""The slice-aggregation ablation: does TG-IS beat uniform slice weights and a 3D-only model?

On the synthetic benchmark (``med2e3.data.synth``), each variant of ``slice_aggregation`` (``none``,
``mean``, ``tgis``) is trained with the same tiny recipe (stage 1 then stage 2, identical steps, batch
and seeds) and evaluated on the same test examples. The table (mean ± std over seeds) goes into a
Markdown file between ``<!-- ablation:begin -->`` and ``<!-- ablation:end -->`` (the rest of the file is
kept). Every step is skipped when its output exists, so an interrupted run resumes.

Run: ``python -m med2e3.evaluation.ablation runs/ablation --volumes 400 --seeds 0 1 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from med2e3.data.datasets import QUESTION_TYPES, Example
from med2e3.errors import ConfigError
from med2e3.evaluation.runner import evaluate, load_dataset, predict_examples, write_atomic

VARIANTS: tuple[str, ...] = ("none", "mean", "tgis")
CONFIGS = Path(__file__).resolve().parents[3] / "configs"
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
TEXT_METRICS: tuple[str, ...] = ("bleu1", "rouge1", "meteor")


@dataclass
class AblationSettings:
    """One budget for every run: benchmark size, steps, batch, evaluation subset and token limits."""

    volumes: int = 400
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    pretrain_steps: int = 150
    finetune_steps: int = 700
    batch_size: int = 8
    closed_eval: int = 200
    open_eval: int = 100
    report_eval: int = 20
    closed_tokens: int = 8
    open_tokens: int = 24
    report_tokens: int = 64
    threads: int = 1  # torch threads; more than one per process thrashes on a shared 2-core machine
    jobs: int = 1  # (variant, seed) runs trained at once, each in its own process with `threads` threads
    configs_dir: Path = CONFIGS
    overrides: tuple[str, ...] = field(default_factory=tuple)  # extra key=value for both stages

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["configs_dir"] = (
            os.path.relpath(self.configs_dir)
            if self.configs_dir.is_relative_to(Path.cwd())
            else str(self.configs_dir)
        )
        return d


# ---------------------------------------------------------------------------------------- steps


def prepare_benchmark(out: Path, settings: AblationSettings) -> Path:
    """Generate (or reuse) the synthetic benchmark under ``out/synth``."""
    from med2e3.data.synth import generate_benchmark

    root = out / "synth"
    generate_benchmark(root, settings.volumes, seed=settings.data_seed, workers=2, progress=False)
    return root


def _sources(entries: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(entries))  # JSON is YAML: safe for paths with spaces


def stage_overrides(
    stage: str, run: Path, data: Path, variant: str, seed: int, settings: AblationSettings
) -> list[str]:
    """Config overrides of one training stage of one run (identical for every variant but the name)."""
    cap = {
        "format": "m3d_cap",
        "path": str(data / "M3D_Cap.json"),
        "split": "train",
        "orientation": "acquisition",
    }
    vqa = {
        "format": "m3d_vqa",
        "path": str(data / "M3D_VQA_train.csv"),
        "form": "both",
        "orientation": "acquisition",
    }
    steps = settings.pretrain_steps if stage == "pretrain" else settings.finetune_steps
    common = [
        f"output_dir={run / stage}",
        f"seed={seed}",
        f"max_steps={steps}",
        f"batch_size={settings.batch_size}",
        f"save_steps={max(steps // 2, 1)}",
        f"model.slice_aggregation={variant}",
        f"data.cache_dir={data / '.cache'}",
        "report_to=[csv]",
    ]
    if stage == "pretrain":
        return [*common, f"data.train={_sources([cap])}", *settings.overrides]
    return [
        *common,
        f"model.init_from={run / 'pretrain'}",
        f"data.train={_sources([cap, vqa])}",
        "data.eval=[]",
        "eval_steps=null",
        *settings.overrides,
    ]


def train_run(run: Path, data: Path, variant: str, seed: int, settings: AblationSettings) -> Path:
    """Stage 1 then stage 2 of one (variant, seed); a stage whose ``training_info.json`` exists is skipped."""
    from med2e3.training import load_config, train
    from med2e3.training.trainer import TRAINING_INFO

    for stage, config in (("pretrain", "tiny-pretrain.yaml"), ("finetune", "tiny-finetune.yaml")):
        if not (run / stage / TRAINING_INFO).is_file():
            overrides = stage_overrides(stage, run, data, variant, seed, settings)
            train(load_config(settings.configs_dir / config, overrides))
    return run / "finetune"


def eval_examples(data: Path, settings: AblationSettings) -> dict[str, list[Example]]:
    """The fixed test subsets: first N closed and open questions of the test CSV, first N test reports."""
    vqa = load_dataset(data / "M3D_VQA_test.csv", form="both", orientation="acquisition")
    reports = load_dataset(data / "M3D_Cap.json", split="test", orientation="acquisition")
    return {
        "closed": [e for e in vqa if e.task == "vqa_closed"][: settings.closed_eval],
        "open": [e for e in vqa if e.task == "vqa_open"][: settings.open_eval],
        "report": reports[: settings.report_eval],
    }


def evaluate_run(run: Path, subsets: dict[str, list[Example]], settings: AblationSettings) -> dict[str, Any]:
    """Predict (resumably) and score the test subsets with the run's final model; cached in ``eval.json``."""
    done = run / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    from med2e3.inference import Med2E3Predictor

    predictor = Med2E3Predictor.from_pretrained(run / "finetune", device="cpu")
    examples = [e for part in subsets.values() for e in part]
    tokens = {
        "vqa_closed": settings.closed_tokens,
        "vqa_open": settings.open_tokens,
        "caption": settings.report_tokens,
        "report": settings.report_tokens,
    }
    predict_examples(predictor, examples, run / "predictions.jsonl", max_new_tokens=tokens, progress=False)
    report = evaluate(run / "predictions.jsonl", examples)
    report.write(run / "eval_full.json", run / "eval.md")
    summary = {k: v for k, v in report.to_dict().items() if k != "samples"}
    write_atomic(done, json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------- table


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def _pick(summary: dict[str, Any], *keys: str) -> float | None:
    node: Any = summary
    for key in keys:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return float(node)


def table_rows() -> list[tuple[str, tuple[str, ...]]]:
    """(row label, path into an ``eval.json``) for every row of the results table."""
    rows = [(f"Closed VQA: {t}", ("closed_vqa", "per_type", t)) for t in QUESTION_TYPES]
    rows.append(("Closed VQA: overall", ("closed_vqa", "overall")))
    rows += [(f"Open VQA: {m}", ("open_vqa", "means", m)) for m in TEXT_METRICS]
    rows += [(f"Report: {m}", ("report_generation", "means", m)) for m in TEXT_METRICS]
    rows += [
        (f"Attention on relevant slices: {t}", ("attention", "mass", t)) for t in (*QUESTION_TYPES, "overall")
    ]
    return rows


def _uniform_note(summaries: dict[str, dict[int, dict[str, Any]]], qtype: str) -> str:
    """`` (uniform: x)``: the mass uniform weights put on the relevant slices (the same for every run)."""
    for runs in summaries.values():
        for summary in runs.values():
            value = _pick(summary, "attention", "uniform", qtype)
            if value is not None:
                return f" (uniform: {100 * value:.1f})"
    return ""


def results_table(summaries: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Markdown table, one column per variant: mean ± std over seeds, in percent."""
    variants = list(summaries)
    seeds = {v: sorted(summaries[v]) for v in variants}
    head = " | ".join(f"{v} (seeds {', '.join(map(str, seeds[v])) or '-'})" for v in variants)
    lines = [f"| metric (%, mean ± std over seeds) | {head} |", "|---" * (len(variants) + 1) + "|"]
    for label, path in table_rows():
        cells = []
        for v in variants:
            values = [x for s in seeds[v] if (x := _pick(summaries[v][s], *path)) is not None]
            cells.append(_mean_std(values))
        if path[:2] == ("attention", "mass"):
            label += _uniform_note(summaries, path[2])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(path: Path, table: str, settings: AblationSettings, seconds: float, complete: bool) -> Path:
    """Put the generated block between the markers of ``path`` (the rest of the file is kept)."""
    status = "complete" if complete else "INCOMPLETE (rerun the same command to finish)"
    block = (
        f"{BEGIN}\n"
        f"_Generated by `med2e3.evaluation.ablation` ({status}); this invocation took {seconds / 60:.1f} min "
        f"(runs finished earlier are reused, not counted). Settings: "
        f"`{json.dumps(settings.to_dict(), sort_keys=True)}`_\n\n"
        f"{table}{END}"
    )
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return write_atomic(path, text)


# ---------------------------------------------------------------------------------------- driver


def run_ablation(out: str | Path, settings: AblationSettings, results: str | Path | None = None) -> Path:
    """Train and evaluate every (variant, seed); write the table after each run; return the results file.

    With ``settings.jobs`` > 1 the runs go to that many worker processes (one core each at ``threads=1``);
    every run is the same as in a sequential invocation, only the order in which runs finish changes.
    """
    import torch

    if settings.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {settings.jobs}")
    torch.set_num_threads(settings.threads)
    start = time.monotonic()
    out = Path(out).resolve()
    data = prepare_benchmark(out, settings)
    subsets = eval_examples(data, settings)
    summaries: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in settings.variants}
    results_path = Path(results) if results else out / "results.md"
    pairs = [(variant, seed) for seed in settings.seeds for variant in settings.variants]

    def finished(variant: str, seed: int, summary: dict[str, Any], minutes: float) -> None:
        summaries[variant][seed] = summary
        _log(f"{variant}-seed{seed}: done in {minutes:.1f} min")
        write_results(results_path, results_table(summaries), settings, time.monotonic() - start, False)

    if settings.jobs == 1:
        for variant, seed in pairs:
            finished(variant, seed, *_run_one(out, data, variant, seed, settings, subsets))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork: workers inherit the loaded modules; each sets its own torch thread count
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(settings.jobs, mp_context=context) as pool:
            futures = {
                pool.submit(_run_one, out, data, variant, seed, settings, subsets): (variant, seed)
                for variant, seed in pairs
            }
            for future in as_completed(futures):
                finished(*futures[future], *future.result())
    write_results(results_path, results_table(summaries), settings, time.monotonic() - start, True)
    _log(f"ablation finished in {(time.monotonic() - start) / 60:.1f} min; table in {results_path}")
    return results_path


def _run_one(
    out: Path,
    data: Path,
    variant: str,
    seed: int,
    settings: AblationSettings,
    subsets: dict[str, list[Example]],
) -> tuple[dict[str, Any], float]:
    """Train (resumably) and evaluate one (variant, seed); return its summary and the minutes it took."""
    import torch

    torch.set_num_threads(settings.threads)
    t0 = time.monotonic()
    run = out / "runs" / f"{variant}-seed{seed}"
    train_run(run, data, variant, seed, settings)
    return evaluate_run(run, subsets, settings), (time.monotonic() - t0) / 60


def _log(message: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- CLI


def _settings(args: argparse.Namespace) -> AblationSettings:
    return AblationSettings(
        volumes=args.volumes,
        data_seed=args.data_seed,
        seeds=tuple(args.seeds),
        variants=tuple(args.variants),
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
        batch_size=args.batch_size,
        closed_eval=args.closed_eval,
        open_eval=args.open_eval,
        report_eval=args.report_eval,
        threads=args.threads,
        jobs=args.jobs,
        configs_dir=Path(args.configs),
        overrides=tuple(args.override),
    )


def _ablation_command(args: argparse.Namespace) -> int:
    path = run_ablation(args.out, _settings(args), args.results)
    print(f"results written to {path}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = AblationSettings()
    p.add_argument("out", help="working folder: benchmark, runs, predictions (reused on rerun)")
    p.add_argument("--volumes", type=int, default=d.volumes, help=f"benchmark volumes (default {d.volumes})")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="benchmark seed (default 0)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(d.seeds), help="training seeds (default 0 1 2)"
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--closed-eval", type=int, default=d.closed_eval, help="closed test questions scored")
    p.add_argument("--open-eval", type=int, default=d.open_eval, help="open test questions scored")
    p.add_argument("--report-eval", type=int, default=d.report_eval, help="test reports scored")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per run (default 1)")
    p.add_argument(
        "--jobs", type=int, default=d.jobs, help="runs trained at once, one process each (default 1)"
    )
    p.add_argument("--configs", default=str(d.configs_dir), help="folder with tiny-pretrain/finetune.yaml")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override, both stages",
    )
    p.add_argument("--results", help="Markdown file to fill (default OUT/results.md), e.g. docs/results.md")
    p.set_defaults(handler=_ablation_command)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``med2e3 ablation`` to the CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "ablation",
        help="train and evaluate the none / mean / tgis slice aggregations on the synthetic benchmark",
        description="Train (stage 1 + stage 2, tiny preset, identical budgets) and evaluate the three "
        "slice_aggregation variants over several seeds on the synthetic benchmark; write the mean ± std "
        "table. Resumable: finished stages, predictions and evaluations are reused.",
        epilog="example: med2e3 ablation runs/ablation --volumes 400 --seeds 0 1 2 --results docs/results.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m med2e3.evaluation.ablation", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return _ablation_command(args)


if __name__ == "__main__":
    sys.exit(main())
