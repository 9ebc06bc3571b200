"""Stateful sessions: the model's whole context kept on the server between requests.

    POST   /v1/sessions                 {} or {"state": <exported>}  -> 201 {"id", "tokens", ...}
    POST   /v1/sessions/{id}/score      {"text", "per_token"}: log-probs of text that continues the
                                        session, which then stands after it
    POST   /v1/sessions/{id}/generate   {"max_tokens", "temperature", ...}: samples from where the
                                        session stands (it does not move: score a sample to keep it)
    POST   /v1/sessions/{id}/fork       -> 201 {"id"} of a copy
    GET    /v1/sessions/{id}/state      the portable state (``LanguageModel.export_context``)
    DELETE /v1/sessions/{id}

A recurrent model's context is its state (a few kilobytes), so a session costs that much memory
and continuing it costs only the new tokens. Text scored in any number of calls gets the same
log-probabilities as the whole text scored at once (``LanguageModel.score_context``). Sessions
live in this process's memory: at most ``--max-sessions``, each closed after ``--session-ttl``
seconds unused; an unknown, closed or expired id is a 404. One call at a time per session (a
second waits for the first).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field
from rnnlm.serve.guard import ApiError, Metrics
from rnnlm.serve.responses import timed
from rnnlm.serve.runtime import Context, LanguageModel
from rnnlm.serve.schemas import Score, _Strict, score_fields

from rnnlm.errors import RnnlmError

if TYPE_CHECKING:
    from rnnlm.serve.server import ServerState


@dataclass
class Session:
    id: str
    ctx: Context
    used: float  # time.monotonic() of its last use
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    """The open sessions of one server: a bounded number, each closed when idle past ``ttl`` seconds."""

    def __init__(self, lm: LanguageModel, *, max_sessions: int, ttl: float, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lm, self.max_sessions, self.ttl, self.metrics, self.clock = lm, max_sessions, ttl, metrics, clock
        self._open: dict[str, Session] = {}
        self.state_bytes = lm.initial_state(1).nbytes
        metrics.sessions.set_function(lambda: len(self._open))
        metrics.session_bytes.set(self.state_bytes)
        metrics.sessions_bytes.set_function(lambda: sum(s.ctx.state.nbytes for s in self._open.values()))

    def open(self, ctx: Context) -> Session:
        self.sweep()
        if len(self._open) >= self.max_sessions:
            raise ApiError(f"{self.max_sessions} sessions are open, the limit (rnnlm serve --max-sessions): close "
                           f"one (DELETE /v1/sessions/ID) or wait for idle ones to expire after {self.ttl:g} s",
                           status=429)
        session = Session(secrets.token_urlsafe(16), ctx, self.clock())
        self._open[session.id] = session
        return session

    def get(self, sid: str) -> Session:
        self.sweep()
        session = self._open.get(sid)
        if session is None:
            raise ApiError(f"no session {sid!r}: unknown, closed, or expired after {self.ttl:g} s unused", status=404)
        session.used = self.clock()
        return session

    def close(self, sid: str) -> None:
        self.get(sid)
        del self._open[sid]

    def sweep(self) -> None:
        """Close every session unused for longer than the TTL (none that is in a call)."""
        now = self.clock()
        for sid in [sid for sid, s in self._open.items() if now - s.used > self.ttl and not s.lock.locked()]:
            del self._open[sid]
            self.metrics.sessions_expired.inc()

    def __len__(self) -> int:
        return len(self._open)


# ---------------------------------------------------------------------------- bodies
class CreateSession(_Strict):
    state: dict[str, Any] | None = Field(None, description="A state from GET /v1/sessions/{id}/state (of this "
                                         "bundle); none starts from nothing (the first token is predicted from <eos>).")


class SessionScore(_Strict):
    text: str = Field(description='Text that continues the session: each line ending in "\\n" ends in <eos>; '
                      "a last line without one continues in the next call.", examples=["the stock market "])
    per_token: bool = Field(False, description="Return every token with its natural-log probability.")


class SessionGenerate(_Strict):
    max_tokens: int = Field(50, description="Tokens to generate per sample.")
    temperature: float = Field(1.0, description="0 is greedy (argmax).")
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = Field(1, description="Independent samples.")
    stop: bool = Field(True, description="Stop a sample at <eos>.")


class SessionInfo(_Strict):
    id: str
    tokens: int = Field(description="Tokens the session has read.")
    state_bytes: int
    ttl: float = Field(description="Seconds unused after which it is closed.")


class SessionScoreResponse(Score):
    id: str
    session_tokens: int = Field(description="Tokens the session has read, these included.")


# ---------------------------------------------------------------------------- endpoints
router = APIRouter(tags=["sessions"])


def _store(request: Request) -> tuple[ServerState, LanguageModel, SessionStore]:
    state: ServerState = request.app.state.rnnlm
    lm, _ = state.working()
    assert state.sessions is not None
    return state, lm, state.sessions


def _info(store: SessionStore, session: Session) -> dict[str, Any]:
    return {"id": session.id, "tokens": session.ctx.tokens, "state_bytes": store.state_bytes, "ttl": store.ttl}


@router.post("/v1/sessions", status_code=201, response_model=SessionInfo, summary="Open a session")
async def create_session(body: CreateSession, request: Request) -> dict[str, Any]:
    _, lm, store = _store(request)
    ctx = lm.context() if body.state is None else lm.import_context(body.state)
    return _info(store, store.open(ctx))


@router.post("/v1/sessions/{sid}/score", response_model=SessionScoreResponse, response_model_exclude_unset=True,
             summary="Score text that continues a session, and advance it")
async def score_session(sid: str, body: SessionScore, request: Request) -> dict[str, Any]:
    state, lm, store = _store(request)
    session = store.get(sid)
    assert state.scheduler is not None
    with state.scheduler.admit("score"):
        async with session.lock:
            ctx = session.ctx
            result, after = await timed(request, state.scheduler.run(
                "score", lambda cancelled: lm.score_context(ctx, body.text, per_token=body.per_token,
                                                            cancelled=cancelled)), state.settings.timeout)
            session.ctx, session.used = after, store.clock()
    state.metrics.scored.inc(result.tokens)
    return {"id": sid, "session_tokens": after.tokens, **score_fields(result, body.per_token)}


@router.post("/v1/sessions/{sid}/generate", summary="Sample continuations of a session (it does not move)")
async def generate_session(sid: str, body: SessionGenerate, request: Request) -> dict[str, Any]:
    state, lm, store = _store(request)
    kwargs = dict(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                  seed=body.seed, num_samples=body.n, stop_at_eos=body.stop)
    lm.check_generate("", **kwargs)
    if body.n * body.max_tokens > state.settings.max_generate_tokens:
        raise RnnlmError(f"n * max_tokens = {body.n * body.max_tokens:,} tokens; this server's limit is "
                         f"{state.settings.max_generate_tokens:,} per request (rnnlm serve --max-generate-tokens)")
    session = store.get(sid)
    assert state.scheduler is not None
    with state.scheduler.admit("generate"):
        async with session.lock:
            ctx = session.ctx
            columns = await timed(request, state.scheduler.run(
                "generate", lambda cancelled: [ids for ids, _ in lm.sample_from(ctx, **kwargs, cancelled=cancelled)]),
                state.settings.timeout)
    samples = lm.sample_ids(columns, body.n, stop_at_eos=body.stop)
    state.metrics.generated.inc(sum(len(s) for s in samples))
    return {"id": sid, "samples": [lm.detokenize(s) for s in samples], "tokens": sum(len(s) for s in samples),
            "seed": body.seed}


@router.post("/v1/sessions/{sid}/fork", status_code=201, response_model=SessionInfo, summary="Copy a session")
async def fork_session(sid: str, request: Request) -> dict[str, Any]:
    _, _, store = _store(request)
    session = store.get(sid)
    async with session.lock:  # not mid-call: a copy of where it stands
        return _info(store, store.open(session.ctx.fork()))


@router.get("/v1/sessions/{sid}/state", summary="Export a session's state (portable to a server with the same bundle)")
async def export_session(sid: str, request: Request) -> dict[str, Any]:
    _, lm, store = _store(request)
    session = store.get(sid)
    async with session.lock:
        return lm.export_context(session.ctx)


@router.delete("/v1/sessions/{sid}", summary="Close a session")
async def delete_session(sid: str, request: Request) -> JSONResponse:
    _, _, store = _store(request)
    store.close(sid)
    return JSONResponse({"id": sid, "closed": True})
