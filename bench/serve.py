"""Serving speed: the onnxruntime runtime against PyTorch eager running the same weights, in one run.

    python bench/serve.py [--cells lstm rhn hypernets] [--tokens 20000] [--threads N]

For each cell's default preset (the trained models/<cell> when it exists, else the preset's
initial weights exported to a temporary bundle) it prints:
  1. batch-1 generation step latency, ORT step graph vs torch ``model.step``      (goal >= 4x)
  2. exact scoring tokens/s at batch 1 on PTB test (first --tokens tokens):
     ORT scoring graph vs torch ``evaluate`` (batch 1, state carried)              (goal >= 4x)
     and the alternative of stepping the step graph token by token (why the scoring graph exists)
  3. per-line scoring of 3,000 PTB lines: ORT batched vs a serial per-line loop    (goal >= 10x)
  4. roofline: fp32 weight bytes one step reads / measured GEMV bandwidth, as a fraction of the
     measured step latency                                                          (goal >= 70%)
  5. cold start of ``rnnlm score`` on a one-line file, wall time                    (goal <= 0.6 s)
  6. int8 bundles (models/<cell>/onnx-int8), where present: scoring speed-up and perplexity change
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from rnnlm.export import export_bundle
from rnnlm.serve import LanguageModel as OrtLM

from rnnlm.checkpoint import load_model_dir, save_model_dir
from rnnlm.config import PRESETS, default_preset
from rnnlm.data import Vocabulary, load_ptb
from rnnlm.evaluate import evaluate
from rnnlm.model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemv_bandwidth(rows: int, cols: int, threads: int) -> float:
    """Bytes/s of a float32 matrix-vector product in onnxruntime (the step's dominant operation)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((cols, rows)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.ones((1, cols), np.float32)
    for _ in range(20):
        sess.run(None, {"x": x})
    t = median_time(lambda: [sess.run(None, {"x": x}) for _ in range(50)], 5) / 50
    return w.nbytes / t


def step_weight_bytes(model: LanguageModel) -> int:
    """fp32 bytes of the weights one batch-1 step reads: all but the embedding table (one row)."""
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embedding"))
    if model.cfg.tie_weights:  # the decoder reads the (shared) embedding matrix in full
        n += model.embedding.weight.numel()
    return 4 * (n + model.cfg.emb_size)


def bundle_for(cell: str, tmp: Path) -> tuple[Path, Path]:
    model_dir = ROOT / "models" / cell
    if (model_dir / "onnx" / "manifest.json").exists():
        return model_dir, model_dir / "onnx"
    preset = PRESETS[default_preset(cell)]
    corpus_vocab = Vocabulary([f"w{i}" for i in range(preset.model.vocab_size - 2)] + ["<unk>", "<eos>"])
    torch.manual_seed(0)
    save_model_dir(tmp / cell, LanguageModel(preset.model), corpus_vocab)
    export_bundle(tmp / cell, out=tmp / cell / "onnx")
    return tmp / cell, tmp / cell / "onnx"


def bench_cell(cell: str, args: argparse.Namespace, tmp: Path, bw: float, test_ids: np.ndarray,
               lines: list[str]) -> None:
    model_dir, bundle = bundle_for(cell, tmp)
    model, vocab = load_model_dir(model_dir)
    lm = OrtLM.load(bundle, device="cpu", threads=args.threads)
    print(f"== {cell} ({model.num_parameters() / 1e6:.2f}M parameters, bundle {bundle})")

    # 1. generation step latency, batch 1
    state_t, tok = model.init_state(1), torch.tensor([vocab.eos_id])
    with torch.no_grad():
        for _ in range(20):
            model.step(tok, state_t)
        t_torch = median_time(lambda: [model.step(tok, state_t) for _ in range(100)], 5) / 100
    s, tid = lm.initial_state(1), np.array([vocab.eos_id])
    for _ in range(20):
        lm.step_ids(s, tid)
    t_ort = median_time(lambda: [lm.step_ids(s, tid) for _ in range(100)], 5) / 100
    print(f"  step latency, batch 1: torch {t_torch * 1e6:.0f} us, ort {t_ort * 1e6:.0f} us -> {t_torch / t_ort:.2f}x  (goal >= 4x)")

    # 4. roofline of the step
    wbytes = step_weight_bytes(model)
    ideal = wbytes / bw
    print(f"  roofline: {wbytes / 1e6:.1f} MB of weights per step, ideal {ideal * 1e6:.0f} us at {bw / 1e9:.1f} GB/s "
          f"-> {ideal / t_ort:.0%} of the roofline  (goal >= 70%)")

    # 2. exact scoring, batch 1
    t0 = time.perf_counter()
    ref = evaluate(model, test_ids, start_id=vocab.eos_id, batch_size=1, bptt=lm.chunk)
    t_torch = time.perf_counter() - t0
    toks = [lm.tokenizer.token(vocab.itos[i]) for i in test_ids]
    t0 = time.perf_counter()
    got = lm.score_tokens(toks)
    t_ort = time.perf_counter() - t0
    assert abs(got.nll / ref.nll - 1) < 1e-4, (got.nll, ref.nll)
    n = len(test_ids)
    print(f"  exact scoring, batch 1: torch {n / t_torch:,.0f} tok/s, ort scoring graph {n / t_ort:,.0f} tok/s "
          f"-> {t_torch / t_ort:.2f}x  (goal >= 4x); same nll to {abs(got.nll / ref.nll - 1):.1e}")
    m = min(n, 3000)
    st = lm.initial_state(1)
    t0 = time.perf_counter()
    prev = vocab.eos_id
    for i in test_ids[:m]:
        _, st = lm.step_ids(st, np.array([prev]))
        prev = int(i)
    t_step = (time.perf_counter() - t0) / m
    print(f"  alternative, step graph token by token: {1 / t_step:,.0f} tok/s "
          f"(the scoring graph is {(1 / (t_ort / n)) * t_step:.1f}x faster)")

    # 3. per-line scoring
    t0 = time.perf_counter()
    batched = lm.score_lines(lines, batch_size=64)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    serial = [lm.score(line) for line in lines]
    t_serial = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        for line in lines[:300]:
            ids = torch.tensor([vocab.stoi.get(w, vocab.unk_id) for w in line.split()] + [vocab.eos_id])
            x = torch.cat([torch.tensor([vocab.eos_id]), ids[:-1]])[:, None]
            model(x, model.init_state(1))
        t_torch_lines = (time.perf_counter() - t0) * len(lines) / 300
    assert all(abs(a.nll - b.nll) < 1e-3 for a, b in zip(batched, serial, strict=True))
    print(f"  per-line scoring of {len(lines)} lines: batched {len(lines) / t_batched:,.0f} lines/s; "
          f"serial ort loop {t_serial / t_batched:.1f}x slower, serial torch loop {t_torch_lines / t_batched:.1f}x slower  (goal >= 10x)")

    # 6. int8
    q = model_dir / "onnx-int8"
    if (q / "manifest.json").exists():
        lq = OrtLM.load(q, device="cpu", threads=args.threads)
        t0 = time.perf_counter()
        gq = lq.score_tokens(toks)
        t_q = time.perf_counter() - t0
        print(f"  int8: scoring {t_ort / t_q:.2f}x faster than fp32 (goal >= 1.8x); ppl on these tokens "
              f"{math.exp(got.nll / n):.2f} -> {math.exp(gq.nll / n):.2f} ({math.exp((gq.nll - got.nll) / n) - 1:+.2%}, goal <= 2%)")

    # 5. cold start
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("the stock market fell\n")
    exe = Path(sys.executable).with_name("rnnlm")
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(exe), "score", f.name, "--model", str(bundle), "--device", "cpu"], check=True,
                       capture_output=True)
        walls.append(time.perf_counter() - t0)
    os.unlink(f.name)
    print(f"  cold start of `rnnlm score` on one line: {statistics.median(walls):.2f} s (median of 3; goal <= 0.6 s)\n")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["lstm", "rhn", "hypernets"])
    ap.add_argument("--tokens", type=int, default=20000, help="PTB test tokens for the scoring comparison")
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--data-dir", default=os.environ.get("RNNLM_DATA_DIR", str(ROOT.parent / "shared/data/ptb")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_ptb(args.data_dir, download=False)
    test_ids = corpus.test[: args.tokens]
    lines = (Path(args.data_dir) / "ptb.test.txt").read_text().splitlines()[: args.lines]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}\n")
    bw = gemv_bandwidth(10_000, 256, args.threads)
    print(f"measured GEMV bandwidth (ORT MatMul 256 x 10000 fp32): {bw / 1e9:.1f} GB/s\n")
    with tempfile.TemporaryDirectory() as tmpdir:
        for cell in args.cells:
            bench_cell(cell, args, Path(tmpdir), bw, test_ids, lines)

if __name__ == "__main__":
    main()
