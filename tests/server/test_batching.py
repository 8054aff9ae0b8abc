"""Questions that wait in the model queue together are answered in one batched generation (issue 16)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
from server_helpers import npy_bytes, upload

Request = tuple[str, str, dict]  # (path under /api/volumes/{id}/, volume id, JSON body)


@pytest.fixture
def batch_sizes(predictor, monkeypatch) -> list[int]:
    """The number of questions of every `ask_batch` call the server makes."""
    sizes: list[int] = []
    original = predictor.ask_batch
    monkeypatch.setattr(
        predictor, "ask_batch", lambda qs, *a, **kw: sizes.append(len(qs)) or original(qs, *a, **kw)
    )
    return sizes


def _send(client, path: str, vid: str, body: dict) -> tuple[int, dict]:
    """(status, body); a stream's body is its final event's data with the joined pieces as 'streamed'."""
    if not path.endswith("stream"):
        response = client.post(f"/api/volumes/{vid}/{path}", json=body)
        return response.status_code, response.json()
    with client.stream("POST", f"/api/volumes/{vid}/{path}", json=body) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(response.read())
        blocks = response.read().decode().strip().split("\n\n")
    events = [
        (head.removeprefix("event: "), json.loads(data.removeprefix("data: ")))
        for head, data in (block.split("\n", 1) for block in blocks)
    ]
    kind, final = events[-1]
    pieces = "".join(data["text"] for k, data in events[:-1] if k == "piece")
    return (200 if kind == "answer" else 0), {**final, "streamed": pieces}


def _while_busy(client, requests: list[Request], queued: int, meanwhile: Callable[[], object] = lambda: None):
    """Send ``requests`` at once while the model thread is held, wait until ``queued`` of them are in the
    queue, call ``meanwhile``, then let the model go; the responses in order."""
    server = client.app.state.server
    release = threading.Event()
    server.queue.submit(release.wait, 30)
    results: list[tuple[int, dict] | None] = [None] * len(requests)

    def send(i: int) -> None:
        results[i] = _send(client, *requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while server.queue.pending < 1 + queued:
            assert time.monotonic() < deadline, "the requests did not reach the queue"
            time.sleep(0.02)
        meanwhile()
    finally:
        release.set()
    for thread in threads:
        thread.join(60)
    return results


def test_waiting_questions_are_answered_together_like_one_at_a_time(make_client, batch_sizes) -> None:
    """Questions about three uploads, with different lengths, asked and streamed, wait together and are
    answered in one generation: the same greedy answers (fp32, CPU) and slice scores as one at a time."""
    client = make_client(max_batch=8, max_waiting=8)
    vids = [upload(client, npy_bytes(seed=seed)).json()["id"] for seed in range(3)]
    requests: list[Request] = [
        ("ask", vids[0], {"question": "Which organ?"}),
        ("ask", vids[1], {"question": "Which organ?", "max_new_tokens": 3}),
        ("ask/stream", vids[2], {"question": "Where is the lesion?"}),
        ("report", vids[1], {}),
        ("ask/stream", vids[0], {"question": "Is the liver normal?", "max_new_tokens": 5}),
        ("ask", vids[2], {"question": "Which organ?"}),
    ]
    together = _while_busy(client, requests, queued=len(requests))
    assert batch_sizes == [len(requests)]
    alone = [_send(client, *request) for request in requests]
    assert batch_sizes == [len(requests)] + [1] * len(requests)
    for (status, got), (_, want), (path, _, _) in zip(together, alone, requests, strict=True):
        assert status == 200, got
        assert got["answer"] == want["answer"]
        assert got["slice_scores"] == pytest.approx(want["slice_scores"], abs=1e-6)
        assert got["slice_ranges"] == want["slice_ranges"]
        if path.endswith("stream"):
            assert got["streamed"] == got["answer"]
    assert len(together[1][1]["answer"].split()) <= 3


@pytest.mark.parametrize(("max_batch", "sizes"), [(3, [3, 3, 1]), (1, [1] * 7)])
def test_batches_are_limited(make_client, batch_sizes, max_batch: int, sizes: list[int]) -> None:
    """At most max_batch questions per generation, in order of arrival; max_batch=1 is one at a time."""
    client = make_client(max_batch=max_batch, max_waiting=8)
    vid = upload(client, npy_bytes()).json()["id"]
    asks: list[Request] = [
        ("ask", vid, {"question": f"Question {i}?", "max_new_tokens": 2}) for i in range(7)
    ]
    results = _while_busy(client, asks, queued=7)
    assert [status for status, _ in results] == [200] * 7
    assert [body["question"] for _, body in results] == [f"Question {i}?" for i in range(7)]
    assert batch_sizes == sizes


def test_a_bad_request_fails_alone_and_the_batch_is_answered(make_client, batch_sizes) -> None:
    """While the model is busy, one upload is deleted and another's file is damaged (its encoding left
    the cache): their questions get 404 and 400, a question too long for the LLM gets 400 before it
    queues, and the good questions around them are answered in one batch."""
    client = make_client(max_batch=8, max_waiting=8, max_loaded=2)
    store = client.app.state.server.store
    damaged = upload(client, npy_bytes(seed=1)).json()["id"]
    deleted, good, other = (upload(client, npy_bytes(seed=s)).json()["id"] for s in (2, 3, 4))
    assert store.loaded(damaged) is None  # encoded again on use, from its file
    too_long = "".join(chr(0x4E00 + (i * 37) % 2000) for i in range(1500))
    requests: list[Request] = [
        ("ask", good, {"question": "Which organ?"}),
        ("ask", deleted, {"question": "Which organ?"}),
        ("ask/stream", damaged, {"question": "Which organ?"}),
        ("ask", damaged, {"question": "Where?"}),
        ("ask/stream", other, {"question": "Where?"}),
        ("ask", other, {"question": too_long}),
        ("report", good, {}),
    ]

    def break_two() -> None:
        assert client.delete(f"/api/volumes/{deleted}").status_code == 204
        store.get(damaged).source.write_bytes(b"not a volume")

    results = _while_busy(client, requests, queued=6, meanwhile=break_two)
    statuses = [status for status, _ in results]
    assert statuses == [200, 404, 0, 400, 200, 400, 200], results
    assert "was never uploaded, was deleted, or expired" in results[1][1]["error"]
    assert results[2][1]["error"] == results[3][1]["error"]  # the stream's error event: the same reason
    assert results[3][1]["error"].startswith("volume.bin: ") and "/tmp" not in results[3][1]["error"]
    assert "too long for the language model" in results[5][1]["error"]
    assert batch_sizes == [3]  # the three good questions, together
    assert results[4][1]["streamed"] == results[4][1]["answer"]
