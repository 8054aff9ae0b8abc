"""Training-step benchmarks: one optimizer step of stage 1 (pretrain) and stage 2 (finetune).

Each step is forward + backward + AdamW step on a batch of ``train_batch`` (volume, prompt, answer)
samples of equal length, with the stage's trainable parts (`Med2E3ForConditionalGeneration.set_training_stage`).
Variants: optimised = SDPA attention + gradient checkpointing (the paper configs' setting), naive = eager
attention + gradient checkpointing, and SDPA without checkpointing (faster, more memory). On GPU the
parameters are bf16 and AdamW keeps bf16 state (the release's DeepSpeed run keeps fp32 master weights,
which costs memory, not FLOPs).

Run from the repository root::

    python -m benchmarks.training --preset tiny --device cpu --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.common import (
    CAPTION,
    QUESTIONS,
    Bench,
    add_common_args,
    command,
    encoder_flops,
    llm_flops,
    machine_info,
    make_bench,
    memory_kind,
    peak_memory_mb,
    prepared,
    question_flops,
    quiet_transformers,
    release_memory,
    reset_peak_memory,
    run_sections,
    selected,
    summarize,
    time_once,
    to_device,
    utilisation,
)
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.model.modeling import STAGE_TRAINABLE

VARIANTS: dict[str, tuple[str, bool]] = {  # name: (attention, gradient checkpointing)
    "optimised": ("sdpa", True),
    "naive": ("eager", True),
    "no_checkpointing": ("sdpa", False),
}
LARGE_BATCH_VARIANTS = ("optimised", "no_checkpointing")


def training_batch(b: Bench, size: int) -> dict[str, torch.Tensor]:
    """``size`` samples, all with the same prompt length and ``train_answer_tokens`` answer tokens."""
    s = b.settings
    texts = [QUESTIONS[0]] * size
    prompt = b.processor(texts[:1])["input_ids"].shape[1]
    words = CAPTION.split()
    answer = " ".join(words[i % len(words)] for i in range(4 * s.train_answer_tokens))
    max_length = b.processor.max_length
    b.processor.max_length = prompt + s.train_answer_tokens  # the answer is cut to fit
    try:
        batch = b.processor(
            texts,
            questions=texts,
            answers=[answer] * size,
            volumes=prepared(b.model, range(size), s.raw_shape).cpu(),
            padding_side="right",
        )
    finally:
        b.processor.max_length = max_length
    batch = to_device(batch, b.device)
    batch["pixel_values"] = batch["pixel_values"].to(b.model.dtype)
    return batch


def training_flops(
    model: Med2E3ForConditionalGeneration, stage: str, batch: dict[str, torch.Tensor]
) -> float:
    """Model FLOPs of one step: 3x forward for parts whose weights train, 2x for the frozen LLM of stage 1
    (gradients pass through it to the visual tokens), 1x for frozen encoders no gradient reaches."""
    volumes, tokens = batch["input_ids"].shape
    enc = encoder_flops(model, volumes)
    trained = STAGE_TRAINABLE[stage]
    llm = llm_flops(model, tokens, volumes, tokens) * (3 if "language_model" in trained else 2)
    vision2d = enc.get("vision2d", 0.0) * (3 if "vision2d" in trained else 1)
    connectors = 3 * (enc["projector3d"] + enc.get("projector2d", 0.0))
    questions = (
        question_flops(model, batch["question_input_ids"].shape[1], volumes)
        if "question_input_ids" in batch
        else 0.0
    )
    return llm + vision2d + connectors + enc["vision3d"] + questions


def train_step(
    model: Med2E3ForConditionalGeneration, batch: dict, optimizer: torch.optim.Optimizer
) -> Callable:
    def step() -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench_stage(b: Bench, stage: str) -> None:
    """Time each variant's steps at ``train_batch``, and the SDPA variants at each larger batch of
    ``train_batch_sizes``; record samples/s, peak memory and (on GPU) MFU."""
    model = b.model
    model.set_training_stage(stage)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW as the Trainer's default optimizer (adamw_torch_fused); a tiny lr keeps random weights sane
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    attention = model.config._attn_implementation
    try:
        for size in (b.settings.train_batch, *b.settings.train_batch_sizes):
            try:
                _time_batch(b, stage, size, optimizer, params)
                continue
            except torch.OutOfMemoryError:
                pass  # freed below, once the traceback no longer holds the batch's tensors
            _out_of_memory(b, optimizer, stage=stage, batch=size)
    finally:
        _configure(model, attention, False)
        model.eval().requires_grad_(False)
        del optimizer
        release_memory(b.device)


def _out_of_memory(b: Bench, optimizer: torch.optim.Optimizer, **fields: object) -> None:
    """Free what a failed step held and record the failure."""
    optimizer.zero_grad(set_to_none=True)
    release_memory(b.device)
    b.emit("train_step", error="out of memory", **fields)


def _time_batch(
    b: Bench, stage: str, size: int, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> None:
    """All variants at the base batch size, the SDPA ones at larger sizes; a variant may run out of memory."""
    model = b.model
    batch = training_batch(b, size)
    flops = training_flops(model, stage, batch)
    names = list(VARIANTS) if size == b.settings.train_batch else list(LARGE_BATCH_VARIANTS)
    _configure(model, *VARIANTS[names[0]])  # the warming step runs as the first variant
    step = train_step(model, batch, optimizer)
    step()  # allocates the optimizer state
    with_grad = _params_reached(model, batch, params)
    records = {}
    for name in names:
        _configure(model, *VARIANTS[name])
        try:
            records[name] = _time_variant(b, step, flops, batch, params, with_grad, stage, name)
        except torch.OutOfMemoryError:
            _out_of_memory(b, optimizer, stage=stage, variant=name, batch=size)
    if len(records) == len(VARIANTS):
        b.emit("train_compare", stage=stage, **_ratios(records))


def _time_variant(
    b: Bench,
    step: Callable[[], float],
    flops: float,
    batch: dict[str, torch.Tensor],
    params: list[torch.nn.Parameter],
    with_grad: float,
    stage: str,
    name: str,
) -> dict:
    """Warm-up, then timed steps of the configured variant; emits and returns its record."""
    for _ in range(b.settings.warmup):
        step()
    reset_peak_memory(b.device)
    times, losses = [], []
    for _ in range(b.settings.train_steps):
        seconds, loss = time_once(step, b.device)
        times.append(seconds)
        losses.append(loss)
    stats = summarize(times)
    attention, checkpointing = VARIANTS[name]
    volumes, tokens = batch["input_ids"].shape
    return b.emit(
        "train_step",
        stage=stage,
        variant=name,
        attention=attention,
        gradient_checkpointing=checkpointing,
        batch=volumes,
        seq_len=tokens,
        trainable_params=sum(p.numel() for p in params),
        trainable_reached=with_grad,
        step=stats,
        samples_per_s=round(volumes * 1e3 / stats["median_ms"], 3),
        peak_memory_mb=peak_memory_mb(b.device),
        peak_memory_kind=memory_kind(b.device),
        loss=losses[-1],
        **utilisation(flops, stats, b.hardware),
    )


def _ratios(records: dict[str, dict]) -> dict[str, float]:
    """naive / optimised step time, and what checkpointing costs in time and saves in peak memory."""
    ms = {name: r["step"]["median_ms"] for name, r in records.items()}
    return {
        "speedup": round(ms["naive"] / ms["optimised"], 3) if ms["optimised"] > 0 else None,
        "checkpointing_time_ratio": round(ms["optimised"] / ms["no_checkpointing"], 3)
        if ms["no_checkpointing"] > 0
        else None,
        "checkpointing_memory_saved_mb": round(
            records["no_checkpointing"]["peak_memory_mb"] - records["optimised"]["peak_memory_mb"], 1
        )
        if records["optimised"]["peak_memory_kind"].startswith("cuda")
        else None,
    }


def _configure(model: Med2E3ForConditionalGeneration, attention: str, checkpointing: bool) -> None:
    with quiet_transformers():
        model.set_attn_implementation(attention)
    if checkpointing:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()


def _params_reached(
    model: Med2E3ForConditionalGeneration, batch: dict, params: list[torch.nn.Parameter]
) -> float:
    """Share of the trainable parameters that get a gradient (checks that the stage really trains them)."""
    model(**batch, use_cache=False).loss.backward()
    reached = sum(p.numel() for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    return round(reached / max(1, sum(p.numel() for p in params)), 4)


def bench_pretrain(b: Bench) -> None:
    bench_stage(b, "pretrain")


def bench_finetune(b: Bench) -> None:
    bench_stage(b, "finetune")


SECTIONS: dict[str, Callable[[Bench], None]] = {"pretrain": bench_pretrain, "finetune": bench_finetune}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 4)")
    parser.add_argument("--answer-tokens", type=int, default=None, help="answer tokens per sample")
    args = parser.parse_args(argv)
    names = selected(args.only, SECTIONS)
    bench = make_bench(args, "training")
    if args.batch:
        bench.settings.train_batch = args.batch
    if args.answer_tokens:
        bench.settings.train_answer_tokens = args.answer_tokens
    bench.emit("machine", **machine_info(bench.device, bench.hardware, command("benchmarks.training", argv)))
    run_sections(bench, SECTIONS, names)


if __name__ == "__main__":
    main()
