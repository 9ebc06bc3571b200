"""What every HTTP request passes through before the app: the body guard (size, time, content
type) and the Prometheus metrics it records."""

from __future__ import annotations

import asyncio
import re
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rnnlm.errors import RnnlmError

DEADLINE = "rnnlm.deadline"  # scope key: time.monotonic() by which the request must be answered
# Endpoints that answer errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
# with 400 for a bad request (the others: {"error": "..."}, 422).
OPENAI_PATHS = ("/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info")


class ApiError(RnnlmError):
    """A refusal with its own status (404, 409...) and, for OpenAI's error shape, the parameter at fault."""

    def __init__(self, message: str, *, status: int = 422, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind  # kind: OpenAI's error "code"


def openai_style(path: str) -> bool:
    return path in OPENAI_PATHS


def error_response(status: int, message: str, *, path: str = "", param: str | None = None, code: str | None = None,
                   **headers: str) -> JSONResponse:
    """The JSON error of every refusal: ``{"error": message}``, or OpenAI's shape on its endpoints,
    where a 422 (invalid values) is a 400 as OpenAI answers it."""
    if not openai_style(path):
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)
    status = 400 if status == 422 else status
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else (
        "not_found_error" if status == 404 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers or None)


class Metrics:
    ENDPOINTS = ("/v1/score", "/v1/generate", "/v1/model", "/v2/health/live", "/v2/health/ready", "/metrics",
                 "/v1/sessions", *OPENAI_PATHS)
    SESSION = re.compile(r"^/v1/sessions/[^/]+(/(score|generate|fork|state))?$")

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rnnlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("rnnlm_request_seconds", "Request latency, body read to last byte sent", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        self.scored = Counter("rnnlm_tokens_scored", "Tokens scored", registry=r)
        self.generated = Counter("rnnlm_tokens_generated", "Tokens generated", registry=r)
        self.batch = Histogram("rnnlm_score_batch_sequences", "Sequences per batched scoring call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue = Gauge("rnnlm_queue_depth", "Requests admitted and waiting for a slot", registry=r)
        self.running = Gauge("rnnlm_requests_running", "Requests holding an onnxruntime slot", registry=r)
        self.ready = Gauge("rnnlm_ready", "1 when the model is loaded and the server takes requests", registry=r)
        self.sessions = Gauge("rnnlm_sessions", "Open sessions", registry=r)
        self.session_bytes = Gauge("rnnlm_session_state_bytes", "Memory one session's state holds (bytes)", registry=r)
        self.sessions_bytes = Gauge("rnnlm_sessions_state_bytes", "Memory all open sessions' states hold (bytes)",
                                    registry=r)
        self.sessions_expired = Counter("rnnlm_sessions_expired", "Sessions closed for being idle past the TTL",
                                        registry=r)

    def endpoint(self, path: str) -> str:
        if path in self.ENDPOINTS:
            return path
        m = self.SESSION.match(path)  # the id is not a label: unknown paths must not grow the label set
        return f"/v1/sessions/{{id}}{m.group(1) or ''}" if m else "other"


class BodyGuard:
    """Reads a request body before the app sees it: refuses one over the limit with 413 before
    reading it (by its Content-Length) or as soon as it passes the limit (chunked), one that does
    not arrive within the timeout with 408, and one shorter than its Content-Length with 400.
    Also records each request's status and latency."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout: float, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.timeout, self.metrics = app, max_bytes, timeout, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        endpoint = self.metrics.endpoint(scope["path"])

        async def send_recording(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refused = None
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, refused = await self._read(scope, receive)
            if refused is not None:
                await refused(scope, receive, send_recording)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()  # after the body: wait for the disconnect

                await self.app(scope, replay, send_recording)
            else:
                await self.app(scope, receive, send_recording)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, ASGIApp | None]:
        def refuse(status: int, message: str, **headers: str) -> JSONResponse:
            return error_response(status, message, path=scope["path"], **headers)

        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if kind != b"application/json" and not kind.endswith(b"+json"):
            return b"", refuse(415, f"the body must be JSON (Content-Type: application/json), not {kind.decode('latin-1')}")
        declared: int | None = None
        if b"content-length" in headers:
            try:
                declared = int(headers[b"content-length"])
            except ValueError:
                return b"", refuse(400, "Content-Length is not a number")
            if declared > self.max_bytes:
                return b"", refuse(413, f"the body is {declared:,} bytes; the limit is {self.max_bytes:,} "
                                   "(rnnlm serve --max-body-bytes)", Connection="close")
        chunks: list[bytes] = []
        size = 0
        deadline = scope[DEADLINE] = time.monotonic() + self.timeout  # the handler's work gets what is left
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                return b"", refuse(408, f"the body did not arrive within {self.timeout:g} s", Connection="close")
            if message["type"] == "http.disconnect":
                return b"", refuse(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", refuse(413, f"the body is over the limit of {self.max_bytes:,} bytes "
                                   "(rnnlm serve --max-body-bytes)", Connection="close")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if declared is not None and size != declared:
            return b"", refuse(400, f"the body is {size:,} bytes but its Content-Length says {declared:,}")
        return b"".join(chunks), None
