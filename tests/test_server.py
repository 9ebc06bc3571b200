"""The HTTP server in-process: every endpoint, every refusal, admission, batching and timeouts.

Expected values come from outside the server: scores from ``LanguageModel`` called directly (the
API the CLI uses), generation from ``lm.generate`` with the same arguments and greedy paths from
``np.argmax`` over the step graph, error messages from the CLI's own checks (``check_generate``,
``check_text``), token counts from the test's own text, metrics through prometheus_client's parser.
The body guard's slow and short bodies are driven through the ASGI interface directly, as no
well-behaved HTTP client sends them. (tests/test_server_process.py runs the real process.)
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import CHUNK, TOKENS, WORDS, export, read_manifest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from rnnlm.serve.runtime import MAX_NEW_TOKENS, Cancelled, LanguageModel
from rnnlm.serve.sampling import check_sampling
from rnnlm.serve.server import ServerSettings, create_app

from rnnlm.errors import RnnlmError
from rnnlm.text import check_text

JSON = {"content-type": "application/json"}
EOS = "<eos>"
REL = 1e-6  # batched scoring may round float32 sums differently from scoring alone

# One text as a stream: capitals, a number (-> N), two unknown words, a blank line, a line longer than two chunks.
TEXT = ("the stock market fell\nShares of the company rose 3.5 percent\n\n"
        "the zebra market rose 1,000 points\n" + " ".join(WORDS[: 2 * CHUNK + 3]))
TEXT_TOKENS = (4 + 1) + (7 + 1) + 1 + (6 + 1) + (2 * CHUNK + 3 + 1)  # words + one <eos> per line, the blank one too
TEXT_OOV = 2  # zebra, points

LINES = ["the stock market fell", "", "Shares of the zebra rose 3.5 percent", "   ", "traders", " ".join(WORDS[:CHUNK + 2])]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


@contextmanager
def serve(model: Any, **settings: Any) -> Iterator[TestClient]:
    """A client of a fresh app (own scheduler, own metrics), its lifespan running."""
    with TestClient(create_app(model, ServerSettings(**settings)), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def client(lm: LanguageModel) -> Iterator[TestClient]:
    with serve(lm, max_generate_tokens=1000) as c:
        yield c


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


def greedy_reference(lm: LanguageModel, prompt: list[str], n: int) -> list[int]:
    """Argmax path by stepping the step graph one token at a time (from <eos>, then the prompt)."""
    lp, state = lm.step_ids(lm.initial_state(1), np.array([lm.eos_id]))
    for w in prompt:
        lp, state = lm.step_ids(state, np.array([TOKENS.index(w)]))
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(lp[0])))
        lp, state = lm.step_ids(state, np.array([out[-1]]))
    return out


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------- scoring


def test_score_text_equals_the_api(client: TestClient, lm: LanguageModel, lstm_bundle: Path) -> None:
    r = client.post("/v1/score", json={"text": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = lm.score(TEXT)
    assert (ref.tokens, ref.oov) == (TEXT_TOKENS, TEXT_OOV)  # the reference itself counts what the test counts
    assert (body["tokens"], body["oov"]) == (TEXT_TOKENS, TEXT_OOV)
    assert body["nll"] == pytest.approx(ref.nll, rel=REL)
    assert body["ppl"] == pytest.approx(ref.ppl, rel=REL)
    assert body["ppl"] == pytest.approx(math.exp(body["nll"] / body["tokens"]), rel=1e-12)
    assert body["ppl_excluding_oov"] == pytest.approx(ref.ppl_in_vocab, rel=REL)
    assert body["model"] == lstm_bundle.name
    assert not {"bpc", "per_token", "lines"} & set(body)  # word level, not asked for, one text


def test_score_per_token_equals_token_logprobs(client: TestClient, lm: LanguageModel) -> None:
    body = client.post("/v1/score", json={"text": TEXT, "per_token": True}).json()
    ref = lm.token_logprobs(TEXT)
    got = body["per_token"]
    assert [(t["token"], t["oov"]) for t in got] == [(t, o) for t, _, o in ref]
    assert [t["logprob"] for t in got] == pytest.approx([lp for _, lp, _ in ref], rel=REL, abs=1e-6)
    assert sum(t["logprob"] for t in got) == pytest.approx(-body["nll"], rel=1e-9)
    assert body["ppl"] == pytest.approx(math.exp(body["nll"] / body["tokens"]), rel=1e-12)
    assert len(got) == body["tokens"] == TEXT_TOKENS


def test_score_counts_oov_words(client: TestClient) -> None:
    body = client.post("/v1/score", json={"text": "The zebra market rose 1,000 points", "per_token": True}).json()
    assert [(t["token"], t["oov"]) for t in body["per_token"]] == [
        ("the", False), ("zebra", True), ("market", False), ("rose", False), ("N", False), ("points", True), (EOS, False)]
    assert (body["tokens"], body["oov"]) == (7, 2)
    in_vocab = [t["logprob"] for t in body["per_token"] if not t["oov"]]
    assert body["ppl_excluding_oov"] == pytest.approx(math.exp(-sum(in_vocab) / 5), rel=1e-9)


def test_score_lines_each_alone(client: TestClient, lm: LanguageModel) -> None:
    r = client.post("/v1/score", json={"lines": LINES, "per_token": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [line["line"] for line in body["lines"]] == list(range(1, len(LINES) + 1))
    for text, got in zip(LINES, body["lines"], strict=True):
        ref = lm.score_lines([text], per_token=True)[0]  # scored alone, from a fresh state
        assert (got["tokens"], got["oov"]) == (ref.tokens, ref.oov), text
        assert got["tokens"] == len(text.split()) + 1, text  # a blank line is an empty sentence: <eos>
        assert got["nll"] == pytest.approx(ref.nll, rel=REL, abs=1e-12), text
        assert got["ppl"] == pytest.approx(ref.ppl, rel=REL), text
        assert [t["logprob"] for t in got["per_token"]] == pytest.approx([lp for _, lp, _ in ref.per_token],
                                                                        rel=REL, abs=1e-6), text
    lines = body["lines"]
    assert body["tokens"] == sum(x["tokens"] for x in lines) == sum(len(t.split()) + 1 for t in LINES)
    assert body["oov"] == sum(x["oov"] for x in lines) == 1
    assert body["nll"] == pytest.approx(sum(x["nll"] for x in lines), rel=1e-12)
    assert body["ppl"] == pytest.approx(math.exp(body["nll"] / body["tokens"]), rel=1e-12)
    assert "per_token" not in body  # per token is per line


def test_score_lines_blank_line_is_an_empty_sentence(client: TestClient, lm: LanguageModel) -> None:
    body = client.post("/v1/score", json={"lines": ["the market", ""]}).json()
    blank = body["lines"][1]
    eos_first = lm.step(lm.initial_state(), "<eos>")[0][0, lm.eos_id]  # P(<eos> | <eos>), stepped
    assert blank["tokens"] == 1 and blank["nll"] == pytest.approx(-float(eos_first), abs=1e-5)
    assert blank["ppl"] == pytest.approx(math.exp(blank["nll"]), rel=1e-9)


CHARS = list("abcdefghijklmnopqrstuvwxyz_")


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory: pytest.TempPathFactory) -> LanguageModel:
    """A tiny random character-level LSTM bundle (bundles.py builds word-level ones only)."""
    import torch

    from rnnlm.checkpoint import save_model_dir
    from rnnlm.config import ModelConfig
    from rnnlm.data import Vocabulary
    from rnnlm.model import LanguageModel as TorchModel

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("char")
    vocab = Vocabulary([*CHARS, "<unk>", EOS])
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", level="char", vocab_size=len(vocab), emb_size=16, hidden_size=16, num_layers=1)
    save_model_dir(root / "ckpt", TorchModel(cfg), vocab)
    export(root / "ckpt", root / "bundle-char")
    return LanguageModel.load(root / "bundle-char", threads=1)


def test_score_character_level_gives_bpc(char_lm: LanguageModel) -> None:
    text = "the market fell\nshares 3 rose"
    with serve(char_lm) as client:
        r = client.post("/v1/score", json={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = char_lm.score(text)
    assert body["tokens"] == len("the market fell") + 1 + len("shares 3 rose") + 1  # characters, spaces, <eos>s
    assert body["oov"] == 1  # "3"
    assert body["nll"] == pytest.approx(ref.nll, rel=REL)
    assert body["bpc"] == pytest.approx(body["nll"] / (body["tokens"] * math.log(2)), rel=1e-12)
    assert body["bpc"] == pytest.approx(ref.bpc, rel=REL)


# -------------------------------------------------------------------------------- generation

GENERATE_CASES = [
    {"prompt": "the stock", "max_tokens": 12, "seed": 7},
    {"prompt": "", "max_tokens": 10, "seed": 11, "n": 3, "top_k": 5},
    {"prompt": "Shares of", "max_tokens": 10, "seed": 3, "n": 2, "top_p": 0.9, "temperature": 0.7},
    {"prompt": "the market", "max_tokens": 9, "seed": 5, "n": 2, "stop": False},
]


def api_generate(lm: LanguageModel, body: dict[str, Any]) -> list[str]:
    return lm.generate(body.get("prompt", ""), max_new_tokens=body.get("max_tokens", 50),
                       temperature=body.get("temperature", 1.0), top_k=body.get("top_k"), top_p=body.get("top_p"),
                       seed=body.get("seed"), num_samples=body.get("n", 1), stop_at_eos=body.get("stop", True))


@pytest.mark.parametrize("body", GENERATE_CASES, ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()))
def test_generate_equals_the_api(client: TestClient, lm: LanguageModel, body: dict[str, Any]) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = api_generate(lm, body)
    assert got["samples"] == expected and len(expected) == body.get("n", 1)
    assert (got["prompt"], got["seed"]) == (body["prompt"], body["seed"])
    if body.get("stop", True):  # words hold no spaces and no <eos> is left in: words are tokens
        assert got["tokens"] == sum(len(s.split()) for s in expected)
    else:
        assert got["tokens"] == body["n"] * body["max_tokens"]
    again = client.post("/v1/generate", json=body).json()
    assert again["samples"] == got["samples"]  # the same seed, the same text


@pytest.mark.parametrize("body", GENERATE_CASES, ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()))
def test_generate_stream_equals_non_stream(client: TestClient, lm: LanguageModel, body: dict[str, Any]) -> None:
    plain = client.post("/v1/generate", json=body).json()
    r = client.post("/v1/generate", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert [e for e, _ in evs] == ["token"] * (len(evs) - 1) + ["done"]
    n = body.get("n", 1)
    per_sample: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for _, data in evs[:-1]:
        per_sample[data["sample"]].append(data)
    for b, toks in enumerate(per_sample):
        assert [t["index"] for t in toks] == list(range(len(toks)))
        assert [t["token"] for t in toks] == [lm.vocab[t["id"]] for t in toks]
        if body.get("stop", True):
            assert EOS not in [t["token"] for t in toks]
            assert " ".join(t["token"] for t in toks) == plain["samples"][b]
        else:  # never stopped: exactly max_tokens tokens, <eos> included where drawn
            assert len(toks) == body["max_tokens"]
            assert lm.detokenize(t["id"] for t in toks) == plain["samples"][b]
    done = evs[-1][1]
    assert done["samples"] == plain["samples"] == api_generate(lm, body)
    assert done["tokens"] == plain["tokens"] == sum(map(len, per_sample))
    assert done["seed"] == body["seed"]


def test_temperature_zero_is_greedy(client: TestClient, lm: LanguageModel) -> None:
    ref = greedy_reference(lm, ["the", "stock"], 8)
    assert lm.eos_id not in ref  # so the text is the words joined by spaces
    words = " ".join(TOKENS[i] for i in ref)
    for seed in (1, 2):
        body = {"prompt": "the stock", "max_tokens": 8, "temperature": 0, "n": 2, "seed": seed, "stop": False}
        assert client.post("/v1/generate", json=body).json()["samples"] == [words, words]
        evs = events(client.post("/v1/generate", json={**body, "stream": True}).text)
        assert [d["id"] for e, d in evs if e == "token" and d["sample"] == 0] == ref


# ---------------------------------------------------------------------- model, health, schema


def test_model_describes_the_bundle(client: TestClient, lm: LanguageModel, lstm_bundle: Path) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.json()
    manifest = read_manifest(lstm_bundle)
    assert body["bundle"] == str(lstm_bundle)
    assert (body["cell"], body["level"], body["vocab_size"]) == ("lstm", "word", len(TOKENS))
    assert body["device"] == lm.device
    # 2 layers of (h, c), hidden size 32 (bundles.py)
    assert [s["size"] for s in body["state"]] == [32] * 4
    assert [s["name"] for s in body["state"]] == [s["input"] for s in manifest["state"]]
    assert body["limits"] == {"max_body_bytes": 1 << 20, "max_generate_tokens": 1000, "timeout": 60.0, "max_batch": 32,
                              "max_concurrency": 2, "max_queue": 64}


def test_health(client: TestClient) -> None:
    r = client.get("/v2/health/live")
    assert (r.status_code, r.json()) == (200, {"live": True})
    assert_ready(client)


def test_openapi_documents_both_posts(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, request in (("/v1/score", "ScoreRequest"), ("/v1/generate", "GenerateRequest")):
        post = schema["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{request}"
    schemas = schema["components"]["schemas"]
    assert set(schemas["ScoreRequest"]["properties"]) == {"text", "lines", "per_token"}
    assert set(schemas["GenerateRequest"]["properties"]) == {"prompt", "max_tokens", "temperature", "top_k", "top_p",
                                                             "seed", "n", "stop", "stream"}
    assert schemas["ScoreRequest"]["additionalProperties"] is False
    assert schemas["GenerateRequest"]["additionalProperties"] is False
    assert "ScoreResponse" in schemas and "GenerateResponse" in schemas


# ------------------------------------------------------------------------------------ metrics


def test_metrics_count_generate_and_unknown_paths(lm: LanguageModel) -> None:
    with serve(lm) as client:
        bodies = [{"prompt": "the", "max_tokens": 6, "seed": s, "stop": False} for s in range(3)]
        for b in bodies:
            assert client.post("/v1/generate", json=b).status_code == 200
        assert client.post("/v1/generate", json={"top_k": 0}).status_code == 422
        assert client.get("/nope").status_code == 404
        assert client.post("/also/nope", json={}).status_code == 404
        text = client.get("/metrics").text
    assert metric(text, "rnnlm_requests_total", endpoint="/v1/generate", status="200") == 3
    assert metric(text, "rnnlm_requests_total", endpoint="/v1/generate", status="422") == 1
    assert metric(text, "rnnlm_requests_total", endpoint="other", status="404") == 2
    assert "/nope" not in text and "/also/nope" not in text  # the label set stays bounded
    assert metric(text, "rnnlm_request_seconds_count", endpoint="/v1/generate") == 4
    assert metric(text, "rnnlm_tokens_generated_total") == 3 * 6
    assert metric(text, "rnnlm_queue_depth") == 0
    assert metric(text, "rnnlm_requests_running") == 0
    assert metric(text, "rnnlm_ready") == 1


def test_metrics_count_scores(lm: LanguageModel) -> None:
    bodies = [{"text": "the stock market fell"}, {"text": "shares rose\nthe bank"},
              {"lines": ["the market", "", "a zebra rose"]}]
    tokens = 5 + (3 + 3) + (3 + 1 + 4)  # words and one <eos> per line, the blank one too
    with serve(lm) as client:
        for b in bodies:
            assert client.post("/v1/score", json=b).status_code == 200
        assert client.post("/v1/score", json={"text": " "}).status_code == 422
        text = client.get("/metrics").text
    assert metric(text, "rnnlm_requests_total", endpoint="/v1/score", status="200") == len(bodies)
    assert metric(text, "rnnlm_requests_total", endpoint="/v1/score", status="422") == 1
    assert metric(text, "rnnlm_request_seconds_count", endpoint="/v1/score") == len(bodies) + 1
    assert metric(text, "rnnlm_tokens_scored_total") == tokens
    # one batched call per request here (sequential), of 1, 1 and 3 sequences (the blank line included)
    assert metric(text, "rnnlm_score_batch_sequences_count") == 3
    assert metric(text, "rnnlm_score_batch_sequences_sum") == 1 + 1 + 3


# --------------------------------------------------------------------------------- validation

SCORE_422: list[tuple[str, bytes, str | None]] = [
    # (id, raw body, words the message must hold; None: only that it names no field in particular)
    ("malformed-json", b'{"text": "the', "not valid JSON"),
    ("array", b'["the market"]', None),
    ("string", b'"the market"', None),
    ("neither", b"{}", 'either "text"'),
    ("both", b'{"text": "a", "lines": ["a"]}', 'either "text"'),
    ("empty-lines", b'{"lines": []}', '"lines" is empty'),
    ("empty-text", b'{"text": ""}', "empty or only whitespace"),
    ("whitespace-text", b'{"text": "  \\n\\t \\n"}', "empty or only whitespace"),
    ("blank-lines", b'{"lines": ["", "  "]}', "empty or only whitespace"),
    ("per-token-yes", b'{"text": "a", "per_token": "yes"}', "per_token"),
    ("lines-string", b'{"lines": "abc"}', "lines"),
    ("lines-of-numbers", b'{"lines": [1, 2]}', "lines"),
    ("unknown-field", b'{"text": "a", "max_new_tokens": 3}', "max_new_tokens"),
    ("newline-in-line", b'{"lines": ["ok", "the\\nmarket"]}', "lines[1] contains a newline"),
]


@pytest.mark.parametrize(("raw", "words"), [c[1:] for c in SCORE_422], ids=[c[0] for c in SCORE_422])
def test_score_refuses_invalid_bodies(client: TestClient, raw: bytes, words: str | None) -> None:
    message = assert_error(client.post("/v1/score", content=raw, headers=JSON), 422)
    if words is not None:
        assert words in message, message
    assert_ready(client)


@pytest.mark.parametrize(("raw", "what", "text"), [
    (b'{"text": "a\\ud800"}', "text", "a\ud800"),
    (b'{"text": "the\\u0000market"}', "text", "the\0market"),
    (b'{"lines": ["ok", "the \\udc80 market"]}', "lines[1]", "the \udc80 market"),
    (b'{"lines": ["the\\u0000"]}', "lines[0]", "the\0"),
], ids=["surrogate-text", "nul-text", "surrogate-line", "nul-line"])
def test_score_refuses_what_is_not_text(client: TestClient, raw: bytes, what: str, text: str) -> None:
    message = assert_error(client.post("/v1/score", content=raw, headers=JSON), 422)
    assert message == refusal(lambda: check_text(text, what))
    assert ("surrogate" in message) == ("\\ud" in raw.decode())  # the test's own reading of its body
    assert_ready(client)


GENERATE_TYPES = [
    ("temperature-hot", b'{"temperature": "hot"}', "temperature"),
    ("n-float", b'{"n": 1.5}', "n"),
    ("max-tokens-bool", b'{"max_tokens": true}', "max_tokens"),
    ("seed-string", b'{"seed": "1"}', "seed"),
    ("stream-string", b'{"stream": "yes"}', "stream"),
    ("unknown-field", b'{"max_new_tokens": 5}', "max_new_tokens"),
    ("array", b"[]", "body"),
    ("malformed-json", b"{", "not valid JSON"),
]


@pytest.mark.parametrize(("raw", "words"), [c[1:] for c in GENERATE_TYPES], ids=[c[0] for c in GENERATE_TYPES])
def test_generate_refuses_wrong_types(client: TestClient, raw: bytes, words: str) -> None:
    message = assert_error(client.post("/v1/generate", content=raw, headers=JSON), 422)
    assert words in message, message
    assert_ready(client)


# (id, raw body, the same values as check_generate's keyword arguments)
GENERATE_VALUES: list[tuple[str, bytes, dict[str, Any]]] = [
    ("negative-temperature", b'{"temperature": -0.5}', {"temperature": -0.5}),
    ("nan-temperature", b'{"temperature": NaN}', {"temperature": math.nan}),
    ("infinite-temperature", b'{"temperature": Infinity}', {"temperature": math.inf}),
    ("top-k-0", b'{"top_k": 0}', {"top_k": 0}),
    ("top-k-vocab+1", f'{{"top_k": {len(TOKENS) + 1}}}'.encode(), {"top_k": len(TOKENS) + 1}),
    ("top-p-0", b'{"top_p": 0}', {"top_p": 0.0}),
    ("top-p-1.5", b'{"top_p": 1.5}', {"top_p": 1.5}),
    ("max-tokens-0", b'{"max_tokens": 0}', {"max_new_tokens": 0}),
    ("max-tokens-10001", b'{"max_tokens": 10001}', {"max_new_tokens": 10_001}),
    ("n-0", b'{"n": 0}', {"num_samples": 0}),
    ("negative-seed", b'{"seed": -1}', {"seed": -1}),
    ("seed-2**64", f'{{"seed": {2**64}}}'.encode(), {"seed": 2**64}),
    ("surrogate-prompt", b'{"prompt": "a\\ud800"}', {"prompt": "a\ud800"}),
    ("nul-prompt", b'{"prompt": "the\\u0000"}', {"prompt": "the\0"}),
]


@pytest.mark.parametrize(("raw", "kwargs"), [c[1:] for c in GENERATE_VALUES], ids=[c[0] for c in GENERATE_VALUES])
@pytest.mark.parametrize("stream", [False, True])
def test_generate_refuses_what_the_cli_refuses(client: TestClient, lm: LanguageModel, raw: bytes,
                                               kwargs: dict[str, Any], stream: bool) -> None:
    if stream:
        raw = raw[:-1] + b', "stream": true}'
    message = assert_error(client.post("/v1/generate", content=raw, headers=JSON), 422)
    args = dict(kwargs)  # shared by both parametrizations: not to be changed
    prompt = args.pop("prompt", "")
    assert message == refusal(lambda: lm.check_generate(prompt, **args))
    assert_ready(client)


SAMPLING_DEFAULTS = {"max_new_tokens": 50, "temperature": 1.0, "top_k": None, "top_p": None, "num_samples": 1,
                     "seed": None}


@pytest.mark.parametrize(("raw", "kwargs"), [c[1:] for c in GENERATE_VALUES if "prompt" not in c[2]],
                         ids=[c[0] for c in GENERATE_VALUES if "prompt" not in c[2]])
def test_generate_messages_are_check_samplings(client: TestClient, raw: bytes, kwargs: dict[str, Any]) -> None:
    """The numeric checks, against ``check_sampling`` called as the CLI's runtime calls it."""
    message = assert_error(client.post("/v1/generate", content=raw, headers=JSON), 422)
    args = {**SAMPLING_DEFAULTS, **kwargs}
    assert message == refusal(lambda: check_sampling(**args, vocab_size=len(TOKENS), cap=MAX_NEW_TOKENS))


def test_generate_refuses_more_tokens_than_the_server_allows(client: TestClient) -> None:
    # the module's app allows 1,000 tokens per request; each value alone is fine for the CLI
    message = assert_error(client.post("/v1/generate", json={"n": 3, "max_tokens": 334}), 422)
    assert "n * max_tokens = 1,002" in message and "1,000" in message, message
    assert client.post("/v1/generate", json={"n": 2, "max_tokens": 500, "temperature": 0}).status_code == 200
    assert_ready(client)


def test_invalid_utf8_body(client: TestClient) -> None:
    for path in ("/v1/score", "/v1/generate"):
        r = client.post(path, content=b'{"text": "\xff"}', headers=JSON)
        assert r.status_code in (400, 422), r.text
        assert_error(r, r.status_code)
    assert_ready(client)


def test_content_type_must_be_json(client: TestClient) -> None:
    body = b'{"text": "the market"}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        message = assert_error(client.post("/v1/score", content=body, headers={"content-type": kind}), 415)
        assert kind.split(";")[0] in message
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"):
        assert client.post("/v1/score", content=body, headers={"content-type": kind}).status_code == 200, kind
    assert_ready(client)


def test_body_over_the_limit(lm: LanguageModel) -> None:
    with serve(lm, max_body_bytes=1000) as client:
        fits = json.dumps({"text": "the " * 240}).encode()
        over = json.dumps({"text": "the " * 260}).encode()
        assert len(fits) <= 1000 < len(over)
        assert client.post("/v1/score", content=fits, headers=JSON).status_code == 200
        message = assert_error(client.post("/v1/score", content=over, headers=JSON), 413)
        assert f"{len(over):,}" in message and "1,000" in message
        # no Content-Length (chunked): refused once the bytes pass the limit
        chunks = iter([over[:600], over[600:]])
        r = client.post("/v1/score", content=chunks, headers=JSON)
        assert_error(r, 413)
        assert_ready(client)


def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.post("/v1/nothing", json={}), 404)
    assert_error(client.get("/v1/score"), 405)
    assert_error(client.get("/v1/generate"), 405)
    assert_error(client.post("/v2/health/ready", json={}), 405)
    assert_ready(client)


# ------------------------------------------------------------------- the body guard, raw ASGI


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


def test_full_server_refuses_at_once_with_429(lm: LanguageModel, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real_step = lm.step_ids

    def held_step(state: Any, ids: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real_step(state, ids)

    body = {"prompt": "the", "max_tokens": 200, "seed": 9, "stop": False, "stream": True}
    with serve(lm, max_concurrency=1, max_queue=0) as client:
        monkeypatch.setattr(lm, "step_ids", held_step)
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
    entered, release = threading.Event(), threading.Event()
    real_step = lm.step_ids

    def held_step(state: Any, ids: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real_step(state, ids)

    with serve(lm, max_concurrency=1, max_queue=1) as client:
        monkeypatch.setattr(lm, "step_ids", held_step)
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
