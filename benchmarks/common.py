"""Shared parts of the benchmarks: timing, JSON-lines output, synthetic inputs, model building, FLOP counts.

Every measurement is printed as one JSON object per line (and appended to ``$OUT/<bench>.jsonl`` when the
``OUT`` environment variable names a folder). Times are medians over repeated runs after warm-up, with
min and max; GPU work is timed with ``torch.cuda.synchronize`` around a wall clock, so a time includes
the host-side overhead a user pays (Python, kernel launches), not just kernel time.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn

from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor
from med2e3.config import PRESETS
from med2e3.data.io import Volume, from_array, load_volume
from med2e3.data.processor import IMAGE_TOKEN, bundled_tokenizers
from med2e3.data.transforms import prepare_volume

QUESTIONS: tuple[str, ...] = (
    "Which organ has a lesion?",
    "In which plane is this image?",
    "What is in the left kidney?",
    "Is the contrast phase arterial or portal venous?",
    "Where is the largest mass located?",
    "Is there any abnormality in the liver?",
    "Which side is the cyst on?",
    "Does the spleen look enlarged?",
    "What is the density of the lesion?",
    "Is the urinary bladder distended?",
    "Are there calcifications in the aorta?",
    "Which part of the body does this scan cover?",
    "Is the right lung clear?",
    "How many lesions are visible?",
    "What lies next to the heart?",
    "Is the spine normal?",
)
CAPTION = "Axial CT of the abdomen shows a hypodense lesion in the right lobe of the liver without ascites."

# bf16 dense peak (FLOP/s, no sparsity) and HBM bandwidth (B/s) of known cards; first matching name wins.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4e12, 4.8e12),
    ("H100 PCIe", 756.0e12, 2.0e12),
    ("H100 NVL", 835.0e12, 3.9e12),
    ("H100", 989.4e12, 3.35e12),  # SXM
    ("A100", 312.0e12, 2.0e12),
)


# ---- output ---------------------------------------------------------------------------------------
@dataclass
class Sink:
    """Writes records as JSON lines to stdout and, if ``$OUT`` is set, to ``$OUT/<bench>.jsonl``."""

    bench: str
    context: dict[str, Any] = field(default_factory=dict)

    def emit(self, name: str, **fields: Any) -> dict[str, Any]:
        record = {"bench": self.bench, "name": name, **self.context, **fields}
        line = json.dumps(record)
        print(line, flush=True)
        out = os.environ.get("OUT")
        if out:
            with (Path(out) / f"{self.bench}.jsonl").open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        return record


# ---- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, min and max in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {
        "median_ms": round(statistics.median(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
        "repeats": len(ms),
    }


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[dict, Any]:
    """Stats of ``repeats`` timed calls after ``warmup`` untimed ones, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        seconds, result = time_once(fn, device)
        times.append(seconds)
    return summarize(times), result


def compare(
    paths: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int,
    interleave: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time several paths (alternating runs by default, so load changes hit all of them alike).

    Returns ``({path: stats, "speedup": naive / optimised}, {path: last result})``; the speedup is
    present when paths named "naive" and "optimised" are.
    """
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in paths.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = (
        [name for _ in range(repeats) for name in paths]
        if interleave
        else [name for name in paths for _ in range(repeats)]
    )
    for name in order:
        seconds, results[name] = time_once(paths[name], device)
        times[name].append(seconds)
    stats: dict[str, Any] = {name: summarize(t) for name, t in times.items()}
    if "naive" in stats and "optimised" in stats:
        stats["speedup"] = speedup(stats["naive"], stats["optimised"])
    return stats, results


def speedup(slow: dict[str, float], fast: dict[str, float]) -> float | None:
    """slow / fast median (None when the fast one measured as zero, e.g. a one-repeat smoke run)."""
    return round(slow["median_ms"] / fast["median_ms"], 3) if fast["median_ms"] > 0 else None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' info/warning logs (e.g. the notice on every attention switch), then restore."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


class Budget:
    """A soft time limit: sections ask whether enough time is left before they start."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, needed_s: float) -> bool:
        return self.remaining() >= needed_s


# ---- machine --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The accelerator's name and, where known, its bf16 peak and memory bandwidth."""

    name: str
    peak_flops: float | None = None
    bandwidth: float | None = None


def detect_hardware(
    device: torch.device, peak_tflops: float | None = None, bandwidth_tbs: float | None = None
) -> Hardware:
    """Look the card up in `GPU_PEAKS` (explicit values win); a CPU has no peak here."""
    if device.type != "cuda":
        name = cpu_name()
        peak = None
        bandwidth = None
    else:
        name = torch.cuda.get_device_name(device)
        peak, bandwidth = next(((p, b) for key, p, b in GPU_PEAKS if key in name), (None, None))
    return Hardware(
        name,
        peak_tflops * 1e12 if peak_tflops else peak,
        bandwidth_tbs * 1e12 if bandwidth_tbs else bandwidth,
    )


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, hardware: Hardware, command: str) -> dict[str, Any]:
    """What the numbers came from, including the CPU load at the start (other jobs skew CPU timings)."""
    info: dict[str, Any] = {
        "hardware": hardware.name,
        "peak_tflops": None if hardware.peak_flops is None else hardware.peak_flops / 1e12,
        "bandwidth_tbs": None if hardware.bandwidth is None else hardware.bandwidth / 1e12,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": command,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS (never reset)"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on CPU the process's peak resident set (never reset)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- inputs ---------------------------------------------------------------------------------------
def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> Volume:
    """A CT-like volume in Hounsfield units: air, a body ellipse with noise, two lungs and a bright organ."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    z, y, x = np.ogrid[-1 : 1 : d * 1j, -1 : 1 : h * 1j, -1 : 1 : w * 1j]
    array = np.full(shape, -1000.0, dtype=np.float32)
    body = np.broadcast_to((y / 0.8) ** 2 + (x / 0.9) ** 2 < 1, shape)
    array[body] = 40.0 + rng.normal(0.0, 20.0, size=int(body.sum())).astype(np.float32)
    for side in (-0.45, 0.45):
        array[((x - side) / 0.3) ** 2 + ((y + 0.1) / 0.45) ** 2 + ((z - 0.4) / 0.6) ** 2 < 1] = -850.0
    cz, cy, cx = rng.uniform(-0.4, 0.4, size=3)
    array[((x - cx) / 0.2) ** 2 + ((y - cy) / 0.2) ** 2 + ((z - cz) / 0.3) ** 2 < 1] = 150.0
    return from_array(array, spacing=(2.0, 0.8, 0.8), intensity="hu")


def prepare_path(path: str, size: tuple[int, int, int], window: str = "abdomen") -> torch.Tensor:
    """Read and preprocess one volume file (a worker-process task)."""
    return prepare_volume(load_volume(path), size, window=window)


def single_thread_worker() -> None:
    """Process-pool initializer: one torch thread per worker, so workers do not oversubscribe the cores."""
    torch.set_num_threads(1)


# ---- models ---------------------------------------------------------------------------------------
def bench_config(preset: str, depth: int | None = None) -> Med2E3Config:
    """``preset`` with the bundled tokenizers' image token id and, optionally, ``depth`` slices."""
    fields = PRESETS[preset]()
    fields["image_token_id"] = bundled_tokenizers()[0].convert_tokens_to_ids(IMAGE_TOKEN)
    if depth is not None:
        v3 = fields["vision3d_config"]
        fields["vision3d_config"] = {**v3, "image_size": [depth, *v3["image_size"][1:]]}
    return Med2E3Config(**fields)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    preset: str, device: torch.device, dtype: torch.dtype, depth: int | None = None, seed: int = 0
) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor]:
    """A random-weight model built directly on ``device`` in ``dtype`` (no CPU copy), and its processor."""
    config = bench_config(preset, depth)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = Med2E3ForConditionalGeneration(config)
    model.eval().requires_grad_(False)
    if preset == "tiny":  # spread the TG-IS scores so that score comparisons are not all ~1/S
        with torch.no_grad():
            model.tgis.text_proj.weight.normal_(std=2.0)
            model.projector2d.linear_2.weight.normal_(std=1.0)
    processor = Med2E3Processor.for_config(config)
    processor.max_length += config.num_image_tokens - bench_config(preset).num_image_tokens  # deeper: longer
    return model, processor


def prepared(model: Med2E3ForConditionalGeneration, seeds: Iterable[int], raw_shape: tuple[int, int, int]):
    """Preprocessed synthetic volumes, B x 1 x D x H x W on the model's device and dtype."""
    size = tuple(model.config.vision3d_config.image_size)
    volumes = [_prepared_one(seed, tuple(raw_shape), size) for seed in seeds]
    return torch.stack(volumes).to(model.device, model.dtype)


@lru_cache(maxsize=64)
def _prepared_one(seed: int, raw_shape: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    return prepare_volume(synthetic_ct(raw_shape, seed), size)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- FLOPs and bytes --------------------------------------------------------------------------------
def matmul_params(module: nn.Module) -> int:
    """Weights used once per token: Linear layers and patch-embedding convolutions (kernel = stride)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)))


def transformer_flops(
    params: int, tokens: int, sequences: int, layers: int, width: int, causal: bool
) -> float:
    """Forward FLOPs: 2 * params * tokens (matmuls) + attention scores and values (4 * L * T^2 * d, half if causal)."""
    attention = (2 if causal else 4) * layers * tokens**2 * width
    return float(sequences * (2 * params * tokens + attention))


def encoder_flops(model: Med2E3ForConditionalGeneration, volumes: int) -> dict[str, float]:
    """Forward FLOPs of the question-independent encoders for ``volumes`` volumes."""
    config = model.config
    v3 = config.vision3d_config
    n3 = 1 + int(np.prod(v3.grid_size))
    flops = {
        "vision3d": transformer_flops(
            matmul_params(model.vision3d), n3, volumes, v3.num_hidden_layers, v3.hidden_size, False
        ),
        "projector3d": 2.0 * matmul_params(model.projector3d) * config.num_3d_tokens * volumes,
    }
    if config.slice_aggregation != "none":
        v2 = config.vision2d_config
        slices = volumes * config.num_slices
        flops["vision2d"] = transformer_flops(
            matmul_params(model.vision2d),
            config.num_2d_tokens,
            slices,
            v2.num_hidden_layers,
            v2.hidden_size,
            False,
        )
        flops["projector2d"] = 2.0 * matmul_params(model.projector2d) * config.num_2d_tokens * slices
    return flops


def question_flops(model: Med2E3ForConditionalGeneration, tokens: int, questions: int) -> float:
    """Forward FLOPs of the BERT question encoder (TG-IS itself is negligible)."""
    if model.config.slice_aggregation != "tgis":
        return 0.0
    q = model.config.question_encoder_config
    return transformer_flops(
        matmul_params(model.question_encoder), tokens, questions, q.num_hidden_layers, q.hidden_size, False
    )


def llm_flops(
    model: Med2E3ForConditionalGeneration, tokens: int, sequences: int, logits_tokens: int
) -> float:
    """Forward FLOPs of the LLM over ``tokens`` per sequence, with the LM head on ``logits_tokens`` of them."""
    text = model.config.text_config
    head = model.language_model.get_output_embeddings().weight.numel()
    body = transformer_flops(
        matmul_params(model.language_model) - head,
        tokens,
        sequences,
        text.num_hidden_layers,
        text.hidden_size,
        True,
    )
    return body + 2.0 * head * logits_tokens * sequences


def decode_bytes(model: Med2E3ForConditionalGeneration, context_tokens: int) -> dict[str, float]:
    """Bytes read per decoded token at batch 1: every LLM weight but the embedding table, plus the KV cache."""
    lm = model.language_model
    element = next(lm.parameters()).element_size()
    weights = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    text = model.config.text_config
    kv_width = text.hidden_size // text.num_attention_heads * text.num_key_value_heads
    kv = 2 * text.num_hidden_layers * context_tokens * kv_width
    return {"weight_bytes": float(weights * element), "kv_bytes": float(kv * element)}


def utilisation(flops: float, stats: dict[str, float], hardware: Hardware) -> dict[str, float]:
    """Achieved TFLOP/s and, with a known peak, the model-FLOPs utilisation of a timed step."""
    seconds = stats["median_ms"] / 1e3
    out = {"flops": flops, "achieved_tflops": round(flops / seconds / 1e12, 4)}
    if hardware.peak_flops:
        out["mfu"] = round(flops / seconds / hardware.peak_flops, 4)
    return out


# ---- run context ----------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes and repeat counts of one benchmark run (`for_run` picks them from preset, device and --quick)."""

    repeats: int = 5  # per micro-measurement (encoders, prefill, decode)
    warmup: int = 1
    table_repeats: int = 3  # per row of the scaling tables (questions, batch, depth)
    table_warmup: int = 1
    new_tokens: int = 32  # answer length in the tables
    decode_tokens: int = 32  # tokens timed in the decode measurement
    question_counts: tuple[int, ...] = (1, 4, 10, 16)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    depths: tuple[int, ...] = (32, 64)
    raw_shape: tuple[int, int, int] = (64, 128, 128)  # synthetic CT before preprocessing (D, H, W)
    preprocess_volumes: int = 4
    batch_mode_volumes: int = 4  # batch mode: volume files x questions per volume
    batch_mode_questions: int = 4
    workers: int = 2
    compile: bool = False  # add a static-cache + torch.compile decode variant
    compile_backend: str = "inductor"
    compile_mode: str | None = "reduce-overhead"
    train_batch: int = 4
    train_batch_sizes: tuple[int, ...] = ()  # larger batches, SDPA variants only
    train_answer_tokens: int = 64
    train_steps: int = 3

    @classmethod
    def for_run(cls, preset: str, device: torch.device, quick: bool) -> Settings:
        if quick:  # smoke test: every code path once, tiny sizes
            return cls(
                repeats=1,
                warmup=0,
                table_repeats=1,
                table_warmup=0,
                new_tokens=4,
                decode_tokens=2,
                question_counts=(1, 2),
                batch_sizes=(1, 2),
                raw_shape=(32, 64, 64),
                preprocess_volumes=2,
                batch_mode_volumes=2,
                batch_mode_questions=2,
                compile_backend="eager",
                compile_mode=None,
                train_batch=2,
                train_batch_sizes=(3,),
                train_answer_tokens=8,
                train_steps=1,
            )
        if preset == "paper":
            return cls(
                table_repeats=2,
                table_warmup=0,  # the micro-measurements before the tables warm every path up
                new_tokens=16,
                question_counts=(1, 4, 16),
                raw_shape=(96, 384, 384),
                workers=min(4, os.cpu_count() or 1),
                compile=device.type == "cuda",
                train_answer_tokens=128,
                train_batch_sizes=(8, 16) if device.type == "cuda" else (),
            )
        return cls(workers=min(2, os.cpu_count() or 1))


@dataclass
class Bench:
    """Everything a benchmark section needs."""

    model: Med2E3ForConditionalGeneration
    processor: Med2E3Processor
    device: torch.device
    dtype: torch.dtype
    preset: str
    settings: Settings
    hardware: Hardware
    sink: Sink

    def emit(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.sink.emit(name, **fields)

    @property
    def eos(self) -> int:
        return self.processor.tokenizer.eos_token_id

    @property
    def pad(self) -> int:
        return self.processor.tokenizer.pad_token_id


def add_common_args(parser: Any) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smallest sizes, one repeat (smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="override the repeats of every measurement")
    parser.add_argument("--compile", action="store_true", help="add the static-cache + torch.compile decode")
    parser.add_argument("--new-tokens", type=int, default=None, help="answer length in the tables")
    parser.add_argument("--question-counts", default=None, help="e.g. 1,4,10,16")
    parser.add_argument("--batch-sizes", default=None, help="e.g. 1,4,16")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of an unlisted GPU")
    parser.add_argument(
        "--bandwidth-tbs", type=float, default=None, help="memory bandwidth of an unlisted GPU"
    )


def make_bench(args: Any, bench: str) -> Bench:
    """Build the model and context described by parsed `add_common_args` arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    settings = Settings.for_run(args.preset, device, args.quick)
    if args.repeats:
        settings.repeats = settings.table_repeats = settings.train_steps = args.repeats
    settings.compile = settings.compile or args.compile
    if device.type != "cuda":
        settings.compile_mode = None  # "reduce-overhead" means CUDA graphs
    if args.new_tokens:
        settings.new_tokens = args.new_tokens
    if args.question_counts:
        settings.question_counts = _ints(args.question_counts)
    if args.batch_sizes:
        settings.batch_sizes = _ints(args.batch_sizes)
    hardware = detect_hardware(device, args.peak_tflops, args.bandwidth_tbs)
    model, processor = build_model(args.preset, device, dtype)
    context = {"preset": args.preset, "device": device.type, "dtype": str(dtype).removeprefix("torch.")}
    return Bench(model, processor, device, dtype, args.preset, settings, hardware, Sink(bench, context))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def run_sections(
    bench: Bench,
    sections: dict[str, Callable[[Bench], None]],
    names: list[str],
    budget: Budget | None = None,
    needs: dict[str, float] | None = None,
    keep_going: bool = False,
) -> None:
    """Run the named sections in order; skip (and say so) those the time budget no longer allows.

    With ``keep_going`` a failing section prints an ``error`` record and the next one runs.
    """
    budget = budget or Budget(None)
    for name in names:
        needed = (needs or {}).get(name, 0.0)
        if not budget.allows(needed):
            bench.emit(name, skipped=f"time limit: {budget.remaining():.0f} s left, needs ~{needed:.0f} s")
            continue
        start = time.monotonic()
        try:
            sections[name](bench)
        except Exception as err:  # noqa: BLE001 - reported, and the run goes on
            if not keep_going:
                raise
            bench.emit("error", section=name, error=f"{type(err).__name__}: {err}"[:500])
            release_memory(bench.device)
        bench.emit("section_done", section=name, seconds=round(time.monotonic() - start, 2))


def selected(only: str | None, available: dict[str, Any]) -> list[str]:
    """Section names from ``--only`` (checked), or all of them."""
    if not only:
        return list(available)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {sorted(available)}")
    return names
