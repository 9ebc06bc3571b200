"""Sessions: a text scored in pieces equals the whole text scored at once, through the Python API
(``LanguageModel.context`` / ``score_context`` / ``export_context`` / ``import_context``) and the
HTTP endpoints; exported states that are altered, truncated or foreign are refused with the reason.

Expected values: ``lm.score`` of the whole text, and ``rnnlm score --json`` (the CLI) on the whole
PTB valid file; the refusals' triggers are made by the test on the exported JSON.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import Built
from fastapi.testclient import TestClient
from rnnlm.serve import LanguageModel
from rnnlm.serve.portable import state_digest
from rnnlm.serve.runtime import StateError
from rnnlm.serve.server import ServerSettings, create_app
from test_server import metric

TEXT = ("the stock market fell\nshares of the zebra company rose\n"  # zebra: out of vocabulary
        "the bank said prices of bonds rose for a new year\ntraders said the market was new\n")


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


@pytest.fixture(scope="module")
def client(lm: LanguageModel) -> Iterator[TestClient]:
    with TestClient(create_app(lm, ServerSettings(max_sessions=8)), raise_server_exceptions=False) as c:
        yield c


def cuts(text: str, pieces: int, seed: int) -> list[str]:
    """``text`` cut at ``pieces - 1`` random whitespace positions (a space or a newline)."""
    spaces = [i for i, ch in enumerate(text) if ch in " \n" and 0 < i < len(text) - 1]
    at = sorted(random.Random(seed).sample(spaces, pieces - 1))
    return [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]


# ------------------------------------------------------------------------------ the Python API


def test_pieces_equal_the_whole(lm: LanguageModel) -> None:
    whole = lm.score(TEXT, per_token=True)
    for seed in range(5):
        ctx, nll, tokens, oov = lm.context(), 0.0, [], 0
        for piece in cuts(TEXT, 7, seed):
            result, ctx = lm.score_context(ctx, piece, per_token=True)
            nll, oov = nll + result.nll, oov + result.oov
            assert result.per_token is not None
            tokens += result.per_token
        assert ctx.tokens == whole.tokens == len(tokens) and oov == whole.oov == 1
        assert [t for t, _, _ in tokens] == [t for t, _, _ in whole.per_token or []]
        np.testing.assert_allclose([v for _, v, _ in tokens], [v for _, v, _ in whole.per_token or []], atol=1e-6)
        assert nll == pytest.approx(whole.nll, rel=1e-6)


def test_fork_and_export_import(lm: LanguageModel) -> None:
    _, ctx = lm.score_context(lm.context(), "the stock market ")
    fork = ctx.fork()
    a, ctx = lm.score_context(ctx, "fell\n")
    b, _ = lm.score_context(fork, "fell\n")  # the fork did not move with the original
    assert a.nll == b.nll and fork.tokens == 3
    exported = json.loads(json.dumps(lm.export_context(ctx)))  # as it travels
    back = lm.import_context(exported)
    assert (back.tokens, back.last) == (ctx.tokens, ctx.last) == (5, lm.eos_id)
    for name, arr in ctx.state.arrays.items():
        assert np.array_equal(back.state.arrays[name], arr)  # bit for bit
    # The state after "...fell\n" predicts the next line as a fresh sentence would, after <eos>.
    c, _ = lm.score_context(back, "shares rose\n")
    assert c.nll == pytest.approx(lm.score("the stock market fell\nshares rose").nll - a.nll - lm.score_context(
        lm.context(), "the stock market ")[0].nll, rel=1e-6)


def refusal(lm: LanguageModel, exported: Any) -> str:
    with pytest.raises(StateError) as info:
        lm.import_context(exported)
    return info.value.message


def redigest(exported: dict[str, Any], data: bytes) -> dict[str, Any]:
    """The export with other bytes and a digest that agrees: only the later checks can refuse it."""
    out = {**exported, "state": base64.b64encode(data).decode()}
    out["sha256"] = state_digest(out, data)
    return out


def test_bad_states_are_refused_with_the_reason(lm: LanguageModel, built: Callable[[str, bool], Built]) -> None:
    _, ctx = lm.score_context(lm.context(), "the stock market fell\n")
    good = lm.export_context(ctx)
    data = base64.b64decode(good["state"])
    flipped = bytearray(data)
    flipped[17] ^= 0x40
    nan = np.frombuffer(data, "<f4").copy()
    nan[3] = np.nan
    rhn = LanguageModel.load(built("rhn", False).bundle, threads=1)
    cases = {
        "altered": ({**good, "state": base64.b64encode(bytes(flipped)).decode()}, "altered"),
        "count changed": ({**good, "tokens": 1}, "altered"),
        "truncated": ({**good, "state": base64.b64encode(data[:-8]).decode()}, "truncated"),
        "not finite": (redigest(good, nan.tobytes()), "not finite"),
        "foreign": (rhn.export_context(rhn.context()), "another model"),
        "other shapes": ({**good, "shapes": {"state.0.h": [1, 64]}}, "shapes"),
        "bad base64": ({**good, "state": "not base64!"}, "base64"),
        "bad last token": ({**good, "last_token": len(lm.vocab)}, "last_token"),
        "not a state": ({"hello": 1}, "not an exported state"),
        "a list": ([1, 2], "not an exported state"),
    }
    for case, (exported, words) in cases.items():
        assert words in refusal(lm, exported), case
    assert lm.import_context(good).tokens == 5  # the untouched one still imports


# ------------------------------------------------------------------------------ over HTTP


def test_ptb_valid_in_50_pieces_through_a_session(client: TestClient, lstm_bundle: Path) -> None:
    data = Path(os.environ.get("RNNLM_DATA_DIR", "/work/shared/data/ptb")) / "ptb.valid.txt"
    if not data.is_file():
        pytest.skip(f"no PTB valid split at {data} (set RNNLM_DATA_DIR)")
    text = data.read_text(encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "rnnlm", "score", str(data), "--model", str(lstm_bundle), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want = json.loads(proc.stdout.splitlines()[-1])

    pieces = cuts(text, 50, seed=1)
    sid = client.post("/v1/sessions", json={}).json()["id"]
    total, tokens, oov = 0.0, 0, 0
    for i, piece in enumerate(pieces):
        if i == 25:  # fork, export the fork, import it as a third session, and go on there
            fork = client.post(f"/v1/sessions/{sid}/fork").json()["id"]
            exported = client.get(f"/v1/sessions/{fork}/state").json()
            assert exported["tokens"] == tokens
            moved = client.post("/v1/sessions", json={"state": exported})
            assert moved.status_code == 201 and moved.json()["tokens"] == tokens
            check = client.post(f"/v1/sessions/{sid}/score", json={"text": piece}).json()  # the original goes on too
            for old in (sid, fork):
                assert client.delete(f"/v1/sessions/{old}").status_code == 200
            sid = moved.json()["id"]
        r = client.post(f"/v1/sessions/{sid}/score", json={"text": piece})
        assert r.status_code == 200, r.text
        got = r.json()
        if i == 25:
            assert got["nll"] == check["nll"]  # the imported fork continues exactly as the original
        total, tokens, oov = total + got["nll"], tokens + got["tokens"], oov + got["oov"]
        assert got["session_tokens"] == tokens
    assert (tokens, oov) == (want["tokens"], want["oov"])
    assert total == pytest.approx(want["nll"], rel=1e-6)


def test_session_generate_samples_without_moving(client: TestClient, lm: LanguageModel) -> None:
    sid = client.post("/v1/sessions", json={}).json()["id"]
    client.post(f"/v1/sessions/{sid}/score", json={"text": "the stock market"})
    body = {"max_tokens": 8, "temperature": 0.9, "seed": 4, "n": 2, "stop": False}
    first = client.post(f"/v1/sessions/{sid}/generate", json=body).json()
    assert first == client.post(f"/v1/sessions/{sid}/generate", json=body).json()  # it did not move
    want = lm.generate("the stock market", max_new_tokens=8, temperature=0.9, seed=4, num_samples=2, stop_at_eos=False)
    assert first["samples"] == want and first["tokens"] == 16
    assert client.get(f"/v1/sessions/{sid}/state").json()["tokens"] == 3
    assert client.post(f"/v1/sessions/{sid}/generate", json={"temperature": -1}).status_code == 422
    client.delete(f"/v1/sessions/{sid}")


def test_http_refusals_limits_and_metrics(lm: LanguageModel) -> None:
    with TestClient(create_app(lm, ServerSettings(max_sessions=2, session_ttl=0.5)), raise_server_exceptions=False) as c:
        a = c.post("/v1/sessions", json={}).json()
        good = c.get(f"/v1/sessions/{a['id']}/state").json()
        r = c.post("/v1/sessions", json={"state": {**good, "state": good["state"][:-8]}})
        assert r.status_code == 422 and "truncated" in r.json()["error"]
        assert c.post("/v1/sessions", json={"state": {**good, "bundle_sha256": "0" * 64}}).status_code == 422
        b = c.post("/v1/sessions", json={"state": good})
        assert b.status_code == 201
        full = c.post("/v1/sessions", json={})
        assert full.status_code == 429 and "--max-sessions" in full.json()["error"]
        text = c.get("/metrics").text
        assert metric(text, "rnnlm_sessions") == 2
        per = 4 * sum(s["size"] for s in lm.states)
        assert (metric(text, "rnnlm_session_state_bytes"), metric(text, "rnnlm_sessions_state_bytes")) == (per, 2 * per)
        for path in ("/v1/sessions/nope/score", "/v1/sessions/nope/fork"):
            assert c.post(path, json={"text": "the"} if path.endswith("score") else None).status_code == 404
        assert c.get("/v1/sessions/nope/state").status_code == 404
        time.sleep(0.7)  # both idle past the TTL
        r = c.post(f"/v1/sessions/{a['id']}/score", json={"text": "the"})
        assert r.status_code == 404 and "expired" in r.json()["error"]
        assert metric(c.get("/metrics").text, "rnnlm_sessions_expired_total") == 2
        assert c.post("/v1/sessions", json={}).status_code == 201  # room again


def test_concurrent_calls_on_one_session_take_turns(client: TestClient, lm: LanguageModel) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sid = client.post("/v1/sessions", json={}).json()["id"]
    pieces = ["the stock market fell\n"] * 12
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: client.post(f"/v1/sessions/{sid}/score", json={"text": p}).json(), pieces))
    # No call was lost or read a stale state: the counts are 5, 10, ..., 60 in some order, and the
    # session scored the twelve lines as one text.
    assert sorted(r["session_tokens"] for r in replies) == list(range(5, 61, 5))
    assert sum(r["nll"] for r in replies) == pytest.approx(lm.score("".join(pieces)).nll, rel=1e-6)
    client.delete(f"/v1/sessions/{sid}")
