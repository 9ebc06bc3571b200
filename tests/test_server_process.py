"""``rnnlm serve`` as a real process: uvicorn on loopback, raw sockets for the bodies that no
well-behaved client sends, and SIGTERM. (tests/test_server.py covers the app in-process.)"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rnnlm.serve import LanguageModel

JSON = {"content-type": "application/json"}


class Server:
    def __init__(self, bundle: Path, log: Path, *args: str) -> None:
        self.log = log
        with open(log, "w") as err:  # a file: a full pipe would block the server
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rnnlm", "serve", "--model", str(bundle), "--port", "0", "--threads", "1", *args],
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.port = int(m.group(1))
        while httpx.get(self.url + "/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=30)

    def raw(self, request: bytes, *, wait: float = 10) -> bytes:
        """Send bytes on a fresh connection; return what comes back until the server closes it or
        ``wait`` seconds pass without data."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(request)
            return _read_response(s)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def _read_response(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                n = re.search(rb"content-length: (\d+)", head, re.I)
                if n and len(rest) >= int(n.group(1)):
                    break
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


@pytest.fixture(scope="module")
def server(lstm_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(lstm_bundle, tmp_path_factory.mktemp("srv") / "server.log", "--timeout", "2", "--max-body-bytes", "65536")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            assert event is not None
            yield event, json.loads(line[6:])


def test_real_server_scores_and_streams_a_generation(server: Server, lm: LanguageModel) -> None:
    lines = ["the stock market fell", "shares of the company rose 3.5 percent", "", "a new zzz bank"]
    r = server.post("/v1/score", {"lines": lines})
    assert r.status_code == 200, r.text
    alone = lm.score_lines(lines)
    for got, want in zip(r.json()["lines"], alone, strict=True):
        assert (got["tokens"], got["oov"]) == (want.tokens, want.oov)
        assert got["nll"] == pytest.approx(want.nll, rel=1e-6)

    args = {"prompt": "the stock", "max_tokens": 12, "temperature": 0.9, "seed": 11, "n": 2, "stop": False}
    want_samples = lm.generate("the stock", max_new_tokens=12, temperature=0.9, seed=11, num_samples=2, stop_at_eos=False)
    ids: dict[int, list[int]] = {0: [], 1: []}
    with httpx.stream("POST", server.url + "/v1/generate", json={**args, "stream": True}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = list(_events(resp.iter_lines()))
    for kind, data in events[:-1]:
        assert kind == "token" and data["token"] == lm.vocab[data["id"]]
        ids[data["sample"]].append(data["id"])
    assert [len(ids[b]) for b in (0, 1)] == [12, 12]  # one event per token
    assert [lm.detokenize(ids[b]) for b in (0, 1)] == want_samples
    assert events[-1] == ("done", {"samples": want_samples, "tokens": 24, "seed": 11})


def test_both_thread_pools_serve_the_numbers_of_the_runtime(lstm_bundle: Path, lm: LanguageModel, tmp_path: Path) -> None:
    """``--thread-pool per-session`` (a pool per graph, as the Python API has) and the default shared
    pool (``server`` above) serve the same scores and seeded samples as the runtime in this process."""
    srv = Server(lstm_bundle, tmp_path / "server.log", "--thread-pool", "per-session")
    try:
        lines = ["the stock market fell", "shares of the company rose 3.5 percent"]
        r = srv.post("/v1/score", {"lines": lines})
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["lines"], lm.score_lines(lines), strict=True):
            assert got["nll"] == pytest.approx(want.nll, rel=1e-6)
        r = srv.post("/v1/generate", {"prompt": "the stock", "max_tokens": 8, "seed": 5, "stop": False})
        assert r.json()["samples"] == lm.generate("the stock", max_new_tokens=8, seed=5, stop_at_eos=False)
    finally:
        assert srv.stop() == 0, srv.log.read_text()


def test_a_shared_thread_pool_is_the_process_s_and_gives_the_same_numbers(lstm_bundle: Path, lm: LanguageModel) -> None:
    """``share_thread_pool`` (what ``rnnlm serve`` calls first) in a fresh process: every session the
    runtime then creates uses the shared pool and scores as a pool per session does (this process);
    asking again for the same size is a no-op, for another size an error."""
    code = (
        "import json, sys\n"
        "from rnnlm.serve.graphs import share_thread_pool\n"
        "share_thread_pool(2)\n"
        "share_thread_pool(2)\n"
        "from rnnlm.serve import LanguageModel\n"
        "lm = LanguageModel.load(sys.argv[1])\n"
        "nll = [r.nll for r in lm.score_lines(['the stock market fell', 'a new bank'])]\n"
        "try:\n"
        "    share_thread_pool(1)\n"
        "    again = 'accepted'\n"
        "except RuntimeError as e:\n"
        "    again = str(e)\n"
        "print(json.dumps({'nll': nll, 'again': again, 'shared': not lm._options.use_per_session_threads,\n"
        "                  'advance_threads': lm.advance_threads}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(lstm_bundle)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["shared"] and out["again"] == "this process already shares a pool of 2 threads"
    assert out["advance_threads"] == 2  # the pool's, whatever the bundle's products
    want = [r.nll for r in lm.score_lines(["the stock market fell", "a new bank"])]
    assert out["nll"] == pytest.approx(want, rel=1e-6)


def test_real_server_refuses_bad_bodies_and_stays_ready(server: Server) -> None:
    head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    # 100 MB declared: 413 from the header alone, before a byte of the body is read.
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b"Content-Length: 100000000\r\n\r\n" + b'{"text": "' + b"a " * 1000)
        response = _read_response(s)
    assert _status(response) == 413 and b"limit" in response
    assert time.monotonic() - t < 2

    # 100 MB sent chunked (no length to refuse by): 413 once past the limit, not after 100 MB.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
        sent = 0
        try:
            while sent < 100_000_000:
                s.sendall(chunk)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = _read_response(s)
    assert sent < 10_000_000, "the server read far past its limit"
    assert not response or _status(response) == 413  # a reset may eat the response; the limit held either way

    # A Content-Length larger than the body: 408 after the timeout (2 s), not a hang.
    t = time.monotonic()
    response = server.raw(head + b'Content-Length: 100\r\n\r\n{"text": "a"}', wait=10)
    assert _status(response) == 408, response
    assert 1.5 < time.monotonic() - t < 8

    for body, status in [(b'{"text": "\xff\xfe"}', 400), (b'{"text": "a\\ud800"}', 422), (b"{nope", 422),
                         (b'{"text": "a\\u0000b"}', 422)]:
        response = server.raw(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        assert _status(response) == status, (body, response)
        assert b'"error"' in response

    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert server.post("/v1/score", {"text": "the stock market"}).status_code == 200


def test_sigterm_drains_in_flight_requests_then_exits_0(lstm_bundle: Path, tmp_path: Path) -> None:
    srv = Server(lstm_bundle, tmp_path / "server.log", "--grace", "20")
    try:
        body = json.dumps({"prompt": "the", "max_tokens": 10000, "n": 2, "stop": False, "seed": 1, "stream": True,
                           "temperature": 1.0}).encode()
        # A streamed generation of 20,000 tokens (seconds): the server is mid-response when SIGTERM comes.
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert srv.proc.poll() is None, "exited with a request in flight"
        ready = httpx.get(srv.url + "/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["error"] == "draining"
        assert httpx.post(srv.url + "/v1/score", json={"text": "the"}).status_code == 503
        # Read the rest: the in-flight stream completes with its done event.
        chunks, tail = [first], first[-16:]
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked encoding's last chunk
            chunks.append(s.recv(1 << 16))
            assert chunks[-1], "the server closed the stream early"
            tail = (tail + chunks[-1])[-16:]
        s.close()
        rest = b"".join(chunks)
        assert b"event: done" in rest
        assert rest.count(b"event: token") == 20000
        assert srv.proc.wait(timeout=20) == 0, srv.log.read_text()
        assert "draining" in srv.log.read_text()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_server_modules_never_import_torch(lstm_bundle: Path) -> None:
    code = ("import sys\n"
            "from fastapi.testclient import TestClient\n"
            "from rnnlm.serve.server import create_app\n"
            "import rnnlm.serve.daemon, rnnlm.cli\n"
            "with TestClient(create_app(sys.argv[1])) as c:\n"
            "    import time\n"
            "    while c.get('/v2/health/ready').status_code != 200: time.sleep(0.05)\n"
            "    assert c.post('/v1/score', json={'text': 'the stock'}).status_code == 200\n"
            "print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-FREE')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(lstm_bundle)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["TORCH-FREE"]


def test_serve_cli_refuses_bad_setup_with_one_line(lstm_bundle: Path, tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rnnlm", "serve", *args], capture_output=True, text=True, timeout=60)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        cases = {
            ("--model", str(tmp_path / "missing")): "no model at",
            ("--model", str(lstm_bundle), "--port", port): "cannot listen",
            ("--model", str(lstm_bundle), "--max-concurrency", "0"): "--max-concurrency must be >= 1",
            ("--model", str(lstm_bundle), "--timeout", "0"): "--timeout must be",
            ("--model", str(lstm_bundle), "--max-sessions", "0"): "--max-sessions must be >= 1",
            ("--model", str(lstm_bundle), "--session-ttl", "nan"): "--session-ttl must be",
            ("--model", str(lstm_bundle), "--log-level", "loud"): "--log-level",
            ("--model", str(lstm_bundle), "--thread-pool", "big"): "--thread-pool must be shared or per-session",
        }
        for args, words in cases.items():
            proc = serve(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert proc.stderr.startswith("error: ") and words in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
