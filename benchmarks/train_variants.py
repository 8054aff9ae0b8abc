"""Training throughput and peak memory of each slice-aggregation variant (tgis, mean, none), tiny preset.

Each (variant, stage) runs in its own process so that the peak resident memory (ru_maxrss) belongs to it
alone. Prints one JSON object per measurement: samples/s (median over timed steps, with min and max) and
peak RSS in MiB.

    python -m benchmarks.train_variants [--steps 20] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("tgis", "mean", "none")
STAGES = ("pretrain", "finetune")


def measure(variant: str, stage: str, steps: int, batch: int, threads: int) -> dict:
    """Train ``steps`` steps of one variant and stage on random volumes and report-length answers."""
    import torch

    from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny", slice_aggregation=variant)
    model = Med2E3ForConditionalGeneration(config)
    processor = Med2E3Processor.for_config(config)
    model.set_training_stage(stage)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    answer = "The liver shows a small hypodense cyst in the right lobe; the kidneys are normal. " * 2
    inputs = processor(
        ["Please write a radiology report for this CT scan."] * batch,
        answers=[answer] * batch,
        volumes=torch.rand(batch, 1, *config.vision3d_config.image_size),
    )
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    rates = sorted(batch / t for t in times)
    return {
        "measurement": "train_throughput",
        "variant": variant,
        "stage": stage,
        "batch": batch,
        "seq_len": int(inputs["input_ids"].shape[1]),
        "threads": threads,
        "samples_per_s": round(statistics.median(rates), 2),
        "min": round(rates[0], 2),
        "max": round(rates[-1], 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.batch, args.threads)), flush=True)
        return
    for variant in VARIANTS:
        for stage in STAGES:
            cmd = [sys.executable, "-m", "benchmarks.train_variants", "--one", variant, stage]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
