"""A 1 MiB prompt: reading it through the step graph a token at a time (before) against the
scoring graph a chunk at a time (after), and `rnnlm serve` answering it while staying ready.

    python bench/long_prompt.py [--model DIR] [--data DIR] [--step-sample 20000]

Without --model, a randomly initialised model of the default `lstm` size (256 units, PTB's
10,000 words) is exported with the default 32-step chunk into a temporary directory (needs the
train extra); the weights do not matter for speed. The prompt is PTB valid repeated to 1 MiB.

1. In process: the old path (`step_ids` per token, as generate_ids read a prompt before) on the
   first --step-sample tokens, extrapolated to the whole prompt, against `lm.feed` on all of it.
2. Over HTTP: `rnnlm serve` as a subprocess, POST /v1/completions {max_tokens: 1} with the prompt
   while another client probes /v2/health/ready every 20 ms; the latency of each is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from rnnlm.serve import LanguageModel


def random_bundle(root: Path, data: Path) -> Path:
    """A default-size LSTM with random weights, exported (PTB's vocabulary, chunk 32)."""
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
    save_model_dir(root / "ckpt", TorchLM(cfg), vocab)
    empty = root / "no-data"
    empty.mkdir()
    export_bundle(root / "ckpt", out=root / "bundle", data_dir=empty)
    return root / "bundle"


def one_mib(data: Path) -> str:
    text = (data / "ptb.valid.txt").read_text()
    text = text * ((1 << 20) // len(text) + 1)
    return text[: text.rfind(" ", 0, 1 << 20)]  # about 1 MiB, cut at a space


def in_process(lm: LanguageModel, prompt: str, sample: int) -> tuple[int, float, float]:
    ids = [t.id for t in lm.prompt_tokens(prompt)]
    t = time.perf_counter()
    for _ in lm.position_logprobs(lm.context(), ids[:sample]):
        pass
    before = (time.perf_counter() - t) * len(ids) / min(sample, len(ids))
    t = time.perf_counter()
    lm.feed(lm.context(), ids)
    return len(ids), before, time.perf_counter() - t


def over_http(bundle: Path, prompt: str, threads: int) -> tuple[int, float, list[float]]:
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rnnlm", "serve", "--model", str(bundle), "--port", "0",
                                 "--threads", str(threads), "--max-body-bytes", str(4 << 20), "--timeout", "600",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=log)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb")))
    ap.add_argument("--step-sample", type=int, default=20_000, help="tokens the old path reads (then extrapolated)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    prompt = one_mib(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.model or random_bundle(Path(tmp), args.data)
        lm = LanguageModel.load(bundle, threads=args.threads)
        print(f"model {bundle} ({lm.bundle.manifest['cell']}, chunk {lm.chunk}), {os.cpu_count()} cores, "
              f"onnxruntime {args.threads} threads; prompt {len(prompt):,} characters")
        tokens, before, after = in_process(lm, prompt, args.step_sample)
        print(f"in process, {tokens:,} tokens: step graph per token (before) {before:.1f} s "
              f"({tokens / before:,.0f} tok/s, from {min(args.step_sample, tokens):,} tokens); scoring graph in chunks "
              f"(after) {after:.1f} s ({tokens / after:,.0f} tok/s): {before / after:.2f}x")
        status, seconds, health = over_http(Path(bundle), prompt, args.threads)
    print(f"HTTP /v1/completions max_tokens 1: status {status}, {seconds:.1f} s; /v2/health/ready during it: "
          f"{len(health)} probes, median {statistics.median(health) * 1e3:.1f} ms, p99 "
          f"{np.percentile(health, 99) * 1e3:.1f} ms, max {max(health) * 1e3:.1f} ms, "
          f"{sum(h >= 0.1 for h in health)} at or over 100 ms")


if __name__ == "__main__":
    main()
