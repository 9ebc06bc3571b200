"""The HTTP server in-process: every endpoint and every refusal.

Expected values come from outside the server: scores from ``LanguageModel`` called directly (the
API the CLI uses), generation from ``lm.generate`` with the same arguments and greedy paths from
``np.argmax`` over the step graph, error messages from the CLI's own checks (``check_generate``,
``check_text``), token counts from the test's own text, metrics through prometheus_client's parser.
Admission, batching, timeouts and the body guard: tests/test_server_admission.py; the real
process: tests/test_server_process.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import CHUNK, TOKENS, WORDS, export, read_manifest
from fastapi.testclient import TestClient
from rnnlm.serve.runtime import MAX_NEW_TOKENS, LanguageModel
from rnnlm.serve.sampling import check_sampling
from serverkit import (
    REL,
    api_generate,
    assert_error,
    assert_ready,
    events,
    metric,
    refusal,
    serve,
)

from rnnlm.text import check_text

JSON = {"content-type": "application/json"}
EOS = "<eos>"

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


@pytest.fixture(scope="module")
def client(lm: LanguageModel) -> Iterator[TestClient]:
    with serve(lm, max_generate_tokens=1000) as c:
        yield c


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
