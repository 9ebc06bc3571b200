"""Load on `rnnlm serve`: 64 concurrent clients, with and without request batching, then the
OpenAI completions API and stateful sessions under the same load.

    python bench/http_load.py [--model models/lstm] [--requests 2048] [--clients 64]
                              [--completions 256] [--sessions 64]

The workload is rescoring: each request scores one PTB test sentence ({"lines": [sentence]}),
the shape of an ASR/MT n-best rescoring call, followed by a smaller generation phase (seeded,
so every answer is known). Before the load, every request is served alone in this process
(``LanguageModel.score_lines([s])``, ``generate(seed=...)``); under load, each response must equal
that (nll to 1e-5 relative: batching changes float summation order; generated text exactly), so
any cross-talk between requests shows as a mismatch. Errors are any non-200.

The server runs as a subprocess (`rnnlm serve --max-batch 1` = no batching, then the default
32); the clients are plain asyncio HTTP/1.1 keep-alive connections, one per client, on the same
machine (so they take CPU from the server: stated with the results). In-process batched
scoring of the same sentences (``score_lines``, batch 64) is printed as the ceiling.

Completions and sessions (on the last server): each job is first served alone, one at a time,
then all of them again under ``--clients`` concurrent clients; every response must equal its
alone twin (ids and timestamps aside; the numbers exactly, as no request shares a batch).
Completion jobs mix seeded generation (n 2, logprobs 2, a stop string) and prompt scoring (echo,
max_tokens 0, logprobs 1), text and token-id prompts. A session job is a script: open a session,
score a PTB sentence in three pieces, fork it, export the fork's state, import it as a new
session, score one more piece there, close all three.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rnnlm.serve import LanguageModel


class Client:
    """One keep-alive HTTP/1.1 connection: send JSON, read a Content-Length response."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict | None, method: str = "POST") -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        data = b"" if body is None else json.dumps(body).encode()
        self.writer.write(b"%s %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(data), data))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        return status, json.loads(await self.reader.readexactly(length))


def start_server(model: str, port_file: Path, *args: str) -> tuple[subprocess.Popen, int]:
    log = open(port_file, "w")  # noqa: SIM115 - the server writes to it for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "rnnlm", "serve", "--model", model, "--port", "0",
                             "--log-level", "warning", *args], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)", port_file.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{port_file.read_text()}")
        time.sleep(0.05)
    port = int(m.group(1))

    async def ready() -> None:
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if (await r.read()).startswith(b"HTTP/1.1 200"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(ready(), 120))
    return proc, port


async def load(port: int, jobs: list[tuple[str, dict]], clients: int) -> list[tuple[int, int, dict, float]]:
    """Every job once, ``clients`` at a time: (job index, status, body, seconds)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    out: list[tuple[int, int, dict, float]] = []

    async def worker() -> None:
        client = Client(port)
        while not queue.empty():
            i = queue.get_nowait()
            t = time.perf_counter()
            try:
                status, body = await client.post(*jobs[i])
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                status, body, client = 0, {"error": repr(e)}, Client(port)
            out.append((i, status, body, time.perf_counter() - t))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


async def _get(port: int, path: str) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET %s HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n" % path.encode())
    return (await r.read()).partition(b"\r\n\r\n")[2]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=1000, method="inclusive")[int(q * 10) - 1] if len(xs) > 1 else xs[0]


# ------------------------------------------------------------------------ completions and sessions
Step = tuple[str, str, dict | None, str | None]  # method, path ($name substituted), body, name to keep the reply as


def completion_jobs(sentences: list[str], model: str, lm: LanguageModel, count: int) -> list[list[Step]]:
    jobs: list[list[Step]] = []
    for i, s in enumerate(sentences[:count]):
        words = s.split()
        prompt: str | list[int] = " ".join(words[:4])
        if i % 4 == 3:
            prompt = [t.id for t in lm.prompt_tokens(" ".join(words[:4]))]
        if i % 2:
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.9, "seed": i, "n": 2,
                    "logprobs": 2, "stop": [" the"]}
        else:
            body = {"model": model, "prompt": s + "\n", "max_tokens": 0, "echo": True, "logprobs": 1}
        jobs.append([("POST", "/v1/completions", body, None)])
    return jobs


def session_jobs(sentences: list[str], count: int) -> list[list[Step]]:
    jobs: list[list[Step]] = []
    for s in sentences[:count]:
        w = s.split()
        third = max(len(w) // 3, 1)
        pieces = [" ".join(w[:third]) + " ", " ".join(w[third : 2 * third]) + " ", " ".join(w[2 * third :]) + "\n"]
        jobs.append([("POST", "/v1/sessions", {}, "s"),
                     *[("POST", "/v1/sessions/$s/score", {"text": p, "per_token": True}, None) for p in pieces],
                     ("POST", "/v1/sessions/$s/fork", None, "f"), ("GET", "/v1/sessions/$f/state", None, "state"),
                     ("POST", "/v1/sessions", {"state": "$state"}, "g"),
                     ("POST", "/v1/sessions/$g/score", {"text": "the stock market fell\n"}, None),
                     ("DELETE", "/v1/sessions/$s", None, None), ("DELETE", "/v1/sessions/$f", None, None),
                     ("DELETE", "/v1/sessions/$g", None, None)])
    return jobs


async def run_script(client: Client, script: list[Step]) -> list[tuple[int, dict]]:
    """The steps in order, each reply kept (as a session id, or whole for "state") for the next ones."""
    kept: dict[str, Any] = {}
    out = []
    for method, path, body, name in script:
        for key, value in kept.items():
            path = path.replace(f"${key}", str(value.get("id") if isinstance(value, dict) and key != "state" else value))
        if body is not None and body.get("state") == "$state":
            body = {"state": kept["state"]}
        status, reply = await client.post(path, body, method)
        if name is not None:
            kept[name] = reply
        out.append((status, reply))
    return out


def normal(reply: dict) -> dict:
    """A reply without what differs between two servings of the same request: ids and times."""
    return {k: v for k, v in reply.items() if k not in ("id", "created")}


async def scripts(port: int, jobs: list[list[Step]], clients: int) -> list[list[tuple[int, dict]]]:
    """Every script once, ``clients`` at a time, each on one connection; replies in job order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    out: list[list[tuple[int, dict]]] = [[] for _ in jobs]

    async def worker() -> None:
        client = Client(port)
        while not queue.empty():
            i = queue.get_nowait()
            try:
                out[i] = await run_script(client, jobs[i])
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                out[i], client = [(0, {"error": repr(e)})], Client(port)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


def compare_under_load(port: int, name: str, jobs: list[list[Step]], clients: int) -> None:
    """Serve every job alone, then all under load; print errors and mismatches."""
    t = time.perf_counter()
    alone = asyncio.run(scripts(port, jobs, 1))
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    loaded = asyncio.run(scripts(port, jobs, clients))
    wall = time.perf_counter() - t
    requests = sum(len(j) for j in jobs)
    errors = [r for job in alone + loaded for r in job if not 200 <= r[0] < 300]
    mismatches = sum(1 for a, b in zip(alone, loaded, strict=True)
                     for (sa, ra), (sb, rb) in zip(a, b, strict=True) if (sa, normal(ra)) != (sb, normal(rb)))
    print(f"{name}: {len(jobs)} jobs = {requests} requests; alone {requests / t_alone:.1f} req/s, {clients} clients "
          f"{requests / wall:.1f} req/s; errors {len(errors)}, responses differing from the same request served "
          f"alone {mismatches}")
    if errors:
        print("  first error:", errors[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/lstm")
    ap.add_argument("--data", default=os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb"))
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--generate", type=int, default=128, help="generation requests after the scoring ones")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", default="1,32", help="--max-batch values to compare")
    ap.add_argument("--thread-pool", default="shared", choices=("shared", "per-session"),
                    help="the server's --thread-pool (run once with each to compare them)")
    ap.add_argument("--completions", type=int, default=256, help="/v1/completions jobs (on the last server)")
    ap.add_argument("--sessions", type=int, default=64, help="session scripts (on the last server)")
    args = ap.parse_args()

    sentences = [s.strip() for s in (Path(args.data) / "ptb.test.txt").read_text().splitlines() if s.strip()]
    sentences = (sentences * (args.requests // len(sentences) + 1))[: args.requests]
    lm = LanguageModel.load(args.model, threads=args.threads)
    print(f"model {args.model}, {args.requests} score requests (one PTB test sentence each) + {args.generate} "
          f"generate requests, {args.clients} clients, {os.cpu_count()} cores, onnxruntime {args.threads} threads")

    t = time.perf_counter()
    alone = [lm.score_lines([s])[0].nll for s in sentences]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    lm.score_lines(sentences, batch_size=64)
    t_batched = time.perf_counter() - t
    gen_args = [{"prompt": " ".join(s.split()[:3]), "max_tokens": 20, "temperature": 0.9, "seed": i}
                for i, s in enumerate(sentences[: args.generate])]
    gen_alone = [lm.generate(g["prompt"], max_new_tokens=20, temperature=0.9, seed=g["seed"])[0] for g in gen_args]
    tokens = sum(len(s.split()) + 1 for s in sentences)
    print(f"in process, no HTTP: alone {len(sentences) / t_alone:,.0f} req/s; batched (score_lines, 64) "
          f"{len(sentences) / t_batched:,.0f} sentences/s = {tokens / t_batched:,.0f} tokens/s")

    jobs = [("/v1/score", {"lines": [s]}) for s in sentences] + [("/v1/generate", g) for g in gen_args]
    results = {}
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in batches:
            proc, port = start_server(args.model, Path(tmp) / f"server-{max_batch}.log", "--max-batch", str(max_batch),
                                      "--threads", str(args.threads), "--max-queue", str(4 * args.clients),
                                      "--thread-pool", args.thread_pool)
            try:
                asyncio.run(load(port, jobs[:64], args.clients))  # warm-up
                t, cpu, server_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(proc.pid)
                done = asyncio.run(load(port, jobs[: len(sentences)], args.clients))
                wall = time.perf_counter() - t
                cpu, server_cpu = time.process_time() - cpu, _cpu_seconds(proc.pid) - server_cpu
                t_gen = time.perf_counter()
                gen = asyncio.run(load(port, jobs[len(sentences):], args.clients))
                t_gen = time.perf_counter() - t_gen
                metrics = asyncio.run(_get(port, "/metrics")).decode()
                if max_batch == batches[-1]:
                    name = json.loads(asyncio.run(_get(port, "/v1/models")))["data"][0]["id"]
                    compare_under_load(port, "completions", completion_jobs(sentences, name, lm, args.completions),
                                       args.clients)
                    compare_under_load(port, "sessions", session_jobs(sentences, args.sessions), args.clients)
            finally:
                proc.terminate()
                code = proc.wait(timeout=60)
            errors = [d for d in done + gen if d[1] != 200]
            mismatches = sum(1 for i, _, body, _ in done if body.get("lines") and
                             abs(body["lines"][0]["nll"] - alone[i]) > 1e-5 * max(1.0, abs(alone[i])))
            mismatches += sum(1 for i, _, body, _ in gen if body.get("samples") and
                              body["samples"][0] != gen_alone[i])
            lat = sorted(d[3] for d in done)
            results[max_batch] = len(done) / wall
            print(f"--max-batch {max_batch:>3}: {len(done) / wall:7.1f} req/s ({tokens / wall:8,.0f} tokens/s), "
                  f"p50 {percentile(lat, 50) * 1e3:6.1f} ms, p99 {percentile(lat, 99) * 1e3:6.1f} ms, "
                  f"errors {len(errors)}, mismatches vs served alone {mismatches} "
                  f"(of {len(done)} score + {len(gen)} generate), server exit {code}")
            print(f"  generation: {len(gen)} requests in {t_gen:.2f} s ({len(gen) / t_gen:.1f} req/s)")
            print(f"  CPU while scoring: server {server_cpu / wall:.2f} cores, these clients {cpu / wall:.2f} cores "
                  f"(of {os.cpu_count()})")
            count = re.search(r"^rnnlm_score_batch_sequences_count (\S+)", metrics, re.M)
            total = re.search(r"^rnnlm_score_batch_sequences_sum (\S+)", metrics, re.M)
            if count and total and float(count.group(1)):
                print(f"  {float(count.group(1)):.0f} batched calls, {float(total.group(1)) / float(count.group(1)):.1f} "
                      "sequences per call on average")
            if errors:
                print("  first error:", errors[0][1], errors[0][2])
    if len(results) >= 2:
        (a, ra), (b, rb) = sorted(results.items())[:2]
        print(f"batching (--max-batch {b} vs {a}): {rb / ra:.2f}x the throughput; "
              f"server at {b}: {results[b] * t_batched / len(sentences):.0%} of in-process batched scoring")


if __name__ == "__main__":
    main()
