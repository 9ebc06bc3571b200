"""The HTTP server's request and response bodies (its OpenAPI schema), and the score fields
shared by every score reply: the fields of ``rnnlm score --json``."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rnnlm.serve.runtime import ScoreResult


class _Strict(BaseModel):
    # Unknown fields are refused (a typo like "max_new_tokens" must not be ignored silently), and
    # no coercion: "temperature": "hot" or "per_token": "yes" is a 422, not a guess.
    model_config = ConfigDict(extra="forbid", strict=True)


class ScoreRequest(_Strict):
    text: str | None = Field(None, description="One text, scored as a stream: every line ends in <eos>, the "
                             "state carries across lines (what `rnnlm score FILE` does).",
                             examples=["the stock market fell\nshares rose"])
    lines: list[str] | None = Field(None, description="Sentences, each scored on its own from a fresh state "
                                    "(what `rnnlm score --per-line` does).", examples=[["the stock market fell"]])
    per_token: bool = Field(False, description="Return every token with its natural-log probability.")


class TokenScore(BaseModel):
    token: str
    logprob: float
    oov: bool


class Score(BaseModel):
    tokens: int = Field(description="Scored tokens, <eos> included.")
    oov: int = Field(description="Of them, out of the vocabulary (scored as <unk>).")
    nll: float = Field(description="Negative log-likelihood in nats, summed.")
    ppl: float | None = Field(description="exp(nll / tokens); null when there are no tokens.")
    ppl_excluding_oov: float | None
    bpc: float | None = Field(None, description="Bits per character (character models only).")
    per_token: list[TokenScore] | None = None


class LineScore(Score):
    line: int = Field(description="1-based position in the request's lines.")


class ScoreResponse(Score):
    model: str
    lines: list[LineScore] | None = None


class GenerateRequest(_Strict):
    prompt: str = Field("", description="Text to continue; empty starts a new sentence.")
    max_tokens: int = Field(50, description="Tokens to generate per sample.")
    temperature: float = Field(1.0, description="0 is greedy (argmax).")
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = Field(None, description="The same seed gives the same text (as `rnnlm generate --seed`).")
    n: int = Field(1, description="Independent samples, generated as one batch.")
    stop: bool = Field(True, description="Stop a sample at <eos>.")
    stream: bool = Field(False, description="Server-sent events, one token per event, then a `done` event.")


class GenerateResponse(BaseModel):
    model: str
    prompt: str
    samples: list[str]
    tokens: int = Field(description="Tokens generated, all samples together.")
    seed: int | None


class ErrorBody(BaseModel):
    error: str


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def score_fields(r: ScoreResult, per_token: bool) -> dict[str, Any]:
    # + 0.0: an empty line's nll is -0.0, which JSON would show as such
    d: dict[str, Any] = {"tokens": r.tokens, "oov": r.oov, "nll": r.nll + 0.0, "ppl": finite(r.ppl),
                         "ppl_excluding_oov": finite(r.ppl_in_vocab)}
    if r.level == "char":
        d["bpc"] = finite(r.bpc)
    if per_token and r.per_token is not None:
        d["per_token"] = [{"token": t, "logprob": lp, "oov": o} for t, lp, o in r.per_token]
    return d
