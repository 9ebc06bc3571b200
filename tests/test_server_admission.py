"""The HTTP server in-process under pressure: loading in
the background, admission (429 when full, refusal while draining), timeouts that cancel the work,
and concurrent requests batched into one scoring call yet answered as if alone.

Expected values come from ``LanguageModel`` called directly and from the test's own clocks and
counters; the server's metrics are read through prometheus_client's parser (tests/serverkit.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from bundles import CHUNK, WORDS
from fastapi.testclient import TestClient
from rnnlm.serve.runtime import Cancelled, LanguageModel
from rnnlm.serve.server import ServerSettings, create_app
from serverkit import (
    REL,
    api_generate,
    asgi_post,
    assert_error,
    assert_ready,
    body_msg,
    events,
    metric,
    scheduler_of,
    serve,
    wait_until,
)


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


# ---------------------------------------------------------------- loading, admission, draining


def test_bundle_path_loads_in_the_background(lstm_bundle: Path, lm: LanguageModel,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_load = LanguageModel.load

    def gated_load(path: Any, **kwargs: Any) -> LanguageModel:
        assert gate.wait(30)
        return real_load(path, **kwargs)

    monkeypatch.setattr(LanguageModel, "load", gated_load)
    try:
        with serve(lstm_bundle, threads=1, device="cpu") as client:
            r = client.get("/v2/health/ready")
            assert (r.status_code, r.json()) == (503, {"ready": False, "error": "loading"})
            assert client.get("/v2/health/live").status_code == 200  # alive while loading
            r = client.post("/v1/score", json={"text": "the market"})
            assert assert_error(r, 503) == "the model is not loaded yet" and r.headers["retry-after"]
            assert_error(client.get("/v1/model"), 503)
            gate.set()
            wait_until(lambda: client.get("/v2/health/ready").status_code == 200, "readiness")
            body = {"prompt": "the", "max_tokens": 6, "seed": 4}
            assert client.post("/v1/generate", json=body).json()["samples"] == api_generate(lm, body)
            assert client.get("/v1/model").json()["bundle"] == str(lstm_bundle)
    finally:
        gate.set()


def test_a_bundle_that_fails_to_load(tmp_path: Path) -> None:
    failures: list[str] = []
    app = create_app(tmp_path / "no-bundle-here", ServerSettings(device="cpu"), on_load_failure=failures.append)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: bool(failures), "the load failure")
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False, "error": f"failed: {failures[0]}"})
        message = assert_error(client.post("/v1/score", json={"text": "the"}), 503)
        assert message == f"the model failed to load: {failures[0]}"
        assert client.get("/v2/health/live").status_code == 200


def hold_steps(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make every step of ``lm`` wait for ``release`` (30 s at most), setting ``entered`` first: a
    generation that holds its slot until the test lets it go."""
    entered, release = threading.Event(), threading.Event()
    real_step = lm.step_ids

    def held_step(state: Any, ids: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real_step(state, ids)

    monkeypatch.setattr(lm, "step_ids", held_step)
    return entered, release


def test_full_server_refuses_at_once_with_429(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"prompt": "the", "max_tokens": 200, "seed": 9, "stop": False, "stream": True}
    with serve(lm, max_concurrency=1, max_queue=0) as client:
        entered, release = hold_steps(lm, monkeypatch)
        first: list[Any] = []
        worker = threading.Thread(target=lambda: first.append(client.post("/v1/generate", json=body)))
        worker.start()
        try:
            assert entered.wait(20), "the streamed generate never reached the model"
            stats = scheduler_of(client).stats
            assert (stats.admitted, stats.running) == (1, 1)
            for path, other in (("/v1/generate", {"max_tokens": 3}), ("/v1/generate", {"max_tokens": 3, "stream": True})):
                t0 = time.monotonic()
                r = client.post(path, json=other)
                assert time.monotonic() - t0 < 5  # at once, not after the slot frees
                assert "busy" in assert_error(r, 429) and r.headers["retry-after"] == "1"
            # Scoring is admitted separately: a generation holding every generation slot does not block it.
            r = client.post("/v1/score", json={"text": "the market"})
            assert r.status_code == 200 and r.json()["nll"] == pytest.approx(lm.score("the market").nll, rel=REL)
            assert_ready(client)  # health still answers while the slot is held
            assert metric(client.get("/metrics").text, "rnnlm_requests_running") == 1
        finally:
            release.set()
            worker.join(60)
        monkeypatch.undo()
        (r,) = first
        assert r.status_code == 200
        evs = events(r.text)
        assert evs[-1][0] == "done" and len(evs) == 201
        assert evs[-1][1]["samples"] == api_generate(lm, body)  # held, not disturbed
        wait_until(lambda: scheduler_of(client).stats.admitted == 0, "the slot to be given back")
        assert client.post("/v1/score", json={"text": "the market"}).status_code == 200
        assert client.post("/v1/generate", json={"max_tokens": 3, "stream": True}).status_code == 200


def test_draining_refuses_new_work(lm: LanguageModel) -> None:
    with serve(lm) as client:
        assert_ready(client)
        client.app.state.rnnlm.drain()  # type: ignore[attr-defined]
        r = client.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False, "error": "draining"})
        for path, body in (("/v1/score", {"text": "the market"}), ("/v1/generate", {"max_tokens": 3}),
                           ("/v1/generate", {"max_tokens": 3, "stream": True})):
            r = client.post(path, json=body)
            assert "shutting down" in assert_error(r, 503) and r.headers["retry-after"]
        assert client.get("/v2/health/live").status_code == 200
        assert metric(client.get("/metrics").text, "rnnlm_ready") == 0


# --------------------------------------------------------------------- timeouts and batching


def test_timeout_gives_504_and_cancels_the_work(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = lm.sequence_logprobs
    saw_cancel = threading.Event()
    calls = [0]

    def slow(sequences: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        cancelled = kwargs.get("cancelled")
        if calls[0] == 1:  # the first batch runs long, polling the scheduler's cancellation as _score_ids does
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if cancelled is not None and cancelled():
                    saw_cancel.set()
                    raise Cancelled("the request was cancelled")
                time.sleep(0.005)
        return real(sequences, **kwargs)

    monkeypatch.setattr(lm, "sequence_logprobs", slow)
    with serve(lm, timeout=0.2, max_concurrency=1) as client:
        t0 = time.monotonic()
        message = assert_error(client.post("/v1/score", json={"text": "the market"}), 504)
        assert time.monotonic() - t0 < 10
        assert "0.2 s timeout" in message
        assert saw_cancel.wait(10), "the scheduler never told the running batch it was cancelled"
        stats = scheduler_of(client).stats
        wait_until(lambda: stats.admitted == 0 and stats.running == 0, "the slot to be given back")
        assert client.post("/v1/score", json={"text": "the market"}).status_code == 200
        assert_ready(client)


BATCH_TEXTS = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + (5 * i) % 19)) for i in range(16)]


def test_concurrent_scores_are_batched_and_isolated(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(set(BATCH_TEXTS)) == 16 and max(len(t.split()) for t in BATCH_TEXTS) > 2 * CHUNK
    alone = [lm.score(t, per_token=True) for t in BATCH_TEXTS]
    real = lm.sequence_logprobs
    with serve(lm, max_concurrency=1, max_batch=8) as client:
        scheduler = scheduler_of(client)
        first = [True]

        def first_waits(sequences: Any, **kwargs: Any) -> Any:
            if first[0]:  # hold the first batch until the other requests queue up behind it
                first[0] = False  # (it may already hold more than one: requests race to the worker)
                rest = 16 - len(sequences)
                wait_until(lambda: len(scheduler._pending) >= rest, f"{rest} pending requests", timeout=20)
            return real(sequences, **kwargs)

        monkeypatch.setattr(lm, "sequence_logprobs", first_waits)
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda i: client.post("/v1/score", json={"text": BATCH_TEXTS[i],
                                                                               "per_token": i % 2 == 0}), range(16)))
        text = client.get("/metrics").text
    for i, (r, ref) in enumerate(zip(responses, alone, strict=True)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["tokens"], body["oov"]) == (ref.tokens, ref.oov) == (len(BATCH_TEXTS[i].split()) + 1, 0)
        assert body["nll"] == pytest.approx(ref.nll, rel=REL)
        if i % 2 == 0:
            assert [t["logprob"] for t in body["per_token"]] == pytest.approx([lp for _, lp, _ in ref.per_token],
                                                                             rel=REL, abs=1e-6)
        else:
            assert "per_token" not in body
    count = metric(text, "rnnlm_score_batch_sequences_count")
    singles = metric(text, "rnnlm_score_batch_sequences_bucket", le="1.0")
    assert metric(text, "rnnlm_score_batch_sequences_sum") == 16  # every sequence scored once
    assert count is not None and singles is not None and singles < count  # some batch held more than one
    assert count <= 1 + 2  # the first alone, then the 15 queued ones, at most 8 a batch
    assert metric(text, "rnnlm_score_batch_sequences_bucket", le="8.0") == count  # none over max_batch


def test_a_scored_request_does_not_wait_for_the_next_batch(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request is answered as soon as the batch holding its job is scored, not once a slot is
    free again (the scheduler before 01fbdf3 kept E waiting for F's batch here)."""
    texts = {name: " ".join(WORDS[:k]) for k, name in enumerate("ABCDEF", 1)}  # told apart by length
    gates = {1: threading.Event(), 2: threading.Event(), 3: threading.Event(), 4: threading.Event()}
    gates[2].set()
    gates[3].set()
    batches: list[list[int]] = []
    real = lm.sequence_logprobs

    def gated(sequences: Any, **kwargs: Any) -> Any:
        batches.append(sorted(len(s) - 1 for s in sequences))  # words per sequence, <eos> off
        assert gates[len(batches)].wait(30)
        return real(sequences, **kwargs)

    done: dict[str, Any] = {}
    with serve(lm, max_concurrency=1, max_batch=2) as client:
        scheduler = scheduler_of(client)
        monkeypatch.setattr(lm, "sequence_logprobs", gated)

        def post(name: str) -> threading.Thread:
            t = threading.Thread(target=lambda: done.__setitem__(name, client.post("/v1/score", json={"text": texts[name]})))
            t.start()
            return t

        threads = [post("A")]
        try:
            wait_until(lambda: len(batches) == 1, "A's batch")
            for k, name in enumerate("BCDEF", 1):  # one at a time: they queue for the slot in this order
                threads.append(post(name))
                wait_until(lambda k=k: len(scheduler._pending) == k, f"{name} pending")
            gates[1].set()  # A done; B scores [B, C]; C scores [D, E]; D starts [F], which is held
            wait_until(lambda: len(batches) == 4, "F's batch")
            assert batches == [[1], [2, 3], [4, 5], [6]]
            threads[4].join(3)
            assert "E" in done, "E's result was ready, but E was still waiting for F's batch"
        finally:
            gates[4].set()
            for t in threads:
                t.join(30)
    assert all(done[n].status_code == 200 for n in "ABCDEF")


def test_the_timeout_counts_the_body_too(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real = lm.sequence_logprobs

    def slow(sequences: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            if kwargs["cancelled"]():
                raise Cancelled("the request was cancelled")
            time.sleep(0.005)
        return real(sequences, **kwargs)

    monkeypatch.setattr(lm, "sequence_logprobs", slow)
    app = create_app(lm, ServerSettings(timeout=1.0))
    data = b'{"text": "the market"}'

    async def rest_later() -> dict[str, Any]:
        await asyncio.sleep(0.6)  # the body's second half, 0.6 s in: within the timeout
        return body_msg(data[5:])

    t0 = time.monotonic()
    status, _, body, _ = asgi_post(app, [(b"content-type", b"application/json")], [body_msg(data[:5], True)],
                                   then=rest_later, lifespan=True)
    elapsed = time.monotonic() - t0  # 1.2 s of body and work unless the timeout stops it
    assert status == 504, f"{elapsed:.2f} s for a 1 s timeout, answered {status}: {body!r}"


def slow_steps(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[int]:
    """Make every step of the step graph take ``seconds`` longer; returns the running count of steps."""
    real, calls = lm.step_ids, [0]

    def slow(state: Any, ids: Any) -> Any:
        calls[0] += 1
        time.sleep(seconds)
        return real(state, ids)

    monkeypatch.setattr(lm, "step_ids", slow)
    return calls


def test_generate_timeout_stops_the_steps(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = slow_steps(lm, monkeypatch, 0.002)
    with serve(lm, timeout=0.2) as client:
        message = assert_error(client.post("/v1/generate", json={"prompt": "the", "max_tokens": 2000, "stop": False}), 504)
        assert "0.2 s timeout" in message
        stats = scheduler_of(client).stats
        wait_until(lambda: stats.admitted == 0 and stats.running == 0, "the slot to be given back", timeout=2)
        stopped_at = calls[0]
        time.sleep(0.1)
        assert calls[0] == stopped_at < 1000  # stopped between steps, long before 2,000 tokens
        assert_ready(client)


class _SlowSession:
    """An onnxruntime session whose every run takes ``seconds`` longer."""

    def __init__(self, real: Any, seconds: float, calls: list[int]) -> None:
        self.real, self.seconds, self.calls = real, seconds, calls

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[0] += 1
        time.sleep(self.seconds)
        return self.real.run(*args, **kwargs)


def test_generate_timeout_stops_a_long_prompt(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A prompt is read through the scoring graph a chunk at a time: 1,500 words = 188 calls, 3.8 s here;
    # one this long goes through the advance graph (tests/test_advance.py): 94 calls, 1.9 s.
    calls = [0]
    monkeypatch.setitem(lm._sessions, "score", _SlowSession(lm.session("score"), 0.02, calls))
    monkeypatch.setitem(lm._sessions, "advance", _SlowSession(lm.session("advance"), 0.02, calls))
    with serve(lm, timeout=0.2) as client:
        assert_error(client.post("/v1/generate", json={"prompt": "the " * 1500, "max_tokens": 5}), 504)
        stats = scheduler_of(client).stats
        t0 = time.monotonic()
        while stats.running and time.monotonic() - t0 < 1.0:
            time.sleep(0.01)
        assert stats.running == 0, f"the slot is still held {time.monotonic() - t0:.1f} s after the 504, {calls[0]} steps in"


def test_a_stream_whose_client_leaves_gives_back_its_slot(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = slow_steps(lm, monkeypatch, 0.0)
    app = create_app(lm, ServerSettings())
    data = json.dumps({"max_tokens": 10_000, "stop": False, "stream": True, "seed": 1}).encode()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with app.router.lifespan_context(app):
            first_token = asyncio.Event()
            sent: list[dict[str, Any]] = []
            taken = [0]

            async def receive() -> dict[str, Any]:
                taken[0] += 1
                if taken[0] == 1:
                    return body_msg(data)
                await first_token.wait()
                return {"type": "http.disconnect"}  # the client goes after the first event

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    first_token.set()

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
            await asyncio.wait_for(app(scope, receive, send), 20)
            stats = app.state.rnnlm.scheduler.stats
            for _ in range(200):
                if stats.running == 0:
                    break
                await asyncio.sleep(0.01)
            state.update(admitted=stats.admitted, running=stats.running, steps=calls[0], sent=sent)

    asyncio.run(main())
    assert (state["admitted"], state["running"]) == (0, 0)
    assert state["steps"] < 1000  # the generation stopped with the stream, far short of 10,000 tokens
    assert state["sent"][0]["status"] == 200


def test_a_queued_request_waits_and_the_next_is_refused(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(lm, max_concurrency=1, max_queue=1) as client:
        entered, release = hold_steps(lm, monkeypatch)
        results: dict[str, Any] = {}
        gen = {"prompt": "the", "max_tokens": 4, "seed": 2, "stop": False}
        running = threading.Thread(target=lambda: results.__setitem__("gen", client.post("/v1/generate", json=gen)))
        queued = threading.Thread(target=lambda: results.__setitem__("gen2", client.post("/v1/generate", json=gen)))
        running.start()
        try:
            assert entered.wait(20)
            queued.start()
            stats = scheduler_of(client).stats
            wait_until(lambda: stats.admitted == 2, "the second request to queue")
            assert metric(client.get("/metrics").text, "rnnlm_queue_depth") == 1
            r = client.post("/v1/generate", json=gen)
            assert "busy" in assert_error(r, 429)
            # Scoring has its own slots and queue: it runs while generation is full.
            assert client.post("/v1/score", json={"text": "the bank"}).json()["tokens"] == 3
        finally:
            release.set()
            running.join(30)
            queued.join(30)
        monkeypatch.undo()
        assert results["gen"].json()["samples"] == api_generate(lm, gen)
        assert results["gen2"].json()["samples"] == api_generate(lm, gen)
        assert metric(client.get("/metrics").text, "rnnlm_queue_depth") == 0


def test_an_error_in_one_batch_does_not_stop_scoring(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = lm.result_of, [0]

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("an unexpected failure while building one batch's results")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "result_of", fails_once)
    with serve(lm, max_concurrency=1, timeout=1.0) as client:
        first = client.post("/v1/score", json={"text": "the market"})
        second = client.post("/v1/score", json={"text": "the market"})
        assert_error(first, 500)  # the error reaches its request at once, as _run_batch means it to
        assert second.status_code == 200, second.text  # and the next request is served
