"""A 1 MiB prompt: reading it through the step graph a token at a time (oldest), the scoring graph a
chunk at a time (before), and the advance graph (after: the recurrence without the vocabulary
projection), and `rnnlm serve` answering it while staying ready, with and without the advance graph.

    python bench/long_prompt.py [--model DIR] [--data DIR] [--step-sample 20000] [--advance-chunks 64,128,256]

Without --model, a randomly initialised model of the default `lstm` size (256 units, PTB's
10,000 words) is exported with the default 32-step scoring chunk, once per advance chunk, into a
temporary directory (or --out; needs the train extra); the weights do not matter for speed. The
prompt is PTB valid repeated to 1 MiB. "without advance" is the same bundle with the advance graph
taken out of its manifest, as a bundle exported before it existed.

1. In process: `step_ids` per token on the first --step-sample tokens (0: skip), extrapolated to the
   whole prompt; `lm.feed` (scoring graph) on all of it; then, for each advance chunk, the advance
   session's creation time and `lm.advance` on all of it.
2. Over HTTP: `rnnlm serve` as a subprocess, POST /v1/completions {max_tokens: 1} with the prompt
   while another client probes /v2/health/ready every 20 ms; the latency of each is printed, for the
   bundle without and with the advance graph (the first --advance-chunks entry).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np
from rnnlm.serve import LanguageModel


def random_bundles(root: Path, data: Path, chunks: list[int]) -> list[Path]:
    """A default-size LSTM with random weights, exported once per advance chunk (PTB's vocabulary,
    scoring chunk 32)."""
    import torch
    from rnnlm.export import export_bundle

    from rnnlm.checkpoint import save_model_dir
    from rnnlm.config import ModelConfig
    from rnnlm.data import Vocabulary
    from rnnlm.model import LanguageModel as TorchLM

    words = sorted({w for line in (data / "ptb.train.txt").read_text().splitlines() for w in line.split()} - {"<unk>"})
    vocab = Vocabulary([*words, "<unk>", "<eos>"])
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", vocab_size=len(vocab.itos))
    if not (root / "ckpt").is_dir():
        save_model_dir(root / "ckpt", TorchLM(cfg), vocab)
    empty = root / "no-data"
    empty.mkdir(exist_ok=True)
    for c in chunks:
        if not (root / f"bundle-a{c}" / "manifest.json").is_file():  # --out keeps them for the next run
            export_bundle(root / "ckpt", out=root / f"bundle-a{c}", data_dir=empty, advance_chunk=c, force=True)
    return [root / f"bundle-a{c}" for c in chunks]


def without_advance(bundle: Path, dst: Path) -> Path:
    """A copy of ``bundle`` as exported before the advance graph existed (prompts read by the scoring graph)."""
    import json
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["graphs"].pop("advance", None)
    if m["files"].pop("advance.onnx", None) is not None:
        (dst / "advance.onnx").unlink()
    (dst / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return dst


def one_mib(data: Path) -> str:
    text = (data / "ptb.valid.txt").read_text()
    text = text * ((1 << 20) // len(text) + 1)
    return text[: text.rfind(" ", 0, 1 << 20)]  # about 1 MiB, cut at a space


def step_graph_seconds(lm: LanguageModel, ids: list[int], sample: int) -> float:
    """Seconds for the whole prompt through the step graph per token, extrapolated from ``sample``
    tokens (nan when 0)."""
    if not sample:
        return float("nan")
    t = time.perf_counter()
    for _ in lm.position_logprobs(lm.context(), ids[:sample]):
        pass
    return (time.perf_counter() - t) * len(ids) / min(sample, len(ids))


def advance_lms(bundles: list[Path], threads: list[str], session_threads: int) -> list[tuple[LanguageModel, float]]:
    """Each bundle loaded once per advance thread count ("auto": the runtime's choice), with its
    advance session created: the runtime and the seconds that creation took (with the check against
    the scoring graph)."""
    out = []
    for b in bundles:
        for n in threads:
            lm = LanguageModel.load(b, threads=session_threads)
            if n != "auto":
                lm.advance_threads = int(n)
            t = time.perf_counter()
            lm.session("advance")
            out.append((lm, time.perf_counter() - t))
    return out


def interleaved(runners: Sequence[Callable[[], object]], repeat: int) -> list[list[float]]:
    """Seconds of each runner, ``repeat`` times, interleaved so that load changes fall on all alike."""
    runs: list[list[float]] = [[] for _ in runners]
    for _ in range(repeat):
        for run, r in zip(runners, runs, strict=True):
            t = time.perf_counter()
            run()
            r.append(time.perf_counter() - t)
    return runs


def over_http(bundle: Path, prompt: str, threads: int, thread_pool: str = "shared") -> tuple[int, float, list[float]]:
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rnnlm", "serve", "--model", str(bundle), "--port", "0",
                                 "--threads", str(threads), "--max-body-bytes", str(4 << 20), "--timeout", "600",
                                 "--thread-pool", thread_pool, "--log-level", "warning"],
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)", Path(log.name).read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(Path(log.name).read_text())
                time.sleep(0.05)
            url = f"http://127.0.0.1:{m.group(1)}"
            with httpx.Client(timeout=10) as http:
                while http.get(url + "/v2/health/ready").status_code != 200:
                    time.sleep(0.05)
                name = http.get(url + "/v1/models").json()["data"][0]["id"]
                done: dict[str, float | int] = {}

                def send() -> None:
                    t = time.perf_counter()
                    r = httpx.post(url + "/v1/completions", timeout=600,
                                   json={"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0})
                    done["seconds"], done["status"] = time.perf_counter() - t, r.status_code

                worker = threading.Thread(target=send)
                worker.start()
                health = []
                while worker.is_alive():
                    t = time.perf_counter()
                    http.get(url + "/v2/health/ready")
                    health.append(time.perf_counter() - t)
                    time.sleep(0.02)
                worker.join()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return int(done["status"]), float(done["seconds"]), health


def report_http(label: str, status: int, seconds: float, health: list[float]) -> None:
    print(f"HTTP /v1/completions max_tokens 1, {label}: status {status}, {seconds:.1f} s; /v2/health/ready during "
          f"it: {len(health)} probes, median {statistics.median(health) * 1e3:.1f} ms, p99 "
          f"{np.percentile(health, 99) * 1e3:.1f} ms, max {max(health) * 1e3:.1f} ms, "
          f"{sum(h >= 0.1 for h in health)} at or over 100 ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a bundle (with an advance graph, for the after rows)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb")))
    ap.add_argument("--step-sample", type=int, default=20_000, help="tokens the oldest path reads (then extrapolated)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--advance-chunks", default="128", help="advance chunks to export and compare (without --model)")
    ap.add_argument("--out", type=Path, default=None, help="keep the exported bundles here (default: a temporary dir)")
    ap.add_argument("--no-http", action="store_true", help="in process only")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each in-process path (interleaved; median)")
    ap.add_argument("--no-score", action="store_true", help="skip the scoring graph's in-process run")
    ap.add_argument("--advance-threads", default="auto", help="intra-op threads of the advance session to compare, "
                    "e.g. 1,2 (auto: the runtime's choice, serve.graphs.advance_threads)")
    ap.add_argument("--thread-pool", default="shared", choices=("shared", "per-session"), help="the server's --thread-pool")
    args = ap.parse_args()
    prompt = one_mib(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        chunks = [int(c) for c in args.advance_chunks.split(",")]
        bundles = [args.model] if args.model else random_bundles(root, args.data, chunks)
        old = without_advance(bundles[0], root / "bundle-no-advance")
        lm = LanguageModel.load(old, threads=args.threads)
        ids = [t.id for t in lm.prompt_tokens(prompt)]
        print(f"model {bundles[0]} ({lm.bundle.manifest['cell']}, scoring chunk {lm.chunk}), {os.cpu_count()} cores, "
              f"onnxruntime {args.threads} threads; prompt {len(prompt):,} characters, {len(ids):,} tokens")
        step = step_graph_seconds(lm, ids, args.step_sample)
        advancing = advance_lms(bundles, args.advance_threads.split(","), args.threads)
        runners = [] if args.no_score else [functools.partial(lm.feed, lm.context(), ids)]
        runners += [functools.partial(m.advance, m.context(), ids) for m, _ in advancing]
        runs = interleaved(runners, args.repeat)
        score = float("nan") if args.no_score else statistics.median(runs.pop(0))
        print(f"in process ({args.repeat} interleaved runs each, medians): step graph per token {step:.1f} s "
              f"({len(ids) / step:,.0f} tok/s, from {min(args.step_sample, len(ids)):,} tokens); scoring graph in "
              f"chunks (before) {score:.1f} s ({len(ids) / score:,.0f} tok/s)")
        for (m, created), r in zip(advancing, runs, strict=True):
            seconds = statistics.median(r)
            print(f"in process: advance graph, chunk {m.advance_chunk}, {m.advance_threads} thread(s) (after): session "
                  f"created in {created:.2f} s, prompt read in {seconds:.1f} s (min {min(r):.1f} s; "
                  f"{len(ids) / seconds:,.0f} tok/s): {score / seconds:.2f}x the scoring graph, "
                  f"{step / seconds:.2f}x the step graph")
        del lm, advancing, runners
        if not args.no_http:
            report_http("without advance (before)", *over_http(old, prompt, args.threads, args.thread_pool))
            report_http(f"with advance, chunk {chunks[0]} (after)",
                        *over_http(bundles[0], prompt, args.threads, args.thread_pool))


if __name__ == "__main__":
    main()
