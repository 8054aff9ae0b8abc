"""Server load benchmark: a `med2e3 serve` process on loopback under N clients x M questions.

Prints one JSON record (latency percentiles, status counts, server memory) like the other benchmarks
(and appends it to ``$OUT/server_load.jsonl`` when ``OUT`` is set). Run from the repository root::

    python -m benchmarks.server_load                      # a tiny random model made on the fly
    python -m benchmarks.server_load --model runs/demo/model --clients 4 --requests 20

The server runs as a separate process (``python -m med2e3.server``), so its resident memory is
measured alone. Bounded: clients x requests, and --time-limit seconds; loopback only.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Sink
from med2e3.server.loadtest import Client, rss_mb, run_load, serve_subprocess


def tiny_model(folder: Path) -> Path:
    import torch

    from med2e3 import Med2E3Config, Med2E3ForConditionalGeneration, Med2E3Processor

    torch.manual_seed(0)
    config = Med2E3Config.from_preset("tiny")
    Med2E3ForConditionalGeneration(config).save_pretrained(folder)
    Med2E3Processor.for_config(config).save_pretrained(folder)
    return folder


def volume_bytes(shape: tuple[int, ...] = (1, 64, 128, 128), seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a med2e3 model folder (default: a tiny random model)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20, help="questions per client")
    parser.add_argument("--max-waiting", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for the whole load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp) / "tiny")
        server_args = ("--max-waiting", str(args.max_waiting), "--max-new-tokens", str(args.max_new_tokens))
        started = time.perf_counter()
        with serve_subprocess(model, *server_args) as (process, url):
            startup_s = time.perf_counter() - started
            client = Client(url)
            t0 = time.perf_counter()
            volume = client.upload(volume_bytes())
            upload_s = time.perf_counter() - t0
            sequential = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert client.ask(volume["id"], "Which organ shows an abnormality?")[0] == 200
                sequential.append(time.perf_counter() - t0)
            client.close()
            rss_before = rss_mb(process.pid)
            result = run_load(url, volume["id"], args.clients, args.requests, time_limit_s=args.time_limit)
            rss_after = rss_mb(process.pid)
    Sink("server_load").emit(
        "load",
        clients=args.clients,
        requests_per_client=args.requests,
        max_waiting=args.max_waiting,
        max_new_tokens=args.max_new_tokens,
        server_startup_s=round(startup_s, 2),
        upload_and_encode_s=round(upload_s, 3),
        sequential_ask_s=round(float(np.median(sequential[1:])), 4),
        **result.summary(),
        server_rss_mb_before=round(rss_before, 1),
        server_rss_mb_after=round(rss_after, 1),
    )


if __name__ == "__main__":
    main()
