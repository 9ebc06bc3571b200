"""What the server tests share: a client of a fresh app, and checks of its replies (errors,
readiness, server-sent events, Prometheus metrics), each read by the test, not by the server's code."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
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


# ------------------------------------------------------------------- raw ASGI, for bodies no client sends


def asgi_post(app: Any, headers: list[tuple[bytes, bytes]], messages: list[dict[str, Any]],
              then: Callable[[], Awaitable[dict[str, Any]]] | None = None,
              *, lifespan: bool = False) -> tuple[int, dict[str, str], bytes, int]:
    """Call the app as a server would: ``receive`` hands out ``messages``, then awaits ``then``
    (by default, forever). Returns status, headers, body and how many messages were taken.
    ``lifespan`` runs the app's startup first (the model attached) in the same event loop."""
    taken = 0

    async def receive() -> dict[str, Any]:
        nonlocal taken
        if taken < len(messages):
            taken += 1
            return messages[taken - 1]
        if then is not None:
            return await then()
        await asyncio.Event().wait()  # a client that never sends the rest
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80)}

    async def main() -> None:
        if lifespan:
            async with app.router.lifespan_context(app):
                await asyncio.wait_for(app(scope, receive, send), 20)
        else:
            await asyncio.wait_for(app(scope, receive, send), 20)

    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body, taken


def body_msg(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}
