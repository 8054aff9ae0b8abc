"""Server batching benchmark: questions/s and latency of batching servers against a one-at-a-time one.

`med2e3 serve` processes on loopback run the same model in the same run: one with ``--max-batch 1``
(one question at a time, the server before batching) and one per ``--max-batch N`` given (questions
waiting together are answered in one batched generation). All get the same uploads (16 volumes) and,
for each number of concurrent clients, the same load, one server after the other. Prints one JSON
record per measurement (appended to ``$OUT/server_batch.jsonl`` when ``OUT`` is set). Run from the
repository root::

    python -m benchmarks.server_batch                  # tiny random model, 16-token answers, 1/8/32 clients
    python -m benchmarks.server_batch --clients 1,8 --questions 32 --max-batch 8

Before the load, each server answers one question per volume (a batching one all at once) and the
answers are compared with the one-at-a-time server's: ``answers_equal`` (greedy, fp32 on CPU) and
``max_score_abs_diff`` (TG-IS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import QUESTIONS, Sink, command, cpu_name
from benchmarks.server_load import tiny_model, volume_bytes
from med2e3.server.loadtest import Client, run_load, serve_subprocess

SHAPE = (1, 64, 128, 128)


def upload_volumes(url: str, n: int) -> list[str]:
    client = Client(url)
    try:
        return [client.upload(volume_bytes(SHAPE, seed))["id"] for seed in range(n)]
    finally:
        client.close()


def ask_each(url: str, volume_ids: list[str], at_once: bool) -> list[dict]:
    """One question per volume, all at once (each on its own connection) or one after another."""

    def ask(i: int) -> dict:
        client = Client(url)
        try:
            status, raw = client.ask(volume_ids[i], QUESTIONS[i % len(QUESTIONS)])
        finally:
            client.close()
        if status != 200:
            raise RuntimeError(f"ask failed: {status} {raw[:200]!r}")
        return json.loads(raw)

    if not at_once:
        return [ask(i) for i in range(len(volume_ids))]
    with ThreadPoolExecutor(len(volume_ids)) as pool:
        return list(pool.map(ask, range(len(volume_ids))))


def agreement(batched: list[dict], alone: list[dict]) -> dict:
    """Do the batched server's answers equal the one-at-a-time server's?"""
    diffs = [
        float(np.max(np.abs(np.subtract(a["slice_scores"], b["slice_scores"]))))
        for a, b in zip(batched, alone, strict=True)
    ]
    return {
        "answers_equal": [a["answer"] for a in batched] == [b["answer"] for b in alone],
        "max_score_abs_diff": max(diffs),
    }


def ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a med2e3 model folder (default: a tiny random model)")
    parser.add_argument(
        "--clients", type=ints, default=[1, 8, 32], help="concurrent clients (default 1,8,32)"
    )
    parser.add_argument("--volumes", type=int, default=16, help="uploads the questions are spread over")
    parser.add_argument(
        "--questions", type=int, default=64, help="questions per load, split among the clients"
    )
    parser.add_argument(
        "--max-batch", type=ints, default=[8, 32], help="the batching servers' --max-batch (default 8,32)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads of each server")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for each load")
    args = parser.parse_args(argv)
    sink = Sink("server_batch")
    sink.emit(
        "machine",
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        load_average=[round(x, 2) for x in os.getloadavg()],
        command=command("benchmarks.server_batch", argv),
    )
    sizes = [1, *args.max_batch]
    waiting = max(args.clients) + max(sizes)  # nobody is refused: this measures batching, not 503s
    common = (
        *("--max-new-tokens", str(args.max_new_tokens), "--max-waiting", str(waiting)),
        *("--max-loaded", str(args.volumes), "--threads", str(args.threads), "--device", "cpu"),
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = args.model or tiny_model(Path(tmp) / "tiny")
        urls = {
            size: stack.enter_context(serve_subprocess(model, *common, "--max-batch", str(size)))[1]
            for size in sizes
        }
        volumes = {size: upload_volumes(url, args.volumes) for size, url in urls.items()}
        alone = ask_each(urls[1], volumes[1], at_once=False)
        for size in args.max_batch:
            batched = ask_each(urls[size], volumes[size], at_once=True)
            sink.emit("agreement", max_batch=size, volumes=args.volumes, **agreement(batched, alone))
        for clients in args.clients:
            per_client = math.ceil(args.questions / clients)
            rates = {}
            for size, url in urls.items():
                result = run_load(
                    url, volumes[size], clients, per_client, QUESTIONS, time_limit_s=args.time_limit
                )
                summary = result.summary()
                rates[size] = summary["answers_per_s"]
                sink.emit(
                    "load",
                    max_batch=size,
                    clients=clients,
                    requests_per_client=per_client,
                    volumes=args.volumes,
                    max_new_tokens=args.max_new_tokens,
                    questions_per_s=summary["answers_per_s"],
                    latency_p50_s=summary["latency_answered_s"]["p50"],
                    latency_p95_s=summary["latency_answered_s"]["p95"],
                    **{k: summary[k] for k in ("requests", "status", "problems", "wall_s")},
                    load_average=[round(x, 2) for x in os.getloadavg()],
                )
            sink.emit(
                "compare",
                clients=clients,
                throughput_vs_one_at_a_time={
                    size: round(rates[size] / rates[1], 2) if rates[1] and rates[size] else None
                    for size in args.max_batch
                },
            )


if __name__ == "__main__":
    main()
