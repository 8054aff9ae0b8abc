"""Paper-scale benchmarks on one CUDA GPU, in one run with a time limit.

The paper preset (Phi-3-mini 3.8B, SigLIP-large, ViT3D, BERT-base) with random weights is built directly on
the GPU in bf16 with SDPA attention; every inference and training section then runs in order of
importance, each only if enough of ``--time-limit`` is left (a skipped section prints a record saying so).
A hard limit (``--time-limit`` + ``--grace``) ends the process; records already printed stay valid.
Output: JSON lines on stdout and in ``$OUT/gpu_paper.jsonl`` when ``OUT`` is set.

Run on the GPU machine, from the repository root::

    timeout 540 python -m benchmarks.gpu_paper --time-limit 420

The same logic on CPU with the tiny preset (a dry run that checks the script, not a measurement)::

    python -m benchmarks.gpu_paper --device cpu --preset tiny --quick
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from benchmarks import inference, training
from benchmarks.common import Bench, Budget, add_common_args, command, machine_info, make_bench, run_sections

# (section, seconds that must be left to start it), the targets first; estimates for an H100.
PLAN: tuple[tuple[str, float], ...] = (
    ("equivalence", 20),
    ("ttft", 30),
    ("decode_batch1", 90),
    ("encoders", 20),
    ("prefill", 20),
    ("decode", 30),
    ("finetune", 50),
    ("pretrain", 40),
    ("decode_compile", 150),
    ("questions", 70),
    ("batch", 45),
    ("depth", 45),
    ("batch_mode", 60),
    ("preprocess", 25),
    ("compiled", 150),
)
SECTIONS: dict[str, Callable[[Bench], None]] = {
    **inference.SECTIONS,
    **inference.EXTRA_SECTIONS,
    **training.SECTIONS,
}


def arm_hard_limit(bench: Bench, seconds: float) -> None:
    """After ``seconds``, print a record and end the process at once (a hung compile cannot block it)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        bench.emit("hard_time_limit", seconds=seconds)
        sys.stdout.flush()
        os._exit(124)

    signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))


def main(argv: list[str] | None = None) -> None:
    start = time.monotonic()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.set_defaults(preset="paper")
    parser.add_argument("--time-limit", type=float, default=420.0, help="soft limit in seconds (default 420)")
    parser.add_argument("--grace", type=float, default=45.0, help="hard limit = time limit + grace")
    args = parser.parse_args(argv)
    names = [name for name, _ in PLAN]
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in wanted]
    budget = Budget(args.time_limit - (time.monotonic() - start))
    bench = make_bench(args, "gpu_paper")
    arm_hard_limit(bench, budget.remaining() + args.grace)
    bench.settings.compile = False  # the compiled decode runs late, as its own section
    bench.emit(
        "machine",
        **machine_info(bench.device, bench.hardware, command("benchmarks.gpu_paper", argv)),
        build_s=round(time.monotonic() - start, 1),
        parameters=sum(p.numel() for p in bench.model.parameters()),
    )
    try:
        run_sections(bench, SECTIONS, names, budget, dict(PLAN), keep_going=True)
    finally:
        signal.alarm(0)
    bench.emit("done", seconds=round(time.monotonic() - start, 1))


if __name__ == "__main__":
    main()
