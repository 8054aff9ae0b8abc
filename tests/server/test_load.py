"""Bounded load on loopback: 4 clients x 20 questions against a live uvicorn server.

Every request must end in an answer or a clean 503, the server process's memory must stay bounded,
and its uploads must be gone after it stops. Latency percentiles are printed (run with -s to see
them); benchmarks/server_load.py measures the same against a separate server process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from server_helpers import npy_bytes, running_server

from med2e3.server.loadtest import Client, rss_mb, run_load

CLIENTS = 4
REQUESTS = 20
RSS_GROWTH_LIMIT_MB = 150


def test_bounded_load(predictor, tmp_path: Path) -> None:
    settings = {"max_waiting": 1, "max_new_tokens": 8, "request_timeout_s": 60, "upload_dir": tmp_path}
    with running_server(predictor, **settings) as url:
        client = Client(url)
        volume = client.upload(npy_bytes(shape=(1, 48, 96, 96)))
        for _ in range(3):  # warm up: first calls allocate caches
            assert client.ask(volume["id"], "Which organ shows an abnormality?")[0] == 200
        client.close()
        before = rss_mb(os.getpid())
        result = run_load(url, volume["id"], clients=CLIENTS, requests_per_client=REQUESTS, time_limit_s=60)
        after = rss_mb(os.getpid())
        summary = result.summary()
        print(json.dumps({**summary, "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}))

        assert summary["requests"] == CLIENTS * REQUESTS, "the load did not finish within its time limit"
        assert summary["problems"] == []  # each request: a well-formed answer or a clean 503
        assert set(summary["status"]) <= {200, 503}
        assert summary["status"].get(200, 0) >= REQUESTS  # the server kept answering under load
        assert summary["status"].get(503, 0) > 0  # 4 clients > 1 running + 1 waiting: the queue bound held
        assert after - before < RSS_GROWTH_LIMIT_MB, f"server memory grew {after - before:.0f} MB"
        assert len(list(tmp_path.iterdir())) == 1  # the server's private upload folder
    assert list(tmp_path.iterdir()) == []  # uploads deleted on shutdown
