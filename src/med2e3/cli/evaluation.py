"""``med2e3 eval`` and ``med2e3 ablation``: arguments and handlers over `med2e3.evaluation.runner` and
`med2e3.evaluation.ablation` (``python -m med2e3.evaluation.ablation`` runs ``med2e3 ablation``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from med2e3.data.datasets import DATASET_FORMATS, ORIENTATIONS
from med2e3.errors import ConfigError, DatasetError
from med2e3.evaluation import ablation, reliance, runner

# ---------------------------------------------------------------------------------------- eval


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 (the first N examples), got {limit}")


def _eval_command(args: argparse.Namespace) -> int:
    _check_limit(args.limit)
    if args.image_reliance and not args.model:
        raise DatasetError(None, "--image-reliance needs --model (the questions are answered again)")
    predictor = None
    if args.model:
        from med2e3.inference import Med2E3Predictor

        predictor = Med2E3Predictor.from_pretrained(
            args.model, device=args.device, window=args.window, orientation=args.orientation
        )
    dataset = runner.load_dataset(
        args.dataset,
        format=args.format,
        volume_dir=args.volume_dir,
        split=args.split,
        form=args.form,
        orientation=args.orientation or (predictor.orientation if predictor else "axial"),
        data_root=args.data_root,
    )
    examples = dataset[: args.limit]
    if predictor is not None:
        tokens = args.max_new_tokens if args.max_new_tokens is not None else None
        n = runner.predict_examples(predictor, examples, args.predictions, max_new_tokens=tokens)
        print(f"{n} answers written to {args.predictions} ({len(examples) - n} were already there)")
    report = runner.evaluate(
        args.predictions,
        examples,
        nltk_data=args.nltk_data,
        bertscore_model=args.bertscore_model,
        left_out={ex.id for ex in dataset[len(examples) :]},
    )
    if args.image_reliance:
        vqa = [ex for ex in examples if ex.task in ("vqa_closed", "vqa_open")]
        report.image_reliance = reliance.image_reliance(predictor, vqa)
    report.write(args.out, args.markdown)
    print(report.to_markdown())
    for path in (args.out, args.markdown):
        if path:
            print(f"written to {path}")
    return 0


def register_eval(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``med2e3 eval`` to the CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "eval",
        help="score predictions (a batch JSONL) against a dataset, optionally predicting them first",
        description="Score predictions against a dataset, matched by id: closed-VQA accuracy per question "
        "type, open-VQA and report BLEU-1/ROUGE-1/METEOR (BERTScore with a local model), and TG-IS "
        "attention on the relevant slices. With --model the predictions are produced first (resumable).",
        epilog="example: med2e3 eval preds.jsonl --dataset data/synth/M3D_VQA_test.csv --form closed "
        "--model runs/demo/finetune --image-reliance --out report.json --markdown report.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("predictions", help="JSONL of answers (from med2e3 batch / --model); rows matched by id")
    p.add_argument(
        "--dataset", required=True, help="M3D-VQA CSV, M3D-Cap JSON (with --split) or conversation JSONL"
    )
    p.add_argument(
        "--format",
        choices=list(DATASET_FORMATS),
        help="dataset format (default: by file name: .csv m3d_vqa, .json m3d_cap, .jsonl conversations)",
    )
    p.add_argument("--volume-dir", help="ct_rate: the folder of the CT-RATE NIfTI volumes")
    p.add_argument("--split", default="test", help="M3D-Cap split (default test)")
    p.add_argument("--form", choices=("closed", "open", "both"), default="both", help="M3D-VQA form")
    p.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        help="how volumes are read (default: as the --model was trained, else axial)",
    )
    p.add_argument("--data-root", help="folder the dataset's volume paths are relative to")
    p.add_argument("--limit", type=int, help="first N examples only")
    p.add_argument("--out", help="write the report JSON (every per-sample score) here")
    p.add_argument("--markdown", help="write the Markdown tables here")
    p.add_argument("--nltk-data", help="offline NLTK data folder for METEOR")
    p.add_argument("--bertscore-model", help="a local model folder for BERTScore (e.g. roberta-large)")
    g = p.add_argument_group("predicting first")
    g.add_argument("--model", help="a med2e3 model folder: answer the dataset into PREDICTIONS first")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument(
        "--window", help="CT window: abdomen, lung, bone, brain, minmax (default: the model's own)"
    )
    g.add_argument(
        "--image-reliance",
        action="store_true",
        help="also answer the VQA questions with another volume of the dataset (a fixed derangement) and "
        "report accuracy and answer loss both ways: a model that reads the scan loses when it is swapped",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="one budget for all tasks (default: 8 closed, 32 open, 128 reports)",
    )
    p.set_defaults(handler=_eval_command)
    return p


# ---------------------------------------------------------------------------------------- ablation


def _starts(entries: list[str]) -> dict[str, str]:
    """``--start VARIANT=FOLDER`` entries as {variant: folder}; ConfigError for a malformed or repeated one."""
    starts: dict[str, str] = {}
    for entry in entries:
        variant, sep, folder = entry.partition("=")
        if not sep or not folder or variant not in ablation.VARIANTS:
            raise ConfigError(
                f"--start {entry!r}: expected VARIANT=FOLDER with VARIANT one of {', '.join(ablation.VARIANTS)}"
            )
        if variant in starts:
            raise ConfigError(f"--start gives {variant} more than once")
        starts[variant] = folder
    return starts


def _ablation_settings(args: argparse.Namespace) -> ablation.AblationSettings:
    return ablation.AblationSettings(
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
        starts=_starts(args.start),
    )


def _ablation_command(args: argparse.Namespace) -> int:
    path = ablation.run_ablation(args.out, _ablation_settings(args), args.results, overwrite=args.overwrite)
    print(f"results written to {path}")
    return 0


def register_ablation(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``med2e3 ablation`` to the CLI's subparsers; returns its parser."""
    p = subparsers.add_parser(
        "ablation",
        help="train and evaluate the none / mean / tgis slice aggregations on the synthetic benchmark",
        description="Train (stage 1 + stage 2, tiny preset, identical budgets; stage 2 only from --start "
        "models) and evaluate the three "
        "slice_aggregation variants over several seeds on the synthetic benchmark; write the mean ± std "
        "table. Resumable: finished stages, predictions and evaluations are reused.",
        epilog="example: med2e3 ablation runs/ablation --volumes 400 --seeds 0 1 2 --results docs/results.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = ablation.AblationSettings()
    p.add_argument("out", help="working folder: benchmark, runs, predictions (reused on rerun)")
    p.add_argument("--volumes", type=int, default=d.volumes, help=f"benchmark volumes (default {d.volumes})")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="benchmark seed (default 0)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(d.seeds), help="training seeds (default 0 1 2)"
    )
    p.add_argument("--variants", nargs="+", choices=ablation.VARIANTS, default=list(ablation.VARIANTS))
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
        help="extra config override, for every stage trained",
    )
    p.add_argument(
        "--start",
        action="append",
        default=[],
        metavar="VARIANT=FOLDER",
        help="a trained model of VARIANT to fine-tune in stage 2 instead of a stage 1 from scratch; one per "
        "variant run (e.g. WORK/round8 of: bash scripts/train_tiny_model.sh WORK VARIANT); a later run of the "
        "folder may add variants with theirs",
    )
    p.add_argument("--results", help="Markdown file to fill (default OUT/results.md), e.g. docs/results.md")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the runs already in OUT and train again (without it a rerun reuses them only when "
        "made with the same settings)",
    )
    p.set_defaults(handler=_ablation_command)
    return p
