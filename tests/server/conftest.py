"""Fixtures for the server tests: a tiny random model, its predictor, app clients, a live server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_helpers import running_server

from med2e3.inference import Med2E3Predictor
from med2e3.server import ServerSettings, create_app

LOOPBACK = "http://127.0.0.1"
FAST = {"max_new_tokens": 8, "report_max_new_tokens": 8}


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="session")
def predictor(model_dir: Path) -> Med2E3Predictor:
    return Med2E3Predictor.from_pretrained(model_dir, device="cpu")


@pytest.fixture
def make_client(predictor: Med2E3Predictor) -> Iterator[Callable[..., object]]:
    """Open TestClients on fresh apps: ``make_client(**settings)``; all are closed (and their uploads deleted) after the test."""
    from fastapi.testclient import TestClient

    opened = []

    def make(
        base_url: str = LOOPBACK, raise_server_exceptions: bool = True, **settings: object
    ) -> TestClient:
        app = create_app(predictor, ServerSettings(**{**FAST, **settings}), model_name="tiny")
        client = TestClient(app, base_url=base_url, raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., object]) -> object:
    return make_client()


@pytest.fixture
def live_server(predictor: Med2E3Predictor) -> Iterator[str]:
    with running_server(predictor, max_new_tokens=24, report_max_new_tokens=24) as url:
        yield url
