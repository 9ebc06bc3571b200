"""What the endpoints share about answering: a request's time limit (``timed``) and an event
stream that holds its admission until it ends, however it ends (``AdmittedStream``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from rnnlm.serve.guard import DEADLINE
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

log = logging.getLogger("rnnlm.serve")


def deadline_of(request: Request, timeout: float) -> float:
    """time.monotonic() by which the request must be answered (its time began before its body)."""
    return float(request.scope.get(DEADLINE, time.monotonic() + timeout))


async def timed(request: Request, work: Awaitable[Any], timeout: float) -> Any:
    """The work, cancelled when the request's time runs out (504)."""
    try:
        return await asyncio.wait_for(work, max(deadline_of(request, timeout) - time.monotonic(), 0.0))
    except asyncio.TimeoutError:
        raise HTTPException(504, f"the request ran past its {timeout:g} s timeout and was cancelled") from None


class AdmittedStream(StreamingResponse):
    """An event stream that gives its admission back however it ends (done, error, disconnect)."""

    def __init__(self, events: AsyncGenerator[str, None], release: Callable[..., Any], deadline: float) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events, self._release, self._deadline = events, release, deadline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # The whole stream, sending included, within the request's time (plus a little for the
            # error event): a client that stops reading cannot hold its place in the queue forever.
            await asyncio.wait_for(super().__call__(scope, receive, send),
                                   max(self._deadline - time.monotonic(), 0.0) + 5.0)
        except OSError:  # the client left mid-stream (ASGI 2.4 raises on send): nothing to answer
            log.info("a client left a stream before its end")
        except asyncio.TimeoutError:
            log.info("a stream outlived its request timeout (a client not reading?): closed")
        finally:
            with contextlib.suppress(Exception):
                await self._events.aclose()  # stops the generation thread now, not at garbage collection
            self._release(None, None, None)
