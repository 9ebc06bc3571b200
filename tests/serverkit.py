"""What the server tests share: a client of a fresh app, and checks of its replies (errors,
readiness, server-sent events, Prometheus metrics), each read by the test, not by the server's code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from rnnlm.serve.runtime import LanguageModel
from rnnlm.serve.server import ServerSettings, create_app

from rnnlm.errors import RnnlmError

REL = 1e-6  # batched scoring may round float32 sums differently from scoring alone


@contextmanager
def serve(model: Any, **settings: Any) -> Iterator[TestClient]:
    """A client of a fresh app (own scheduler, own metrics), its lifespan running."""
    with TestClient(create_app(model, ServerSettings(**settings)), raise_server_exceptions=False) as client:
        yield client


def scheduler_of(client: TestClient) -> Any:
    return client.app.state.rnnlm.scheduler  # type: ignore[attr-defined]


def assert_error(r: Any, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def assert_ready(client: TestClient) -> None:
    r = client.get("/v2/health/ready")
    assert (r.status_code, r.json()) == (200, {"ready": True})


def refusal(fn: Callable[[], Any]) -> str:
    """The message the CLI would give for the same values (the same function, one code path)."""
    with pytest.raises(RnnlmError) as info:
        fn()
    return info.value.message


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events as (event, data), parsed by the test: blocks of ``field: value`` lines."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) == {"event", "data"}, block
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus text, read by prometheus_client's parser; None if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def api_generate(lm: LanguageModel, body: dict[str, Any]) -> list[str]:
    return lm.generate(body.get("prompt", ""), max_new_tokens=body.get("max_tokens", 50),
                       temperature=body.get("temperature", 1.0), top_k=body.get("top_k"), top_p=body.get("top_p"),
                       seed=body.get("seed"), num_samples=body.get("n", 1), stop_at_eos=body.get("stop", True))
