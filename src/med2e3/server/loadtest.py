"""A bounded load generator for a running server (loopback only): N clients x M questions.

Used by tests/server/test_load.py and benchmarks/server_load.py. Standard library only, besides psutil
for the server's memory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from med2e3.server.settings import is_loopback


@dataclass
class Outcome:
    """One request: HTTP status, seconds, and what was wrong with the response (None if it was fine)."""

    status: int
    seconds: float
    problem: str | None = None


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        answered = [o.seconds for o in self.outcomes if o.status == 200]
        every = [o.seconds for o in self.outcomes]
        return {
            "requests": len(self.outcomes),
            "status": dict(sorted(Counter(o.status for o in self.outcomes).items())),
            "problems": [o.problem for o in self.outcomes if o.problem][:10],
            "wall_s": round(self.wall_s, 3),
            "answers_per_s": round(len(answered) / self.wall_s, 2) if self.wall_s else None,
            "latency_answered_s": percentiles(answered),
            "latency_all_s": percentiles(every),
        }


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 95, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in qs}


class Client:
    """A keep-alive HTTP connection to one loopback server."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 60.0):
        parts = urlsplit(base_url)
        if not is_loopback(parts.hostname or ""):
            raise ValueError(f"load tests only target loopback addresses, not {parts.hostname}")
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()

    def upload(self, data: bytes, name: str = "volume.npy") -> dict:
        boundary = secrets.token_hex(12)
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, _, raw = self.request(
            "POST", "/api/volumes", body, f"multipart/form-data; boundary={boundary}"
        )
        if status != 201:
            raise RuntimeError(f"upload failed: {status} {raw[:200]!r}")
        return json.loads(raw)

    def ask(self, volume_id: str, question: str, max_new_tokens: int | None = None) -> tuple[int, bytes]:
        payload = {"question": question, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {})}
        status, _, raw = self.request(
            "POST", f"/api/volumes/{volume_id}/ask", json.dumps(payload).encode(), "application/json"
        )
        return status, raw

    def close(self) -> None:
        self.conn.close()


def check_answer(status: int, raw: bytes, n_slices: int) -> str | None:
    """What is wrong with an /ask response, or None: it must be an answer, or a clean 503 JSON error."""
    try:
        body = json.loads(raw)
    except ValueError:
        return f"{status}: not JSON: {raw[:80]!r}"
    if status == 200:
        scores = body.get("slice_scores")
        if not isinstance(body.get("answer"), str) or scores is None or len(scores) != n_slices:
            return f"200 without an answer and {n_slices} slice scores"
        return None
    if status == 503 and isinstance(body.get("error"), str) and body["error"]:
        return None
    return f"unexpected {status}: {raw[:120]!r}"


def run_load(
    base_url: str,
    volume_id: str | Sequence[str],
    clients: int = 4,
    requests_per_client: int = 20,
    question: str | Sequence[str] = "Which organ shows an abnormality?",
    n_slices: int = 32,
    time_limit_s: float = 120.0,
    backoff_s: float = 0.1,
    token: str | None = None,
) -> LoadResult:
    """``clients`` threads each ask ``requests_per_client`` questions (stopping at ``time_limit_s``).

    Given several volume ids or questions, request ``k`` of all asks about the ``k``-th of each, in turn.
    """
    volume_ids = [volume_id] if isinstance(volume_id, str) else list(volume_id)
    questions = [question] if isinstance(question, str) else list(question)
    result = LoadResult()
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit_s

    def worker(first: int) -> None:
        client = Client(base_url, token)
        try:
            for k in range(first, first + requests_per_client):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    status, raw = client.ask(volume_ids[k % len(volume_ids)], questions[k % len(questions)])
                    outcome = Outcome(
                        status, time.perf_counter() - start, check_answer(status, raw, n_slices)
                    )
                except (OSError, http.client.HTTPException) as err:
                    outcome = Outcome(0, time.perf_counter() - start, f"connection error: {err}")
                with lock:
                    result.outcomes.append(outcome)
                if outcome.status == 503:
                    time.sleep(backoff_s)
        finally:
            client.close()

    started = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(i * requests_per_client,), daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 5)
    result.wall_s = time.perf_counter() - started
    return result


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


@contextlib.contextmanager
def serve_subprocess(
    model: str | Path, *args: str, start_timeout_s: float = 120.0
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``python -m med2e3.server --model MODEL --port 0 ARGS`` on loopback; yield (process, base URL)."""
    command = [
        sys.executable,
        "-m",
        "med2e3.server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = _read_url(process, start_timeout_s)
        drain = threading.Thread(target=process.stdout.read, daemon=True)  # type: ignore[union-attr]
        drain.start()  # the access log must not fill the pipe and block the server
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _read_url(process: subprocess.Popen, timeout_s: float) -> str:
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout_s)
    line = found[0] if found else ""
    if not line.startswith("med2e3 serve: http://"):
        raise RuntimeError(f"the server did not start (exit code {process.poll()}, said {line.strip()!r})")
    return line.split()[2].rstrip("/")
