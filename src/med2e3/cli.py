"""The ``med2e3`` command: thin subcommands over the library's functions.

Errors the user can fix (bad file, bad config, bad input) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from med2e3.errors import Med2E3Error

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _train(args: argparse.Namespace) -> int:
    from med2e3.training import load_config, train

    out = train(load_config(args.config, args.overrides))
    print(f"model written to {out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from med2e3.data.synth import generate_benchmark

    summary = generate_benchmark(args.out, n_volumes=args.n, seed=args.seed, workers=args.workers)
    print(f"synthetic benchmark written to {args.out}: {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="med2e3", description="Med-2E3: ask a 3D medical volume a question."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train one stage from a YAML config",
        description="Train one stage (pretrain / finetune) from a YAML config, resuming from the last "
        "complete checkpoint in its output_dir.",
        epilog="example: med2e3 train configs/tiny-pretrain.yaml epochs=1 model.slice_aggregation=mean\n"
        "multi-process: torchrun --nproc_per_node 2 -m med2e3.training configs/tiny-pretrain.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="a YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config values, e.g. lr=1e-4")
    p.set_defaults(handler=_train)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except Med2E3Error as err:
        print(f"med2e3: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("med2e3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
