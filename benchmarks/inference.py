"""Inference benchmarks: every stage of answering questions about a volume, optimised path vs naive path.

Naive path: the same model, used as a plain `generate` call per question with ``pixel_values`` (the
volume is encoded again for every question), default generation settings, slices encoded one by one,
eager attention, fp32 on GPU, preprocessing in the main process. Optimised path: what the project does
by default (`Med2E3Predictor`: encode once, batched questions; batched slice encoding; SDPA; bf16 on GPU)
plus the options measured here (static KV cache, torch.compile, worker processes).

Run from the repository root::

    python -m benchmarks.inference --preset tiny --device cpu --threads 1
    python -m benchmarks.inference --only questions,decode --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CompileConfig

from benchmarks.common import (
    QUESTIONS,
    Bench,
    add_common_args,
    build_model,
    command,
    compare,
    decode_bytes,
    encoder_flops,
    llm_flops,
    machine_info,
    make_bench,
    measure,
    prepare_path,
    prepared,
    question_flops,
    quiet_transformers,
    release_memory,
    run_sections,
    selected,
    single_thread_worker,
    speedup,
    summarize,
    synthetic_ct,
    time_once,
    to_device,
    utilisation,
)
from med2e3.data.processor import Med2E3Processor
from med2e3.data.transforms import prepare_volume
from med2e3.graphs import GraphedCall
from med2e3.inference import Med2E3Predictor, static_cache_length
from med2e3.model import Med2E3ForConditionalGeneration


# ---- helpers --------------------------------------------------------------------------------------
def questions(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]


def inputs(b: Bench, texts: list[str], model: Med2E3ForConditionalGeneration | None = None) -> dict:
    """Left-padded prompts and TG-IS questions on the device."""
    return to_device(b.processor(texts, padding_side="left"), (model or b.model).device)


def answer_ids(row: torch.Tensor, eos: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-text."""
    ids = row.tolist()
    return ids[: ids.index(eos)] if eos in ids else ids


def generate(
    b: Bench, batch: dict, new_tokens: int, model: Med2E3ForConditionalGeneration | None = None, **kwargs: Any
) -> Any:
    """Greedy `generate` with the tokenizer's end/pad ids; everything else at the defaults."""
    return (model or b.model).generate(
        **batch,
        max_new_tokens=new_tokens,
        eos_token_id=b.eos,
        pad_token_id=b.pad,
        return_dict_in_generate=True,
        **kwargs,
    )


def slices_of(model: Med2E3ForConditionalGeneration, volume: torch.Tensor) -> torch.Tensor:
    """The (B*S) x 3 x H x W slice images `encode_volume` feeds to the 2D encoder."""
    b, _, s, h, w = volume.shape
    slices = volume.permute(0, 2, 1, 3, 4).reshape(b * s, 1, h, w).expand(-1, 3, -1, -1)
    return (slices - 0.5) / 0.5 if model.config.vision2d_normalize else slices


def encode_slices(model: Med2E3ForConditionalGeneration, slices: torch.Tensor) -> torch.Tensor:
    out = model.vision2d(pixel_values=slices, output_hidden_states=True)
    return model.projector2d(out.hidden_states[model.config.vision2d_feature_layer])


@contextmanager
def attention(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Temporarily switch a (sub)model's attention implementation."""
    before = model.config._attn_implementation
    with quiet_transformers():
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        with quiet_transformers():
            model.set_attn_implementation(before)


def with_attention(model: torch.nn.Module, implementation: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with attention(model, implementation):
            return fn()

    return run


@contextmanager
def fp32_vision(model: Med2E3ForConditionalGeneration) -> Iterator[None]:
    """Temporarily run the encoders and connectors in fp32 (bf16 -> fp32 -> bf16 is exact)."""
    parts = [
        getattr(model, n) for n in ("vision3d", "projector3d", "vision2d", "projector2d") if hasattr(model, n)
    ]
    dtype = model.dtype
    for part in parts:
        part.float()
    try:
        yield
    finally:
        for part in parts:
            part.to(dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---- sections -------------------------------------------------------------------------------------
@torch.no_grad()
def bench_equivalence(b: Bench) -> None:
    """Greedy tokens and TG-IS scores: per-question generate with re-encoding vs one batched cached call."""
    qs = questions(max(2, min(4, max(b.settings.question_counts))))
    volume = prepared(b.model, [0], b.settings.raw_shape)
    n = b.settings.new_tokens
    naive_ids, naive_scores = [], []
    for q in qs:
        batch = inputs(b, [q])
        out = generate(b, batch, n, pixel_values=volume)
        naive_ids.append(answer_ids(out.sequences[0, batch["input_ids"].shape[1] :], b.eos))
        naive_scores.append(out.slice_scores[0])
    batch = inputs(b, qs)
    out = generate(b, batch, n, volume_encoding=b.model.encode_volume(volume).expand(len(qs)))
    opt_ids = [answer_ids(row, b.eos) for row in out.sequences[:, batch["input_ids"].shape[1] :]]
    b.emit(
        "equivalence",
        n_questions=len(qs),
        new_tokens=n,
        tokens_equal=opt_ids == naive_ids,
        answer_lengths=[len(ids) for ids in opt_ids],
        max_score_abs_diff=max_diff(out.slice_scores, torch.stack(naive_scores)),
    )


def bench_preprocess(b: Bench) -> None:
    """Read + window + crop + resize of N volume files: one after another vs in worker processes."""
    s = b.settings
    size = tuple(b.model.config.vision3d_config.image_size)
    task = partial(prepare_path, size=size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(s.preprocess_volumes):
            paths.append(str(Path(tmp) / f"volume{i}.npy"))
            np.save(paths[-1], synthetic_ct(s.raw_shape, seed=i).array)
        pool = ProcessPoolExecutor(
            s.workers, mp_context=mp.get_context("fork"), initializer=single_thread_worker
        )
        with pool:
            list(pool.map(task, paths[: s.workers]))  # start the workers outside the timing
            stats, results = compare(
                {"naive": lambda: [task(p) for p in paths], "optimised": lambda: list(pool.map(task, paths))},
                torch.device("cpu"),
                s.table_repeats,
                s.table_warmup,
            )
    equal = all(torch.equal(x, y) for x, y in zip(results["naive"], results["optimised"], strict=True))
    per_volume = {k: round(stats[k]["median_ms"] / len(paths), 3) for k in ("naive", "optimised")}
    b.emit(
        "preprocess",
        raw_shape=list(s.raw_shape),
        size=list(size),
        volumes=len(paths),
        workers=s.workers,
        main_threads=torch.get_num_threads(),
        per_volume_ms=per_volume,
        outputs_equal=equal,
        **stats,
    )


@torch.no_grad()
def bench_encoders(b: Bench) -> None:
    """2D encoding of the slices (batched vs one by one), 3D encoding, the whole encoding, TG-IS."""
    s, model = b.settings, b.model
    volume = prepared(model, [0], s.raw_shape)
    flops = encoder_flops(model, 1)
    slices = slices_of(model, volume)
    stats, out = compare(
        {
            "naive": lambda: torch.cat([encode_slices(model, slices[i : i + 1]) for i in range(len(slices))]),
            "optimised": lambda: encode_slices(model, slices),
        },
        b.device,
        s.repeats,
        s.warmup,
    )
    b.emit(
        "encode2d",
        slices=len(slices),
        max_abs_diff=max_diff(out["naive"], out["optimised"]),
        **stats,
        **utilisation(flops["vision2d"] + flops["projector2d"], stats["optimised"], b.hardware),
    )

    layer = model.config.vision3d_feature_layer
    stats3d, _ = measure(
        lambda: model.projector3d(model.vision3d.block_output(volume, layer)[:, 1:]),
        b.device,
        s.repeats,
        s.warmup,
    )
    b.emit(
        "encode3d",
        optimised=stats3d,
        **utilisation(flops["vision3d"] + flops["projector3d"], stats3d, b.hardware),
    )

    stats, out = compare({"optimised": lambda: model.encode_volume(volume)}, b.device, s.repeats, s.warmup)
    if b.dtype != torch.float32:  # bf16 (the GPU default) vs the fp32 a naive user runs
        with fp32_vision(model):
            naive, _ = measure(lambda: model.encode_volume(volume), b.device, s.repeats, s.warmup)
        stats = {"naive": naive, **stats, "speedup": speedup(naive, stats["optimised"]), "naive_is": "fp32"}
    b.emit("encode_volume", **stats, **utilisation(sum(flops.values()), stats["optimised"], b.hardware))

    encoding = out["optimised"]
    batch = inputs(b, [QUESTIONS[0]])
    q_ids, q_mask = batch.get("question_input_ids"), batch.get("question_attention_mask")
    stats_q, _ = measure(lambda: model.visual_tokens(encoding, q_ids, q_mask), b.device, s.repeats, s.warmup)
    b.emit("tgis", optimised=stats_q, question_tokens=0 if q_ids is None else q_ids.shape[1])


@torch.no_grad()
def bench_prefill(b: Bench) -> None:
    """LLM prefill of one prompt (SDPA vs eager attention), and encoding + TG-IS + prefill of one question."""
    s, model = b.settings, b.model
    volume = prepared(model, [0], s.raw_shape)
    batch = inputs(b, [QUESTIONS[0]])
    image_embeds, scores = model.visual_tokens(
        model.encode_volume(volume), batch.get("question_input_ids"), batch.get("question_attention_mask")
    )
    tokens = batch["input_ids"].shape[1]

    def prefill() -> torch.Tensor:
        return model(
            **batch, image_embeds=image_embeds, slice_scores=scores, use_cache=True, logits_to_keep=1
        ).logits

    lm = model.language_model
    stats, out = compare(
        {"naive": with_attention(lm, "eager", prefill), "optimised": prefill}, b.device, s.repeats, s.warmup
    )
    b.emit(
        "prefill",
        tokens=tokens,
        attention={"naive": "eager", "optimised": lm.config._attn_implementation},
        logits_max_abs_diff=max_diff(out["naive"], out["optimised"]),
        **stats,
        **utilisation(llm_flops(model, tokens, 1, 1), stats["optimised"], b.hardware),
    )

    def first_token() -> torch.Tensor:
        return model(**batch, pixel_values=volume, use_cache=True, logits_to_keep=1).logits

    stats, _ = compare(
        {"naive": with_attention(model, "eager", first_token), "optimised": first_token},
        b.device,
        s.repeats,
        s.warmup,
    )
    flops = sum(encoder_flops(model, 1).values()) + question_flops(
        model, batch["question_input_ids"].shape[1], 1
    )
    b.emit(
        "encode_plus_prefill",
        tokens=tokens,
        **stats,
        **utilisation(flops + llm_flops(model, tokens, 1, 1), stats["optimised"], b.hardware),
    )


def decode_variants(b: Bench, cache_len: int, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Generation kwargs of each decode variant."""
    static = {"cache_implementation": "static", "max_cache_len": cache_len}
    config = CompileConfig(fullgraph=False, backend=b.settings.compile_backend, mode=b.settings.compile_mode)
    if b.device.type != "cuda":
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    variants = {
        "dynamic": {},
        "static": {**static, "disable_compile": True},
        "static+compile": {**static, "compile_config": config},
        # what `Med2E3Predictor(compile=True)` decodes with: transformers' own compile settings (CUDA graphs
        # on CUDA, nothing compiled on CPU), the cache length rounded up as the predictor rounds it
        "predictor": {"cache_implementation": "static", "max_cache_len": static_cache_length(cache_len)},
    }
    return {name: variants[name] for name in names}


@torch.no_grad()
def bench_decode(b: Bench, names: tuple[str, ...] | None = None, record_name: str = "decode") -> None:
    """Decode time per token at batch 1: dynamic cache (default) vs static cache (vs static + torch.compile).

    Per token = (time of n1 + k new tokens - time of n1 new tokens) / k, per repeat, so the prefill and
    any per-call set-up cancel.
    """
    from torch._dynamo.utils import counters  # imported here: dynamo takes seconds to import

    s, model = b.settings, b.model
    names = names or (("dynamic", "static", "static+compile") if s.compile else ("dynamic", "static"))
    volume = prepared(model, [0], s.raw_shape)
    encoding = model.encode_volume(volume)
    batch = inputs(b, [QUESTIONS[0]])
    prompt = batch["input_ids"].shape[1]
    n1 = 1 if s.decode_tokens < 4 else 4
    n2 = n1 + s.decode_tokens
    variants = decode_variants(b, prompt + n2, names)
    results: dict[str, Any] = {}
    tokens: dict[str, list[int]] = {}
    for name, extra in variants.items():
        breaks_before = dict(counters["unimplemented"])
        graphs_before = counters["stats"]["unique_graphs"]

        def run(n: int, extra: dict = extra) -> Any:
            return generate(b, batch, n, volume_encoding=encoding, min_new_tokens=n, **extra)

        first_s, _ = time_once(lambda run=run: run(n2), b.device)  # compiles, if it compiles
        for _ in range(s.warmup):
            run(n1)
            run(n2)
        per_token = []
        for _ in range(s.repeats):
            t1, _ = time_once(lambda run=run: run(n1), b.device)
            t2, out = time_once(lambda run=run: run(n2), b.device)
            per_token.append(max(t2 - t1, 0.0) / (n2 - n1))
        stats = summarize(per_token)
        tokens[name] = out.sequences[0, prompt:].tolist()
        results[name] = {
            "ms_per_token": stats,
            "tokens_per_s": round(1e3 / stats["median_ms"], 2) if stats["median_ms"] > 0 else None,
            "first_call_s": round(first_s, 3),
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs_before,
            "graph_breaks": _new_graph_breaks(breaks_before),
        }
    base = results["dynamic"]["ms_per_token"]
    for r in results.values():
        r["speedup_vs_dynamic"] = speedup(base, r["ms_per_token"])
    record: dict[str, Any] = {"prompt_tokens": prompt, "timed_tokens": n2 - n1, "variants": results}
    record["tokens_equal"] = all(t == tokens["dynamic"] for t in tokens.values())
    bytes_ = decode_bytes(model, prompt + n2)
    record.update(bytes_)
    if b.hardware.bandwidth:
        bound = (bytes_["weight_bytes"] + bytes_["kv_bytes"]) / b.hardware.bandwidth * 1e3
        record["bound_ms_per_token"] = round(bound, 3)
        for r in results.values():
            r["ratio_to_bound"] = round(r["ms_per_token"]["median_ms"] / bound, 2)
        record["target_ms_per_token"] = round(2 * bound, 3)  # issue 16: >= 50% of the bandwidth bound
        record["target_met"] = {
            name: r["ms_per_token"]["median_ms"] <= 2 * bound for name, r in results.items()
        }
    b.emit(record_name, **record)


def _new_graph_breaks(before: dict[str, int]) -> list[str]:
    """Reasons (first line and source line) of the graph breaks torch.compile met since ``before``."""
    from torch._dynamo.utils import counters

    reasons = []
    for text, count in counters["unimplemented"].items():
        if count > before.get(text, 0):
            lines = text.splitlines()
            where = next((ln.strip() for ln in lines if ln.strip().startswith("# File")), "")
            reasons.append(f"{lines[0]} {where}".strip())
    return reasons


def bench_decode_compile(b: Bench) -> None:
    """Only the dynamic-cache and static-cache + torch.compile variants (the slow-to-start one)."""
    bench_decode(b, ("dynamic", "static+compile"))


def bench_decode_batch1(b: Bench) -> None:
    """Decode per token at batch 1: the default predictor (dynamic cache) vs `Med2E3Predictor(compile=True)`,
    beside the weight-bandwidth bound and the target of 2x the bound (issue 16)."""
    bench_decode(b, ("dynamic", "predictor"), record_name="decode_batch1")


# time to first token targets (issue 16): encode + TG-IS + prefill of one question, ms; first name match wins
TTFT_TARGETS_MS: tuple[tuple[str, float], ...] = (("H200", 25.0), ("H100", 35.0))


@torch.no_grad()
def bench_ttft(b: Bench) -> None:
    """Time to first token of one question about a newly loaded volume (preprocessed beforehand): encode +
    TG-IS + prefill, i.e. `Med2E3Predictor._encode` then `ask(max_new_tokens=1)`; the default predictor vs
    ``compile=True`` (encoders and TG-IS replayed from CUDA graphs on CUDA; eager on CPU). Also each part.
    """
    s, model = b.settings, b.model
    default = Med2E3Predictor(model, b.processor)
    start = time.perf_counter()
    compiled = Med2E3Predictor(model, b.processor, compile=True)  # records the graphs on CUDA
    warm_s = time.perf_counter() - start
    volume = default._prepare(synthetic_ct(s.raw_shape, seed=0))
    question = QUESTIONS[0]
    repeats = 2 * s.repeats if b.device.type == "cuda" else s.repeats  # cheap on a GPU: more repeats

    def first_token(p: Med2E3Predictor) -> Any:
        p._encode(*volume)
        return p.ask(question, max_new_tokens=1)

    stats, out = compare(
        {"default": partial(first_token, default), "compiled": partial(first_token, compiled)},
        b.device,
        repeats,
        max(1, s.warmup),
    )
    parts: dict[str, Any] = {}
    for name, p in (("default", default), ("compiled", compiled)):
        loaded = p._encode(*volume)
        batch = p._inputs([question])
        q = batch.get("question_input_ids"), batch.get("question_attention_mask")
        parts[name] = {
            "encode": measure(partial(p._encode, *volume), b.device, repeats, 1)[0],
            "tgis": measure(partial(p.visual_tokens, loaded.encoding, *q), b.device, repeats, 1)[0],
        }
    target = next((ms for key, ms in TTFT_TARGETS_MS if key in b.hardware.name), None)
    graphs = {
        name: {"recorded": call.recorded, "failures": call.failures}
        for name, call in (("encoders", compiled._encoder), ("tgis", compiled._visual))
        if isinstance(call, GraphedCall)
    }
    b.emit(
        "ttft",
        question_tokens=b.processor.question_length(question),
        prompt_tokens=b.processor.prompt_length(question),
        **stats,
        speedup=speedup(stats["default"], stats["compiled"]),
        parts=parts,
        compiled_warm_s=round(warm_s, 2),
        graphs=graphs or None,
        target_ms=target,
        target_met=None if target is None else stats["compiled"]["median_ms"] <= target,
        same_first_token=out["default"].answer == out["compiled"].answer,
        max_score_abs_diff=None
        if out["default"].slice_scores is None
        else max_diff(torch.tensor(out["default"].slice_scores), torch.tensor(out["compiled"].slice_scores)),
    )
    default.current = compiled.current = None


@torch.no_grad()
def bench_questions(b: Bench) -> None:
    """N questions about one volume, from the file-level volume to the answers.

    naive: preprocess once, then `generate(pixel_values=...)` per question (re-encodes the volume);
    cached: `Med2E3Predictor.load` once, `ask` per question; optimised: `load` once, one `ask_many`.
    """
    s, model = b.settings, b.model
    volume = synthetic_ct(s.raw_shape, seed=0)
    size = tuple(model.config.vision3d_config.image_size)
    predictor = Med2E3Predictor(model, b.processor)

    def naive(qs: list[str]) -> list[tuple[str, torch.Tensor]]:
        pixel_values = prepare_volume(volume, size)[None].to(b.device, model.dtype)
        answers = []
        for q in qs:
            batch = inputs(b, [q])
            out = generate(b, batch, s.new_tokens, pixel_values=pixel_values)
            text = b.processor.decode(out.sequences[0, batch["input_ids"].shape[1] :])
            answers.append((text, out.slice_scores[0].float().cpu()))
        return answers

    def cached(qs: list[str]) -> list[Any]:
        predictor.load(volume)
        return [predictor.ask(q, max_new_tokens=s.new_tokens) for q in qs]

    def optimised(qs: list[str]) -> list[Any]:
        predictor.load(volume)
        return predictor.ask_many(qs, max_new_tokens=s.new_tokens)

    for n in s.question_counts:
        qs = questions(n)
        stats, out = compare(
            {"naive": partial(naive, qs), "cached": partial(cached, qs), "optimised": partial(optimised, qs)},
            b.device,
            s.table_repeats,
            s.table_warmup,
        )
        naive_texts = [t for t, _ in out["naive"]]
        diff = max(
            max_diff(torch.tensor(a.slice_scores), sc)
            for a, (_, sc) in zip(out["optimised"], out["naive"], strict=True)
        )
        b.emit(
            "questions",
            n_questions=n,
            new_tokens=s.new_tokens,
            per_question_ms={
                k: round(stats[k]["median_ms"] / n, 3) for k in ("naive", "cached", "optimised")
            },
            speedup_cached=speedup(stats["naive"], stats["cached"]),
            answers_equal=[a.answer for a in out["optimised"]] == naive_texts
            and [a.answer for a in out["cached"]] == naive_texts,
            max_score_abs_diff=diff,
            **stats,
        )
    predictor.current = None


@torch.no_grad()
def bench_batch(b: Bench) -> None:
    """B volumes with one question each (preprocessed already): one at a time vs batched."""
    s, model = b.settings, b.model
    for size in s.batch_sizes:
        volumes = prepared(model, range(size), s.raw_shape)
        stats, _ = compare(
            {
                "naive": lambda v=volumes: [model.encode_volume(v[i : i + 1]) for i in range(len(v))],
                "optimised": lambda v=volumes: model.encode_volume(v),
            },
            b.device,
            s.table_repeats,
            s.table_warmup,
        )
        b.emit("batch_encode", volumes=size, per_volume_ms=_per(stats, size), **stats)

        qs = questions(size)

        def one_by_one(v: torch.Tensor = volumes, qs: list[str] = qs) -> list[list[int]]:
            answers = []
            for i, q in enumerate(qs):
                batch = inputs(b, [q])
                out = generate(b, batch, s.new_tokens, volume_encoding=model.encode_volume(v[i : i + 1]))
                answers.append(answer_ids(out.sequences[0, batch["input_ids"].shape[1] :], b.eos))
            return answers

        def batched(v: torch.Tensor = volumes, qs: list[str] = qs) -> list[list[int]]:
            batch = inputs(b, qs)
            out = generate(b, batch, s.new_tokens, volume_encoding=model.encode_volume(v))
            return [answer_ids(row, b.eos) for row in out.sequences[:, batch["input_ids"].shape[1] :]]

        stats, out = compare(
            {"naive": one_by_one, "optimised": batched}, b.device, s.table_repeats, s.table_warmup
        )
        b.emit(
            "batch_answer",
            volumes=size,
            new_tokens=s.new_tokens,
            per_volume_ms=_per(stats, size),
            volumes_per_s={k: round(size * 1e3 / stats[k]["median_ms"], 2) for k in ("naive", "optimised")},
            answers_equal=out["naive"] == out["optimised"],
            **stats,
        )
        del volumes
        release_memory(b.device)


@torch.no_grad()
def bench_batch_mode(b: Bench) -> None:
    """Batch mode end to end: V volume files x Q questions into a JSONL.

    naive: per row, read + preprocess + `generate(pixel_values=...)`; optimised: `Med2E3Predictor.run_batch`
    (the project's batch mode, whatever it does today).
    """
    s, model = b.settings, b.model
    size = tuple(model.config.vision3d_config.image_size)
    predictor = Med2E3Predictor(model, b.processor)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for v in range(s.batch_mode_volumes):
            path = str(Path(tmp) / f"volume{v}.npy")
            np.save(path, synthetic_ct(s.raw_shape, seed=v).array)
            rows += [
                {"id": f"{v}-{i}", "volume": path, "question": q}
                for i, q in enumerate(questions(s.batch_mode_questions))
            ]

        def naive() -> dict[str, str]:
            answers = {}
            for row in rows:
                pixel_values = prepare_path(row["volume"], size)[None].to(b.device, model.dtype)
                batch = inputs(b, [row["question"]])
                out = generate(b, batch, s.new_tokens, pixel_values=pixel_values)
                answers[row["id"]] = b.processor.decode(out.sequences[0, batch["input_ids"].shape[1] :])
            return answers

        def optimised() -> dict[str, str]:
            out = Path(tmp) / "answers.jsonl"
            out.unlink(missing_ok=True)  # a fresh run, not a resumed one
            predictor.run_batch(rows, out, max_new_tokens=s.new_tokens, progress=False)
            return {r["id"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}

        stats, out = compare(
            {"naive": naive, "optimised": optimised}, b.device, s.table_repeats, s.table_warmup
        )
    b.emit(
        "batch_mode",
        volumes=s.batch_mode_volumes,
        questions_per_volume=s.batch_mode_questions,
        new_tokens=s.new_tokens,
        raw_shape=list(s.raw_shape),
        per_row_ms=_per(stats, len(rows)),
        answers_equal=out["naive"] == out["optimised"],
        **stats,
    )
    predictor.current = None


def _per(stats: dict[str, Any], n: int) -> dict[str, float]:
    return {k: round(stats[k]["median_ms"] / n, 3) for k in ("naive", "optimised")}


@torch.no_grad()
def bench_depth(b: Bench) -> None:
    """Cost of each stage at volume depth 32 vs 64 slices (a 64-slice config; same widths)."""
    baseline: dict[str, float] = {}
    for depth in b.settings.depths:
        if depth == b.model.config.num_slices:
            model, processor = b.model, b.processor
        else:
            model, processor = build_model(b.preset, b.device, b.dtype, depth=depth)
        stats, prompt_tokens = _depth_stages(b, model, processor)
        baseline = baseline or {name: st["median_ms"] for name, st in stats.items()}
        b.emit(
            "depth",
            depth=depth,
            image_tokens=model.config.num_image_tokens,
            prompt_tokens=prompt_tokens,
            ratio_to_first={k: round(st["median_ms"] / max(baseline[k], 1e-9), 3) for k, st in stats.items()},
            **stats,
        )
        if model is not b.model:
            del model
            release_memory(b.device)


def _depth_stages(
    b: Bench, model: Med2E3ForConditionalGeneration, processor: Med2E3Processor
) -> tuple[dict[str, dict], int]:
    """Stats of encode, TG-IS, prefill and a whole answer for one question; and the prompt length."""
    s = b.settings
    volume = prepared(model, [0], s.raw_shape)
    encoding = model.encode_volume(volume)
    batch = to_device(processor([QUESTIONS[0]], padding_side="left"), b.device)
    q = (batch.get("question_input_ids"), batch.get("question_attention_mask"))
    image_embeds, scores = model.visual_tokens(encoding, *q)
    parts = {
        "encode": lambda: model.encode_volume(volume),
        "tgis": lambda: model.visual_tokens(encoding, *q),
        "prefill": lambda: model(
            **batch, image_embeds=image_embeds, slice_scores=scores, use_cache=True, logits_to_keep=1
        ),
        "answer": lambda: generate(b, batch, s.new_tokens, model=model, volume_encoding=encoding),
    }
    # always warm up: a model of a new depth has new shapes (kernel choice, allocator growth)
    stats = {
        name: measure(fn, b.device, s.table_repeats, max(1, s.table_warmup))[0] for name, fn in parts.items()
    }
    return stats, batch["input_ids"].shape[1]


@torch.no_grad()
def bench_compiled(b: Bench) -> None:
    """N questions about one volume: `Med2E3Predictor(compile=True)` (static KV cache, compiled decoding)
    against the default predictor on the same model; the first (compiling) call is reported apart."""
    s, model = b.settings, b.model
    volume = synthetic_ct(s.raw_shape, seed=0)

    def answer(predictor: Med2E3Predictor, n: int) -> list[Any]:
        predictor.load(volume)
        return predictor.ask_many(questions(n), max_new_tokens=s.new_tokens)

    eager = Med2E3Predictor(model, b.processor)
    compiled = Med2E3Predictor(model, b.processor, compile=True)
    for n in sorted({min(s.question_counts), max(s.question_counts)}):
        eager_stats, reference = measure(partial(answer, eager, n), b.device, s.table_repeats, 1)
        first_s, _ = time_once(partial(answer, compiled, n), b.device)  # compiles for this batch size
        stats, out = measure(partial(answer, compiled, n), b.device, s.table_repeats, 0)
        b.emit(
            "compiled_questions",
            n_questions=n,
            new_tokens=s.new_tokens,
            first_call_s=round(first_s, 2),
            eager=eager_stats,
            compiled=stats,
            speedup=speedup(eager_stats, stats),
            same_answers=sum(a.answer == r.answer for a, r in zip(out, reference, strict=True)),
            max_score_abs_diff=max(
                max_diff(torch.tensor(a.slice_scores), torch.tensor(r.slice_scores))
                for a, r in zip(out, reference, strict=True)
            )
            if reference[0].slice_scores is not None
            else None,
        )
    compiled.current = eager.current = None


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "equivalence": bench_equivalence,
    "preprocess": bench_preprocess,
    "encoders": bench_encoders,
    "prefill": bench_prefill,
    "decode": bench_decode,
    "questions": bench_questions,
    "batch": bench_batch,
    "batch_mode": bench_batch_mode,
    "depth": bench_depth,
}
EXTRA_SECTIONS: dict[str, Callable[[Bench], None]] = {
    "ttft": bench_ttft,
    "decode_batch1": bench_decode_batch1,
    "decode_compile": bench_decode_compile,
    "compiled": bench_compiled,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    names = selected(args.only, {**SECTIONS, **EXTRA_SECTIONS}) if args.only else list(SECTIONS)
    bench = make_bench(args, "inference")
    bench.emit("machine", **machine_info(bench.device, bench.hardware, command("benchmarks.inference", argv)))
    run_sections(bench, {**SECTIONS, **EXTRA_SECTIONS}, names)


if __name__ == "__main__":
    main()
