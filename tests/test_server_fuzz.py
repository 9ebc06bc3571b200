"""Schema-driven fuzzing of the HTTP server with hypothesis: 1,200 requests whose fields are the
schema's own names (and some others) holding values of every JSON type, including NaN, huge
integers, lone surrogates and NUL characters, plus raw byte bodies. None may get a 5xx, every
4xx carries a JSON error, and the server is live and ready at the end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rnnlm.serve import LanguageModel
from rnnlm.serve.server import ServerSettings, create_app

SENT: list[int] = []  # statuses, across the examples of this module

WORDS = st.sampled_from(["the", "stock", "market", "fell", "zzz", "3.5", "<eos>", "<unk>", "N", ""])
TEXTS = st.one_of(
    st.lists(WORDS, max_size=12).map(" ".join),
    st.text(max_size=40),  # any code point, lone surrogates and NUL included
    st.lists(WORDS, max_size=6).map("\n".join),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=12), st.floats(allow_nan=True, allow_infinity=True), TEXTS,
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
SCORE_FIELDS = {"text": st.one_of(TEXTS, VALUES), "lines": st.one_of(st.lists(TEXTS, max_size=5), VALUES),
                "per_token": st.one_of(st.booleans(), VALUES)}
GENERATE_FIELDS = {
    "prompt": st.one_of(TEXTS, VALUES), "max_tokens": st.one_of(st.integers(-1, 40), VALUES),
    "temperature": st.one_of(st.floats(-1, 3), VALUES), "top_k": st.one_of(st.integers(-1, 50), VALUES),
    "top_p": st.one_of(st.floats(-0.5, 1.5), VALUES), "seed": st.one_of(st.integers(-5, 2**65), VALUES),
    "n": st.one_of(st.integers(-1, 6), VALUES), "stop": st.one_of(st.booleans(), VALUES),
    "stream": st.one_of(st.booleans(), VALUES),
}


# Well-typed values in range: the requests that should succeed, fuzzed too.
PLAIN = st.lists(WORDS, min_size=1, max_size=12).map(" ".join)
VALID_SCORE = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(PLAIN, TEXTS)}, optional={"per_token": st.booleans()}),
    st.fixed_dictionaries({"lines": st.lists(st.one_of(PLAIN, TEXTS), min_size=1, max_size=6)},
                          optional={"per_token": st.booleans()}),
)
VALID_GENERATE = st.fixed_dictionaries({}, optional={
    "prompt": PLAIN, "max_tokens": st.integers(1, 40), "temperature": st.floats(0, 2),
    "top_k": st.one_of(st.none(), st.integers(1, 43)), "top_p": st.one_of(st.none(), st.floats(0.01, 1)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)), "n": st.integers(1, 4), "stop": st.booleans(),
    "stream": st.booleans()})


def _bodies(valid: st.SearchStrategy, fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Valid requests; objects with any subset of the schema's fields, well or badly typed;
    the same with an unknown field; and now and then not an object at all."""
    keys = st.lists(st.sampled_from(sorted(fields)), unique=True)
    obj = keys.flatmap(lambda ks: st.fixed_dictionaries({k: fields[k] for k in ks}))
    extra = st.dictionaries(st.text(min_size=1, max_size=6), VALUES, min_size=1, max_size=1)
    return st.one_of(valid, valid, obj, st.builds(lambda a, b: {**b, **a}, obj, extra), VALUES)


@pytest.fixture(scope="module")
def client(lstm_bundle: Path) -> Iterator[TestClient]:
    lm = LanguageModel.load(lstm_bundle, threads=1)
    # A small generation limit keeps 1,200 requests within seconds; the limit itself is a 422.
    app = create_app(lm, ServerSettings(max_generate_tokens=200, timeout=20, max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _check(client: TestClient, path: str, content: bytes, content_type: str = "application/json") -> None:
    r = client.post(path, content=content, headers={"content-type": content_type})
    SENT.append(r.status_code)
    assert r.status_code < 500, (path, content[:300], r.text[:300])
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "event: done" in r.text or "event: error" in r.text
    else:
        assert isinstance(r.json(), dict)


FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=_bodies(VALID_SCORE, SCORE_FIELDS))
def test_fuzz_score(client: TestClient, body: object) -> None:
    _check(client, "/v1/score", json.dumps(body).encode())  # NaN and \ud800 escapes as Python's json writes them


@FUZZ
@given(body=_bodies(VALID_GENERATE, GENERATE_FIELDS))
def test_fuzz_generate(client: TestClient, body: object) -> None:
    _check(client, "/v1/generate", json.dumps(body).encode())


@settings(FUZZ, max_examples=200)
@given(raw=st.one_of(st.binary(max_size=200), st.binary(min_size=4000, max_size=5000)),
       path=st.sampled_from(["/v1/score", "/v1/generate"]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_fuzz_raw_bytes(client: TestClient, raw: bytes, path: str, content_type: str) -> None:
    _check(client, path, raw, content_type)


def test_after_the_fuzz_the_server_is_live_and_ready(client: TestClient, request: pytest.FixtureRequest) -> None:
    fuzzed = sum(item.name.startswith("test_fuzz_") for item in request.session.items)
    if fuzzed == 3:  # this module ran whole: the count is part of the claim
        assert len(SENT) >= 1000, len(SENT)
    assert SENT and all(s < 500 for s in SENT)
    print("statuses:", {s: SENT.count(s) for s in sorted(set(SENT))})
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v1/score", json={"text": "the stock market"}).status_code == 200
