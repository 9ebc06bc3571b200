"""Runs the HTTP app under uvicorn with a drain on SIGTERM (and Ctrl-C):

    signal -> readiness 503, new requests 503 -> in-flight requests finish (up to --grace
    seconds) -> uvicorn closes the sockets -> exit 0.   A second signal exits at once.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn
from rnnlm.serve.bundle import Bundle, find_bundle
from rnnlm.serve.graphs import intra_threads, share_thread_pool
from rnnlm.serve.server import ServerSettings, ServerState, create_app

from rnnlm.errors import RnnlmError

log = logging.getLogger("rnnlm.serve")


def run_server(model: Path | None, *, host: str = "127.0.0.1", port: int = 8000,
               settings: ServerSettings | None = None, grace: float = 30.0, log_level: str = "info") -> int:
    """Serve until a signal; returns the exit code (0 after a drain, 1 if the model failed to load)."""
    if not grace >= 0:
        raise RnnlmError(f"--grace must be >= 0 seconds, got {grace}")
    settings = settings or ServerSettings()
    settings.check()
    path = find_bundle(model)
    Bundle.open(path)  # a missing or damaged bundle is one clear line now, not a log entry later
    if settings.thread_pool == "shared":  # this process owns every session it will create
        share_thread_pool(intra_threads(settings.threads))
    sock = _listen(host, port)
    failed: list[str] = []
    holder: list[DrainingServer] = []

    def on_load_failure(message: str) -> None:
        failed.append(message)
        for server in holder:
            server.should_exit = True

    app = create_app(path, settings, on_load_failure=on_load_failure)
    # After our drain nothing is admitted any more; the grace also covers replies still being sent.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=math.ceil(max(grace, 1.0)), lifespan="on")
    server = DrainingServer(config, app.state.rnnlm, grace)
    holder.append(server)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    # Printed at every log level: scripts (and --port 0 users) read the address from it.
    print(f"serving {path} on http://{host}:{sock.getsockname()[1]} (OpenAPI docs at /docs)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 1 if failed else 0


def _listen(host: str, port: int) -> socket.socket:
    """Bind before uvicorn does, so a taken port is one clear error rather than a log line."""
    if not 0 <= port <= 65535:
        raise RnnlmError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise RnnlmError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it (Linux): a response's head and body go out at once instead of
    # the body waiting ~40 ms for the client's delayed ACK (Nagle), which every small reply paid.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RnnlmError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM/SIGINT drains instead of closing at once,
    and the process then exits 0 (uvicorn would re-raise the signal after its shutdown)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace: float) -> None:
        super().__init__(config)
        self.state, self.grace = state, grace
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or self.should_exit:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        log.info("%s: draining; readiness is off and in-flight requests have %g s to finish",
                 signal.Signals(sig).name, self.grace)
        self.state.drain()
        self.drain_deadline = time.monotonic() + self.grace

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.state.in_flight == 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)
