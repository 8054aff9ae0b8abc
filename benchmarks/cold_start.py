"""Cold start: wall time of a fresh ``med2e3 ask`` process, and where it goes.

Every measurement starts a new Python process (nothing imported, nothing cached in the process; the
operating system's file cache stays warm after the first run, as it is for a user's second command):

* ``ask``: ``python -m med2e3.cli ask VOLUME QUESTION --model MODEL`` end to end (what a user waits for);
* ``phases``: the same steps inside one child, timed one by one (imports, model load, volume read and
  encode, answer);
* ``import``: ``import med2e3.inference`` alone, and ``import monai`` for reference (what asking no
  longer pays).

Each record has wall-clock milliseconds and, under ``cpu``, the child's CPU time (user + system): on a
machine shared with other jobs the wall clock includes waiting for a core, the CPU time much less so.

Without ``--model`` a random-weight model of the demo's preset (``tiny``) is written to a temporary
folder; without ``--volume`` a synthetic CT NIfTI of the demo's shape (32 x 96 x 96). Run from the
repository root::

    python -m benchmarks.cold_start --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from benchmarks.common import QUESTIONS, Sink, command, detect_hardware, machine_info, summarize, synthetic_ct
from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor

DEMO_SHAPE = (32, 96, 96)  # (D, H, W) of the demo's synthetic volumes

PHASES = """
import json, sys, time
t = [time.perf_counter()]
from med2e3.inference import Med2E3Predictor
t.append(time.perf_counter())
predictor = Med2E3Predictor.from_pretrained(sys.argv[1], device="cpu")
t.append(time.perf_counter())
predictor.load(sys.argv[2])
t.append(time.perf_counter())
predictor.ask(sys.argv[3], max_new_tokens=int(sys.argv[4]))
t.append(time.perf_counter())
names = ["import_s", "model_load_s", "volume_read_encode_s", "answer_s"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


@dataclass
class Run:
    """One child process: wall seconds, CPU seconds (user + system), stdout."""

    wall: float
    cpu: float
    stdout: str


def child(args: list[str]) -> Run:
    """Run ``args`` in a fresh Python process (one at a time, so the children's CPU time is this one's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Run(wall, cpu, done.stdout)


def timings(runs: list[Run]) -> dict[str, Any]:
    """Wall-clock stats, and CPU-time stats (on a busy machine, closer to what an idle one's wall clock shows)."""
    cpu = summarize([r.cpu for r in runs])
    return {**summarize([r.wall for r in runs]), "cpu": cpu}


def write_demo_model(folder: Path) -> Path:
    """A random-weight model of the demo's preset, saved as `med2e3 demo` saves its models."""
    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny")
    Med2E3ForConditionalGeneration(config).save_pretrained(folder)
    Med2E3Processor.for_config(config).save_pretrained(folder)
    return folder


def write_volume(path: Path) -> Path:
    """A synthetic CT of the demo's shape as NIfTI (voxel order i, j, k = W, H, D)."""
    volume = synthetic_ct(DEMO_SHAPE)
    affine = np.diag([*volume.spacing[::-1], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), affine), path)
    return path


def run(model: Path, volume: Path, repeats: int, new_tokens: int, sink: Sink) -> None:
    question = QUESTIONS[0]
    ask = ["-m", "med2e3.cli", "ask", str(volume), question, "--model", str(model)]
    ask += ["--device", "cpu", "--max-new-tokens", str(new_tokens)]
    child(ask)  # warms the file cache, as a user's earlier command would
    sink.emit("ask", **timings([child(ask) for _ in range(repeats)]))
    phase_args = ["-c", PHASES, str(model), str(volume), question, str(new_tokens)]
    phases = [json.loads(child(phase_args).stdout) for _ in range(repeats)]
    for name in phases[0]:
        sink.emit("phase", phase=name.removesuffix("_s"), **summarize([p[name] for p in phases]))
    for module in ("med2e3.inference", "monai"):
        sink.emit(
            "import", module=module, **timings([child(["-c", f"import {module}"]) for _ in range(repeats)])
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a random tiny-preset one)")
    parser.add_argument("--volume", type=Path, help="a volume file (default: a synthetic CT NIfTI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16, help="answer length (default 16)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    context = {
        "model": str(args.model or "random tiny preset"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    sink = Sink("cold_start", context)
    sink.emit(
        "machine", **machine_info(device, detect_hardware(device), command("benchmarks.cold_start", argv))
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_demo_model(Path(tmp) / "model")
        volume = args.volume or write_volume(Path(tmp) / "scan.nii.gz")
        run(model, volume, args.repeats, args.new_tokens, sink)


if __name__ == "__main__":
    main()
