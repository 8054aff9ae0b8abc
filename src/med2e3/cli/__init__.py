"""The ``med2e3`` command: thin subcommands over the library's functions.

Errors the user can fix (bad file, bad config, bad input) print one line and exit with status 2.
The subcommands of a group with many options have a module of their own: ``eval`` and ``ablation`` in
`med2e3.cli.evaluation`, ``serve`` in `med2e3.server.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

from med2e3.cli.evaluation import register_ablation, register_eval
from med2e3.errors import ConfigError, Interrupted, Med2E3Error
from med2e3.server import register as register_server

EXIT_USAGE = 2
EXIT_ROWS_FAILED = 1  # batch: the run finished, but some rows have an error instead of an answer
BATCH_WAIT = timedelta(hours=24)  # batch: how long a process that has answered its share waits for the others

Handler = Callable[[argparse.Namespace], int]


def _train(args: argparse.Namespace) -> int:
    from med2e3.training import load_config, preflight

    config = load_config(args.config, args.overrides)
    if preflight(config, args.overwrite):  # before torch and the model are imported
        print(f"{config.output_dir} already holds this run, finished (--overwrite trains it again)")
        return 0
    from med2e3.training import train

    out = train(config, overwrite=args.overwrite)
    print(f"model written to {out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from med2e3.data.synth import generate_benchmark

    summary = generate_benchmark(args.out, n_volumes=args.n, seed=args.seed, workers=args.workers)
    print(f"synthetic benchmark written to {args.out}: {summary}")
    return 0


def _predictor(args: argparse.Namespace, device: str | None = None):
    from med2e3.inference import Med2E3Predictor

    return Med2E3Predictor.from_pretrained(
        args.model,
        device=device or args.device,
        window=args.window,
        orientation=args.orientation,
        compile=args.compile,
        max_volume_bytes=None if args.max_volume_mb is None else int(args.max_volume_mb * 2**20),
        bad_slices="skip" if args.skip_bad_slices else "raise",
    )


def _print_answer(answer, args: argparse.Namespace) -> None:
    import json

    if args.json:
        print(json.dumps({"volume": args.volume, **answer.to_dict()}, indent=2))
        return
    print(answer.answer)
    for note in answer.notes:
        print(f"med2e3: note: {note}", file=sys.stderr)
    if answer.slice_scores is not None:
        top = ", ".join(f"{j} ({answer.slice_scores[j]:.3f})" for j in answer.top_slices(4))
        print(f"[TG-IS top slices: {top}]", file=sys.stderr)


def _ask(args: argparse.Namespace) -> int:
    predictor = _predictor(args)
    loaded = predictor.load(args.volume)
    if args.command == "report":
        answer = predictor.report(max_new_tokens=args.max_new_tokens)
    else:
        answer = predictor.ask(args.question, max_new_tokens=args.max_new_tokens)
    _print_answer(answer, args)
    if args.plot and answer.slice_scores is not None:
        from med2e3.viz import plot_slice_scores

        path = plot_slice_scores(
            loaded.pixel_values[0],
            answer.slice_scores,
            args.plot,
            answer.question,
            answer.answer,
            answer.slice_ranges,
        )
        print(f"TG-IS figure written to {path}", file=sys.stderr)
    return 0


def _batch_processes(device: str | None):
    """The processes sharing this batch: one per GPU (or CPU share) under torchrun / accelerate launch.

    Alone, a state of one process. The process count is checked against the launcher's ``WORLD_SIZE``:
    a process that thought itself alone would answer every row, as would all the others.
    """
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()  # else Accelerate on CPU sees one process
    processes = PartialState(cpu=cpu, timeout=BATCH_WAIT)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if processes.num_processes != launched:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but Accelerate sees {processes.num_processes}"
        )
    return processes


def _batch(args: argparse.Namespace) -> int:
    from med2e3.inference import read_batch_input

    processes = _batch_processes(args.device)
    device = str(processes.device) if args.device in (None, "cuda") else args.device
    rows = read_batch_input(args.input)
    result = _predictor(args, device).run_batch(
        rows, args.out, max_new_tokens=args.max_new_tokens, processes=processes
    )
    if not processes.is_main_process:
        return EXIT_ROWS_FAILED if result.failed else 0
    print(
        f"{result.answered} answers written to {args.out} ({result.already_done} were already there); "
        f"{result.failed} of {len(rows)} rows failed"
    )
    if result.failed:
        print(
            f"med2e3: {result.failed} rows failed; each has its 'error' in {args.out} and is tried again on a rerun",
            file=sys.stderr,
        )
        return EXIT_ROWS_FAILED
    return 0


def _convert_release(args: argparse.Namespace) -> int:
    from med2e3.release import convert_release

    out = convert_release(
        args.src, args.dst, tokenizer=args.tokenizer, question_tokenizer=args.question_tokenizer
    )
    print(f"converted model written to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from med2e3.demo import default_budget, run_demo
    from med2e3.folders import BUNDLED_TINY_MODEL

    start = None if args.from_scratch else BUNDLED_TINY_MODEL
    run_demo(
        args.out, seed=args.seed, budget=replace(default_budget(start), volumes=args.volumes), start=start
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a med2e3 model folder (e.g. runs/demo/finetune), or bundled:tiny_model (the demo's "
        "starting point, trained on synthetic CTs only)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--window",
        help="CT window: abdomen, lung, bone, brain, minmax (default: the one the model was trained with)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--max-volume-mb",
        type=float,
        help="refuse a volume whose voxels need more memory than this, checked from a NIfTI or .npy "
        "header before reading (default 1024)",
    )
    p.add_argument(
        "--skip-bad-slices",
        action="store_true",
        help="skip unreadable files of a DICOM series with a warning naming them (default: an error)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: encoders and TG-IS replayed from CUDA graphs (recorded at load), static KV cache + "
        "compiled decoding (compiles once per number of questions per call, 25-70 s at paper size, then "
        "~7x faster per token); for long batch jobs, not for one question",
    )
    p.add_argument(
        "--orientation",
        choices=["axial", "acquisition"],
        help="axial: reorient to axial slices; acquisition: keep the scan's own slice axis "
        "(default: the one the model was trained with)",
    )


def _subcommand(sub, name: str, help: str, example: str, handler: Handler) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=f"example: {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="med2e3", description="Med-2E3: ask a 3D medical volume a question."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one stage from a YAML config",
        description="Train one stage (pretrain / finetune) from a YAML config, resuming from the last "
        "complete checkpoint in its output_dir when the settings are the same.",
        epilog="example: med2e3 train configs/tiny-pretrain.yaml epochs=1 model.slice_aggregation=mean\n"
        "multi-process: torchrun --nproc_per_node 2 -m med2e3.training configs/tiny-pretrain.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. lr=1e-4")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a run already in output_dir (checkpoints, loss log) and train from scratch; without it "
        "a rerun resumes only with the same settings",
    )
    p.set_defaults(handler=_train)

    p = _subcommand(
        sub,
        "ask",
        "answer a question about a volume (NIfTI, DICOM folder or .npy)",
        'med2e3 ask scan.nii.gz "Which organ has a lesion?" --model runs/demo/finetune --plot slices.png',
        _ask,
    )
    p.add_argument("volume", help="a .nii/.nii.gz file, a DICOM series folder or a .npy")
    p.add_argument("question")
    _add_model_args(p)
    p.add_argument("--plot", metavar="PNG", help="write the TG-IS slice-score figure here")
    p.add_argument("--json", action="store_true", help="print the answer and slice scores as JSON")

    p = _subcommand(
        sub,
        "report",
        "write a findings report for a volume",
        "med2e3 report scan.nii.gz --model runs/demo/finetune",
        _ask,
    )
    p.add_argument("volume")
    _add_model_args(p)
    p.set_defaults(max_new_tokens=256)
    p.add_argument("--plot", metavar="PNG", help="write the TG-IS slice-score figure here")
    p.add_argument("--json", action="store_true")

    p = _subcommand(
        sub,
        "batch",
        "answer a CSV/JSONL of (volume, question) rows into a JSONL, resumably",
        "med2e3 batch questions.csv --model runs/demo/finetune --out answers.jsonl\n"
        "A row whose volume or question cannot be used gets a line with its 'error' and the run goes on;\n"
        "the exit status is then 1. Rows without an id are matched by volume and question on a rerun.\n"
        "On N GPUs (process RANK on cuda:LOCAL_RANK) or CPU processes, each answering whole volumes into\n"
        "OUT.part-RANK-of-N, merged into OUT at the end; a rerun with any number of processes resumes:\n"
        "  torchrun --nproc-per-node N -m med2e3.cli batch questions.csv --model MODEL --out answers.jsonl\n"
        "  accelerate launch --multi-gpu --num-processes N -m med2e3.cli batch questions.csv --model MODEL --out answers.jsonl",
        _batch,
    )
    p.add_argument("input", help="CSV or JSONL with volume, question[, id, prompt]; paths relative to it")
    p.add_argument("--out", required=True, help="output JSONL (appended; rows already there are skipped)")
    _add_model_args(p)

    p = _subcommand(
        sub,
        "convert-release",
        "convert the authors' released checkpoint folder to a med2e3 model folder",
        "med2e3 convert-release Med-2E3-M3D checkpoints/med2e3-m3d",
        _convert_release,
    )
    p.add_argument("src", help="the release folder (args/, llm/, vision2d_model/, ...)")
    p.add_argument("dst", help="output folder (safetensors + tokenizers)")
    p.add_argument("--tokenizer", help="a local Phi-3 tokenizer folder, if the release has none")
    p.add_argument("--question-tokenizer", help="a local bert-base-uncased tokenizer folder (M3D-CLIP's)")

    p = _subcommand(
        sub,
        "demo",
        "generate synthetic CTs, measure the shipped tiny model, fine-tune it on them, measure it again and "
        "ask it questions",
        "med2e3 demo --out runs/demo",
        _demo,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo); reruns resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--volumes", type=int, default=400, help="synthetic volumes to generate (default 400)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the tiny model from the shipped stage-0 LLM (both stages, ~10 min on 2 cores) instead of "
        "fine-tuning the shipped model",
    )

    register_server(sub)
    register_eval(sub)
    register_ablation(sub)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser(
        "synth",
        help="generate the synthetic CT benchmark",
        description="Generate labelled synthetic CT volumes (NIfTI) with M3D-Cap / M3D-VQA style files.",
        epilog="example: med2e3 data synth data/synth --n 2000 --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=2000, help="number of volumes (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.set_defaults(handler=_synth)
    return parser


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show med2e3's own warnings as ``med2e3: warning: MESSAGE`` lines on stderr (no source line)."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if category.__module__.startswith("med2e3."):
            print(f"med2e3: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        with _one_line_warnings():
            return handler(args)
    except Interrupted as err:
        print(f"med2e3: {err}", file=sys.stderr)
        return 128 + err.signum
    except Med2E3Error as err:
        print(f"med2e3: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("med2e3: interrupted", file=sys.stderr)
        return 130
