"""``rnnlm serve``: the runtime behind HTTP (FastAPI + uvicorn, still no torch).

    POST /v1/score            {"text": ...} or {"lines": [...]}, optional "per_token"
    POST /v1/generate         {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "n", "stream"}
    GET  /v1/model            what is loaded
    GET  /v2/health/live      200 while the process serves (KServe v2)
    GET  /v2/health/ready     200 once the bundle has loaded and passed its probes; 503 while
                              loading and after SIGTERM
    GET  /metrics             Prometheus text format
    GET  /openapi.json, /docs the schema (Swagger UI served locally: docs.py)
    POST /v1/completions, GET /v1/models, POST /tokenize, POST /detokenize, GET /tokenizer_info
                              OpenAI's completions API and vLLM's tokenizer endpoints (openai_api.py)
    /v1/sessions...           stateful sessions: score, generate, fork, export, import (sessions.py)

Every error is JSON ``{"error": "..."}``: 422 for invalid values (the same checks, and the same
words, as the CLI), 413 for a body over the limit (refused before it is read), 408 for a body
that does not arrive in time, 415 for a body that is not JSON, 429 when every slot and queue place
is taken, 503 while not ready, 504 when a request runs past its timeout (its work is cancelled),
404 for an unknown session. The OpenAI endpoints answer in OpenAI's error shape, 400 for bad values.
Bodies and schema: schemas.py; body guard and metrics: guard.py; admission and batching:
scheduler.py; uvicorn and the drain: daemon.py.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rnnlm.serve import docs, openai_api, sessions
from rnnlm.serve.guard import DEADLINE, ApiError, BodyGuard, Metrics, error_response
from rnnlm.serve.openai_api import model_name
from rnnlm.serve.responses import AdmittedStream, timed
from rnnlm.serve.runtime import LanguageModel, ScoreResult
from rnnlm.serve.scheduler import Draining, Overloaded, Scheduler
from rnnlm.serve.schemas import (
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    ScoreRequest,
    ScoreResponse,
    score_fields,
)
from rnnlm.serve.sessions import SessionStore
from starlette.exceptions import HTTPException

from rnnlm.errors import RnnlmError
from rnnlm.text import Token, check_text

log = logging.getLogger("rnnlm.serve")


THREAD_POOLS = ("shared", "per-session")


@dataclass(frozen=True)
class ServerSettings:
    max_concurrency: int = 2  # onnxruntime calls at once (one per core is plenty)
    max_queue: int = 64  # requests waiting for a slot before 429
    max_batch: int = 32  # sequences per batched scoring call; 1 turns batching off
    timeout: float = 60.0  # seconds per request, body included
    max_body_bytes: int = 1 << 20
    max_generate_tokens: int = 65_536  # n * max_tokens per request
    max_sessions: int = 1024  # open sessions (each holds one state: a few kB)
    session_ttl: float = 600.0  # seconds a session may stay unused before it is closed
    device: str = "auto"
    threads: int | None = None
    thread_pool: str = "shared"  # "shared": one onnxruntime pool for the process (run_server); or "per-session"
    raw: bool = False

    def check(self) -> None:
        for name in ("max_concurrency", "max_batch", "max_body_bytes", "max_generate_tokens", "max_sessions"):
            if getattr(self, name) < 1:
                raise RnnlmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.thread_pool not in THREAD_POOLS:
            raise RnnlmError(f"--thread-pool must be {' or '.join(THREAD_POOLS)}, not {self.thread_pool!r}")
        if self.max_queue < 0:
            raise RnnlmError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise RnnlmError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if not (math.isfinite(self.session_ttl) and self.session_ttl > 0):
            raise RnnlmError(f"--session-ttl must be a positive number of seconds, got {self.session_ttl}")


# ---------------------------------------------------------------------- the app
class ServerState:
    """What the endpoints share: the model once loaded, the scheduler, readiness."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.lm: LanguageModel | None = None
        self.scheduler: Scheduler | None = None
        self.sessions: SessionStore | None = None
        self.load_error: str | None = None
        self.draining = False

    def attach(self, lm: LanguageModel) -> None:
        s = self.settings
        self.scheduler = Scheduler(lm, max_concurrency=s.max_concurrency, max_queue=s.max_queue, max_batch=s.max_batch)
        self.scheduler.stats.on_batch = self.metrics.batch.observe
        self.metrics.queue.set_function(lambda: self.scheduler.stats.queued if self.scheduler else 0)
        self.metrics.running.set_function(lambda: self.scheduler.stats.running if self.scheduler else 0)
        self.sessions = SessionStore(lm, max_sessions=s.max_sessions, ttl=s.session_ttl, metrics=self.metrics)
        # What is alive now (the model, the libraries) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it (measured: pauses of 50-140 ms,
        # every thread stopped, while a long prompt was read).
        gc.collect()
        gc.freeze()
        self.lm = lm

    @property
    def ready(self) -> bool:
        return self.lm is not None and not self.draining

    @property
    def in_flight(self) -> int:
        return self.scheduler.stats.admitted if self.scheduler else 0

    def drain(self) -> None:
        """Stop taking work: readiness turns off and new requests get 503."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.draining = True

    def working(self) -> tuple[LanguageModel, Scheduler]:
        if self.draining:
            raise Draining("the server is shutting down")
        if self.lm is None or self.scheduler is None:
            raise Draining("the model is not loaded yet" if self.load_error is None else f"the model failed to load: {self.load_error}")
        return self.lm, self.scheduler


def create_app(model: str | Path | LanguageModel | None, settings: ServerSettings | None = None,
               *, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI app. ``model`` is a bundle path (loaded in the background after startup, so
    liveness answers while it loads) or a LanguageModel already loaded (ready at once)."""
    settings = settings or ServerSettings()
    settings.check()
    metrics = Metrics()
    state = ServerState(settings, metrics)
    metrics.ready.set_function(lambda: float(state.ready))
    app = FastAPI(title="rnnlm", version=_version(), lifespan=_lifespan(state, model, on_load_failure),
                  docs_url=None, redoc_url=None,  # docs.py serves them from local files
                  description="Perplexity scoring and text generation with recurrent language models on onnxruntime.",
                  responses={422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}})
    app.state.rnnlm = state
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_api.router)
    app.include_router(sessions.router)
    docs.install(app)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout=settings.timeout, metrics=metrics)
    return app


def _lifespan(state: ServerState, model: str | Path | LanguageModel | None,
              on_load_failure: Callable[[str], None] | None) -> Callable[[FastAPI], Any]:
    """Startup attaches the model (or starts loading it); shutdown stops the loader and the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if isinstance(model, LanguageModel):
            state.attach(model)
        else:
            loader = asyncio.create_task(_load_in_background(state, model, on_load_failure))
        yield
        if loader is not None and not loader.done():
            loader.cancel()
        if state.scheduler is not None:
            state.scheduler.close()

    return lifespan


async def _load_in_background(state: ServerState, path: str | Path | None,
                              on_load_failure: Callable[[str], None] | None) -> None:
    settings = state.settings
    try:
        lm = await asyncio.to_thread(LanguageModel.load, path, device=settings.device, threads=settings.threads,
                                     raw=settings.raw, eager=True)  # both graphs, both probes
    except Exception as e:  # a bundle that fails its probe, a CUDA provider that will not start...
        state.load_error = str(e.message if isinstance(e, RnnlmError) else e)
        log.error("the model failed to load: %s", state.load_error)
        if on_load_failure is not None:
            on_load_failure(state.load_error)
        return
    if lm.device_note:
        log.warning("%s", lm.device_note)
    state.attach(lm)
    log.info("ready: %s (%s)", lm.bundle.path, lm.device)


# ---------------------------------------------------------------------- rnnlm's own endpoints
router = APIRouter()


def _state(request: Request) -> ServerState:
    server_state: ServerState = request.app.state.rnnlm
    return server_state


# exclude_unset: what the handler leaves out (bpc for words, per_token unless asked) is absent.
@router.post("/v1/score", response_model=ScoreResponse, response_model_exclude_unset=True,
             summary="Perplexity of a text, or of each of a list of sentences")
async def score(body: ScoreRequest, request: Request) -> Response:
    state = _state(request)
    lm, scheduler = state.working()
    if (body.text is None) == (body.lines is None):
        raise RnnlmError('give either "text" (one stream) or "lines" (independent sentences), not both or neither')
    with scheduler.admit():
        # Tokenizing up to 1 MiB and encoding a reply of up to ~10 MB (per_token) run in a thread:
        # on the event loop they would stall every other request, health checks included.
        sequences = await asyncio.to_thread(_sequences, lm, body)
        results = await timed(request, scheduler.score(sequences, per_token=body.per_token), state.settings.timeout)
        reply = await asyncio.to_thread(_score_reply, lm, body, results)
    state.metrics.scored.inc(sum(r.tokens for r in results))
    return Response(reply, media_type="application/json")


@router.post("/v1/generate", response_model=GenerateResponse, summary="Continue a prompt",
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream=true, "
                        "server-sent events: `token` events {sample, index, id, token}, then a `done` event"}})
async def generate(body: GenerateRequest, request: Request) -> Any:
    state = _state(request)
    settings, metrics = state.settings, state.metrics
    lm, scheduler = state.working()
    kwargs = dict(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                  seed=body.seed, num_samples=body.n, stop_at_eos=body.stop)
    lm.check_generate(body.prompt, **kwargs)  # the CLI's checks, the CLI's messages
    asked = body.n * body.max_tokens
    if asked > settings.max_generate_tokens:
        raise RnnlmError(f"n * max_tokens = {asked:,} tokens; this server's limit is {settings.max_generate_tokens:,} "
                         "per request (rnnlm serve --max-generate-tokens)")
    if body.stream:
        admission = scheduler.admit("generate")
        admission.__enter__()  # 429 now, as a status, not inside a started stream
        deadline = request.scope.get(DEADLINE, time.monotonic() + settings.timeout)
        return AdmittedStream(_events(lm, scheduler, body, kwargs, metrics, deadline, settings.timeout),
                              admission.__exit__, deadline)
    with scheduler.admit("generate"):
        columns = await timed(request, _collect(scheduler.generate(body.prompt, **kwargs)), settings.timeout)
    samples = lm.sample_ids(columns, body.n, stop_at_eos=body.stop)
    generated = sum(len(s) for s in samples)
    metrics.generated.inc(generated)
    return {"model": model_name(lm), "prompt": body.prompt, "samples": [lm.detokenize(s) for s in samples],
            "tokens": generated, "seed": body.seed}


@router.get("/v1/model", summary="The loaded bundle")
async def model_info(request: Request) -> dict[str, Any]:
    state = _state(request)
    settings = state.settings
    lm, _ = state.working()
    m = lm.bundle.manifest
    return {"bundle": str(lm.bundle.path), "cell": m["cell"], "level": lm.level, "vocab_size": len(lm.vocab),
            "state": [{"name": s["input"], "size": s["size"]} for s in lm.states], "device": lm.device,
            "quantization": m.get("quantization"), "metrics": m.get("metrics"), "text": lm.tokenizer.spec.to_json(),
            "limits": {"max_body_bytes": settings.max_body_bytes, "max_generate_tokens": settings.max_generate_tokens,
                       "timeout": settings.timeout, "max_batch": settings.max_batch,
                       "max_concurrency": settings.max_concurrency, "max_queue": settings.max_queue}}


@router.get("/v2/health/live", summary="Liveness (KServe v2)")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness (KServe v2): the model loaded, probes passed, not draining",
            responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    if state.ready:
        return JSONResponse({"ready": True})
    reason = "draining" if state.draining else "loading" if state.load_error is None else f"failed: {state.load_error}"
    return JSONResponse({"ready": False, "error": reason}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- errors
# One JSON shape for every refusal: {"error": "..."}, or OpenAI's on its endpoints (guard.error_response).
async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    path, problems, param = request.url.path, [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            reason = err.get("ctx", {}).get("error", "invalid")
            return error_response(422, f"the body is not valid JSON: {reason} at character {err['loc'][-1]}", path=path)
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return error_response(422, "; ".join(problems), path=path, param=param)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RnnlmError)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, path=request.url.path, param=exc.param, code=exc.kind)
    return error_response(422, exc.message, path=request.url.path)


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    return error_response(429, str(exc), path=request.url.path, **{"Retry-After": "1"})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc), path=request.url.path, **{"Retry-After": "5"})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), path=request.url.path, **(exc.headers or {}))


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return error_response(500, "internal error (see the server log)", path=request.url.path)


def _install_error_handlers(app: FastAPI) -> None:
    for kind, handler in ((RequestValidationError, _invalid), (RnnlmError, _refused), (Overloaded, _overloaded),
                          (Draining, _unavailable), (HTTPException, _http_error), (Exception, _internal)):
        app.add_exception_handler(kind, handler)


def _sequences(lm: LanguageModel, body: ScoreRequest) -> list[list[Token]]:
    """The token sequences of a score request, each scored from a fresh state; refuses bad text."""
    if body.text is not None:
        sequences = [lm.tokenizer.text_tokens(body.text)]  # checks the text too
    else:
        if not body.lines:
            raise RnnlmError('"lines" is empty: nothing to score')
        for i, line in enumerate(body.lines):
            check_text(line, f"lines[{i}]")
            if "\n" in line:
                raise RnnlmError(f"lines[{i}] contains a newline; each item is one sentence")
        sequences = [lm.tokenizer.line_tokens(line) for line in body.lines]
    if not any(t.id != lm.eos_id for seq in sequences for t in seq):  # blank lines are <eos> alone
        raise RnnlmError("the text is empty or only whitespace: nothing to score")
    return sequences


def _score_reply(lm: LanguageModel, body: ScoreRequest, results: list[ScoreResult]) -> bytes:
    """The JSON of a score response (the ScoreResponse schema): per text, or totals and per line."""
    if body.text is not None:
        out = {"model": model_name(lm), **score_fields(results[0], body.per_token)}
    else:
        out = {"model": model_name(lm), **score_fields(_total(results, lm.level), False),
               "lines": [{"line": i, **score_fields(r, body.per_token)} for i, r in enumerate(results, 1)]}
    return json.dumps(out, ensure_ascii=False).encode("utf-8")


def _total(results: list[ScoreResult], level: str) -> ScoreResult:
    return functools.reduce(ScoreResult.plus, results, ScoreResult(0, 0, 0.0, 0.0, level))


async def _collect(steps: AsyncIterator[Any]) -> list[Any]:
    return [ids async for ids in steps]


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _events(lm: LanguageModel, scheduler: Scheduler, body: GenerateRequest, kwargs: dict[str, Any],
                  metrics: Metrics, deadline: float, timeout: float) -> AsyncGenerator[str, None]:
    """``token`` events {sample, index, id, token} as tokens come, then ``done`` with the samples;
    an ``error`` event ends a stream that fails or runs past its timeout once it has started."""
    columns = []
    done = [False] * body.n
    steps = scheduler.generate(body.prompt, **kwargs)
    try:
        while True:
            try:  # the deadline also covers a long prompt, before the first token
                ids = await asyncio.wait_for(steps.__anext__(), max(deadline - time.monotonic(), 0.0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                yield _sse("error", {"error": f"the request ran past its {timeout:g} s timeout and was cancelled"})
                return
            columns.append(ids)
            for b, tid in enumerate(ids.tolist()):
                if done[b]:
                    continue
                if body.stop and tid == lm.eos_id:
                    done[b] = True
                    continue
                metrics.generated.inc()
                yield _sse("token", {"sample": b, "index": len(columns) - 1, "id": tid, "token": lm.vocab[tid]})
    except RnnlmError as e:
        yield _sse("error", {"error": e.message})
        return
    except Exception:  # the status line is sent: the client learns of it from an error event
        log.exception("a stream failed")
        yield _sse("error", {"error": "internal error (see the server log)"})
        return
    finally:
        await steps.aclose()
    samples = lm.sample_ids(columns, body.n, stop_at_eos=body.stop)
    yield _sse("done", {"samples": [lm.detokenize(s) for s in samples], "tokens": sum(len(s) for s in samples),
                        "seed": body.seed})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rnnlm")
    except PackageNotFoundError:
        return "0"
