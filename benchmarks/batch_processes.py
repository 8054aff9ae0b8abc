"""Batch mode across processes: rows per second of ``med2e3 batch`` under torchrun with 1, 2, ... processes.

Every measurement is a fresh ``python -m torch.distributed.run --nproc-per-node N`` of ``med2e3 batch``
into an empty output (CPU, gloo; ``OMP_NUM_THREADS=1`` in each process, so N processes use N cores). The
command runs through a small wrapper that times `Med2E3Predictor.run_batch` once every process has
reached it (so it counts reading the output, answering, waiting for the slowest process and merging,
not imports and model loading):

* ``rows_per_s``: rows / the whole command's wall time (what a user waits for, start-up included);
* ``answer_rows_per_s``: rows / the time in ``run_batch`` (the rate that grows with the processes);
* ``startup``: the rest (start-up, imports, model load, exit), paid by each process.

Process counts alternate (1, 2, 1, 2, ...) so that a change in the machine's load hits them alike; each
record also has the children's CPU time (user + system). Without ``--model`` a random-weight model of
the demo's preset (``tiny``) is written to a temporary folder. Run from the repository root::

    python -m benchmarks.batch_processes --processes 1,2 --volumes 16 --questions 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.cold_start import DEMO_SHAPE, Run, child, timings, write_demo_model
from benchmarks.common import QUESTIONS, Sink, command, detect_hardware, machine_info, summarize, synthetic_ct

# `med2e3 batch` with `run_batch` timed from the moment every process has reached it (one JSON line).
TIMED_BATCH = """
import json, sys, time
from med2e3.cli import main
from med2e3.inference import Med2E3Predictor

run_batch = Med2E3Predictor.run_batch

def timed(self, *args, processes, **kwargs):
    processes.wait_for_everyone()
    start = time.perf_counter()
    result = run_batch(self, *args, processes=processes, **kwargs)
    if processes.is_main_process:
        print(json.dumps({"run_batch_s": time.perf_counter() - start}), flush=True)
    return result

Med2E3Predictor.run_batch = timed
sys.exit(main(sys.argv[1:]))
"""


def write_rows(folder: Path, volumes: int, questions: int) -> Path:
    """``volumes`` synthetic CTs of the demo's shape (.npy, HU) with ``questions`` questions each, as JSONL."""
    folder.mkdir(parents=True)
    lines = []
    for v in range(volumes):
        np.save(folder / f"volume{v}.npy", synthetic_ct(DEMO_SHAPE, seed=v).array)
        lines += [
            {"id": f"{v}-{i}", "volume": f"volume{v}.npy", "question": QUESTIONS[i]} for i in range(questions)
        ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def batch(processes: int, script: Path, rows: Path, model: Path, out: Path, new_tokens: int) -> Run:
    """One ``med2e3 batch`` (through ``script``) in ``processes`` processes started by torchrun, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port", port]
    cli = ["batch", str(rows), "--model", str(model), "--out", str(out), "--device", "cpu"]
    return child([*launcher, str(script), *cli, "--max-new-tokens", str(new_tokens)])


def run_batch_seconds(run: Run) -> float:
    return next(json.loads(x)["run_batch_s"] for x in run.stdout.splitlines() if x.startswith("{"))


def answers(out: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}


def run(args: argparse.Namespace, model: Path, rows: Path, folder: Path, sink: Sink) -> None:
    counts = [int(n) for n in args.processes.split(",")]
    n_rows = args.volumes * args.questions
    script = folder / "timed_batch.py"
    script.write_text(TIMED_BATCH)
    runs: dict[int, list[Run]] = {n: [] for n in counts}
    outputs: dict[int, dict[str, str]] = {}
    batch(counts[0], script, rows, model, folder / "warm.jsonl", args.new_tokens)  # warms the file cache
    for _ in range(args.repeats):
        for n in counts:
            out = folder / f"answers-{n}.jsonl"
            out.unlink(missing_ok=True)
            runs[n].append(batch(n, script, rows, model, out, args.new_tokens))
            outputs[n] = answers(out)
    first: dict[str, float] = {}
    for n in counts:
        walls = [r.wall for r in runs[n]]
        answering = [run_batch_seconds(r) for r in runs[n]]
        rates = {
            "rows_per_s": round(n_rows / statistics.median(walls), 3),
            "answer_rows_per_s": round(n_rows / statistics.median(answering), 3),
        }
        first = first or rates
        sink.emit(
            "batch_processes",
            processes=n,
            rows=n_rows,
            command=timings(runs[n]),
            run_batch=summarize(answering),
            startup=summarize([w - a for w, a in zip(walls, answering, strict=True)]),
            **rates,
            speedup={k: round(v / first[k], 3) for k, v in rates.items()},
            rows_once=len(outputs[n]) == n_rows,
            same_answers_as_first=outputs[n] == outputs[counts[0]],
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a random tiny-preset one)")
    parser.add_argument("--processes", default="1,2", help="process counts, e.g. 1,2 (default)")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--questions", type=int, default=4, help=f"per volume, at most {len(QUESTIONS)}")
    parser.add_argument("--new-tokens", type=int, default=32, help="answer length (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    context: dict[str, Any] = {
        "model": str(args.model or "random tiny preset"),
        "new_tokens": args.new_tokens,
    }
    sink = Sink("batch_processes", context)
    info = machine_info(device, detect_hardware(device), command("benchmarks.batch_processes", argv))
    sink.emit("machine", **info, omp_num_threads_per_process=1)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by torchrun and its processes
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_demo_model(Path(tmp) / "model")
        rows = write_rows(Path(tmp) / "rows", args.volumes, args.questions)
        run(args, model, rows, Path(tmp), sink)


if __name__ == "__main__":
    main()
