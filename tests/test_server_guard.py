"""The server's body guard: slow, short and oversized request bodies, driven through the ASGI
interface directly, as no well-behaved HTTP client sends them. Expected outcomes come from the
test's own messages and clocks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from rnnlm.serve.runtime import LanguageModel
from rnnlm.serve.server import ServerSettings, create_app
from serverkit import asgi_post, body_msg


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


@pytest.fixture
def bare_app(lm: LanguageModel) -> Any:
    """An app whose lifespan has not run: what passes the guard gets 503 (no model yet)."""
    return create_app(lm, ServerSettings(timeout=0.3, max_body_bytes=1000))


def test_guard_passes_a_whole_body(bare_app: Any) -> None:
    data = b'{"text": "the market"}'
    status, _, body, _ = asgi_post(bare_app, [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(data)).encode())],
                                   [body_msg(data[:5], True), body_msg(data[5:])])
    assert status == 503 and "not loaded" in json.loads(body)["error"]  # past the guard


def test_guard_refuses_a_body_shorter_than_its_length(bare_app: Any) -> None:
    data = b'{"text": "the market"}'
    status, _, body, _ = asgi_post(bare_app, [(b"content-type", b"application/json"), (b"content-length", b"40")],
                                   [body_msg(data)])
    assert status == 400
    assert json.loads(body)["error"] == f"the body is {len(data)} bytes but its Content-Length says 40"


def test_guard_times_out_a_body_that_never_completes(bare_app: Any) -> None:
    t0 = time.monotonic()
    status, headers, body, _ = asgi_post(bare_app, [(b"content-type", b"application/json"),
                                                    (b"content-length", b"40")], [body_msg(b'{"text": ', True)])
    elapsed = time.monotonic() - t0
    assert status == 408 and "0.3 s" in json.loads(body)["error"]
    assert headers.get("connection") == "close"
    assert 0.25 < elapsed < 10


def test_guard_refuses_a_client_that_disconnects(bare_app: Any) -> None:
    async def disconnect() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    status, _, body, _ = asgi_post(bare_app, [(b"content-type", b"application/json")], [body_msg(b'{"te', True)],
                                   then=disconnect)
    assert status == 400 and "disconnected" in json.loads(body)["error"]


def test_guard_refuses_a_declared_length_over_the_limit_unread(bare_app: Any) -> None:
    status, headers, body, taken = asgi_post(bare_app, [(b"content-type", b"application/json"),
                                                        (b"content-length", b"5000")], [body_msg(b"x" * 5000)])
    assert (status, taken) == (413, 0)  # refused before a byte was read
    assert headers.get("connection") == "close" and "5,000" in json.loads(body)["error"]


def test_guard_stops_reading_a_chunked_body_at_the_limit(bare_app: Any) -> None:
    chunks = [body_msg(b"x" * 400, True) for _ in range(10)]
    status, _, body, taken = asgi_post(bare_app, [(b"content-type", b"application/json")], chunks)
    assert (status, taken) == (413, 3)  # 1,200 bytes > 1,000: the other 2,800 never read
    assert "1,000" in json.loads(body)["error"]


def test_guard_refuses_a_length_that_is_not_a_number(bare_app: Any) -> None:
    status, _, body, _ = asgi_post(bare_app, [(b"content-type", b"application/json"), (b"content-length", b"ten")],
                                   [body_msg(b"{}")])
    assert status == 400 and "Content-Length" in json.loads(body)["error"]
