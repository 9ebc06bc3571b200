"""Serving speed, four peers side by side in one run per cell, with the ratios the goals name.

    python bench/serve.py --models /work/trained --bundles /work/trained-bundles-perf [--cells lstm rhn hypernets]

Peers, all on the same weights (the checkpoint MODELS/<cell>):
  torch fp32   PyTorch eager, float32
  torch int8   ``torch.ao.quantization.quantize_dynamic`` on the nn.Linear modules (what a PyTorch user tries first)
  rnnlm fp32   the float32 bundle  BUNDLES/<cell>/onnx        (exported first when missing)
  rnnlm quant  the quantized bundle BUNDLES/<cell>/onnx-quant  (``rnnlm export --quantize auto``)

Per cell it prints:
  1. batch-1 generation step latency                     goal: quant >= 4x torch fp32 and >= 1.5x torch int8
  2. exact scoring of PTB test at batch 1 (state carried) goal: quant >= 4x torch fp32
     and every peer's perplexity: fp32 bundle vs torch to 1e-6, quantized rise <= 1 % (test and valid)
  3. per-line scoring of PTB test lines (3,000), batched and sorted by length, vs a serial torch loop (goal >= 10x);
     the decoder product's share of the batched run (onnxruntime's profiler) and its FLOP/s against a plain
     GEMM of the same shape and form in the same run (goal >= 50 %)
  4. cold start of ``rnnlm score`` on a one-line file, median of 5       goal <= 0.4 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from cold_start import score_one_line
from rnnlm.export import export_bundle
from rnnlm.export.form_timing import one_node_model
from rnnlm.serve import LanguageModel as OrtLM

from rnnlm.checkpoint import load_model_dir
from rnnlm.data import load_ptb
from rnnlm.model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_int8(model: LanguageModel) -> tuple[LanguageModel, list[str]]:
    """quantize_dynamic on every nn.Linear the model's code does not read as a plain tensor (a cell's
    ``input_proj.weight`` gives the state's dtype; HyperLSTM slices its hyper cell's weight)."""
    from torch.ao.quantization import quantize_dynamic

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and not n.endswith("input_proj")}
    q = quantize_dynamic(model, names, dtype=torch.qint8)
    return q, sorted(names)


def bundles_for(cell: str, models: Path, bundles: Path, data_dir: str) -> tuple[Path, Path]:
    fp32, quant = bundles / cell / "onnx", bundles / cell / "onnx-quant"
    if not (fp32 / "manifest.json").exists():
        export_bundle(models / cell, out=fp32, data_dir=data_dir)
    if not (quant / "manifest.json").exists():
        export_bundle(models / cell, out=quant, data_dir=data_dir, quantize="auto")
    return fp32, quant


def step_latency(model: LanguageModel, lms: dict[str, OrtLM], tq: LanguageModel, eos: int) -> dict[str, float]:
    out = {}
    tok = torch.tensor([eos])
    with torch.no_grad():
        for name, m in (("torch fp32", model), ("torch int8", tq)):
            state = m.init_state(1)
            for _ in range(20):
                m.step(tok, state)
            out[name] = median_time(lambda m=m, state=state: [m.step(tok, state) for _ in range(100)]) / 100
    tid = np.array([eos])
    for name, lm in lms.items():
        s = lm.initial_state(1)
        for _ in range(20):
            lm.step_ids(s, tid)
        out[name] = median_time(lambda lm=lm, s=s: [lm.step_ids(s, tid) for _ in range(100)]) / 100
    return out


def exact_scoring(model: LanguageModel, tq: LanguageModel, lms: dict[str, OrtLM], ids: np.ndarray, eos: int,
                  chunk: int, pieces: int = 8) -> dict[str, tuple[float, float]]:
    """(seconds, nll) of each peer scoring ``ids`` as one stream at batch 1, the state carried from the
    first token to the last. The stream is read in ``pieces`` consecutive pieces and the peers take
    turns piece by piece, so that a slow spell of this VM (its speed moves by 1.5x over minutes) falls
    on every peer alike rather than on whichever ran then; each peer's seconds are its pieces' sum."""
    readers: dict[str, Callable[[np.ndarray], float]] = {
        "torch fp32": torch_reader(model, eos, chunk), "torch int8": torch_reader(tq, eos, chunk),
        **{name: runtime_reader(lm) for name, lm in lms.items()}}
    seconds, nll = dict.fromkeys(readers, 0.0), dict.fromkeys(readers, 0.0)
    for piece in np.array_split(np.asarray(ids, np.int64), pieces):
        for name, read in readers.items():
            t0 = time.perf_counter()
            nll[name] += read(piece)
            seconds[name] += time.perf_counter() - t0
    return {name: (seconds[name], nll[name]) for name in readers}


def torch_reader(model: LanguageModel, eos: int, chunk: int) -> Callable[[np.ndarray], float]:
    """A function that reads the next piece of one stream through PyTorch eager, ``chunk`` steps per
    forward call as ``rnnlm.evaluate.evaluate`` at batch 1 does, and returns the piece's NLL."""
    model.eval()
    state, prev = model.init_state(1), eos

    @torch.no_grad()
    def read(piece: np.ndarray) -> float:
        nonlocal state, prev
        inputs = np.concatenate([[prev], piece[:-1]])
        total = 0.0
        for i in range(0, len(piece), chunk):
            x = torch.from_numpy(inputs[i : i + chunk, None])
            logits, state = model(x, state)
            y = torch.from_numpy(piece[i : i + chunk])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="sum").double())
        prev = int(piece[-1])
        return total

    return read


def runtime_reader(lm: OrtLM) -> Callable[[np.ndarray], float]:
    """The same for a bundle: ``LanguageModel.feed`` carries the context from piece to piece."""
    ctx = lm.context()

    def read(piece: np.ndarray) -> float:
        nonlocal ctx
        logprobs, ctx = lm.feed(ctx, piece)
        return -float(logprobs.sum())

    return read


def torch_line_loop(model: LanguageModel, lines: list[list[int]], eos: int, repeat: int = 2) -> float:
    """Seconds for a serial PyTorch loop: each line from a fresh state, its log-probabilities (best of
    ``repeat``, as ``timed_lines``)."""
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            for ids in lines:
                y = torch.tensor(ids)
                x = torch.cat([torch.tensor([eos]), y[:-1]])[:, None]
                logits, _ = model(x, model.init_state(1))
                torch.log_softmax(logits[:, 0], -1).gather(1, y[:, None])
            times.append(time.perf_counter() - t0)
    return min(times)


def decoder_nodes(bundle: Path) -> tuple[set[str], dict[str, Any]]:
    """Names of the scoring graph's nodes that compute the decoder product, and the product's manifest row."""
    m = json.loads((bundle / "manifest.json").read_text())
    vocab = m["vocab"]["size"]
    graph = onnx.load(str(bundle / "score.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    names, row = set(), {"form": "fp32"}
    for n in graph.node:
        w = n.input[1] if len(n.input) > 1 else ""
        if n.op_type in ("MatMul", "Gemm", "MatMulIntegerToFloat", "MatMulNBits") and w in inits:
            dims = list(inits[w].dims)
            attrs = {a.name: a.i for a in n.attribute}
            out_dim = dims[0] if n.op_type == "Gemm" and attrs.get("transB") else dims[-1]
            if (n.op_type in ("MatMul", "Gemm") and out_dim == vocab) or (n.op_type not in ("MatMul", "Gemm") and vocab in dims):
                names.add(n.name)
                k = attrs["K"] if n.op_type == "MatMulNBits" else dims[1] if n.op_type == "Gemm" and attrs.get("transB") else dims[0]
                form = {"MatMul": "fp32", "Gemm": "fp32", "MatMulIntegerToFloat": "int8"}.get(n.op_type, "nbits4")
                row = {"form": form, "shape": [k, vocab]}
    q = m.get("quantization") or {}
    for p in q.get("products", []):
        if p["graph"] == "score" and p["shape"][1] == vocab:
            row["form"], row["shape"] = p["chosen"], p["shape"]
    return names, row


def timed_lines(lm: OrtLM, seqs: list[list[int]], batch: int, repeat: int = 2) -> float:
    """Seconds of batched per-line scoring through the runtime's own session (best of ``repeat``)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        lm.sequence_logprobs(seqs, batch_size=batch)
        times.append(time.perf_counter() - t0)
    return min(times)


def profiled_lines(lm: OrtLM, bundle: Path, seqs: list[list[int]], batch: int, threads: int,
                   passes: int = 2) -> dict[str, Any]:
    """Batched per-line scoring timed without the profiler (``wall``), then ``passes`` more times with
    onnxruntime's profiler on, for where the time goes: decoder time, rows and FLOP/s, from the pass
    whose decoder ran fastest (as the plain GEMM it is compared with keeps its best call). The
    profiler costs time per node run (a Scan body's nodes run once per step), so its own wall time
    is not the one reported."""
    wall = timed_lines(lm, seqs, batch)
    names, row = decoder_nodes(bundle)
    profiled = min((profiled_pass(lm, bundle, seqs, batch, threads, names) for _ in range(passes)),
                   key=lambda p: p["decoder"])
    return {"wall": wall, **profiled, "k": int(row.get("shape", [0, 0])[0] or 0), "form": row["form"]}


def profiled_pass(lm: OrtLM, bundle: Path, seqs: list[list[int]], batch: int, threads: int,
                  names: set[str]) -> dict[str, float]:
    """One batched per-line pass through a profiled session of the same graph: the decoder nodes'
    (``names``) seconds, rows and calls, and the session's own run time."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_mem_reuse = False
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    sess = ort.InferenceSession(str(bundle / "score.onnx"), opts, providers=["CPUExecutionProvider"])
    plain, lm._sessions["score"] = lm._sessions.get("score"), sess  # the bench's own session: same graph, profiled
    t0 = time.perf_counter()
    lm.sequence_logprobs(seqs, batch_size=batch)
    profiled_wall = time.perf_counter() - t0
    if plain is not None:
        lm._sessions["score"] = plain
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    dec = [e for e in runs if e["name"].removesuffix("_kernel_time") in names]
    model_runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    rows = sum(int(np.prod(e["args"].get("output_type_shape", [{}])[0].get("float", [0])[:-1]) or 0) for e in dec)
    return {"profiled_wall": profiled_wall, "runs": sum(e["dur"] for e in model_runs) / 1e6,
            "decoder": sum(e["dur"] for e in dec) / 1e6, "rows": rows, "calls": len(dec)}


def plain_gemm(form: str, k: int, n: int, rows: int, threads: int) -> float:
    """FLOP/s of a one-node graph computing the same product shape in the same form, in this run."""
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    sess = ort.InferenceSession(one_node_model(form if form != "nbits4" else "int8", w, float(np.abs(x).max())), opts,
                                providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x})
    # Its best of 10 calls: the most this machine showed it can do (a median of 5 was sometimes caught by a
    # slow moment and read the decoder above 100 % of it).
    t = min(median_time(lambda: sess.run(None, {"x": x}), 1) for _ in range(10))
    return 2 * rows * k * n / t


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def bench_cell(cell: str, args: argparse.Namespace, corpus: Any, lines: list[str]) -> dict[str, Any]:
    print(f"== {cell}   load before: {os.getloadavg()[0]:.2f}", flush=True)
    fp32_dir, quant_dir = bundles_for(cell, Path(args.models), Path(args.bundles), args.data_dir)
    model, vocab = load_model_dir(Path(args.models) / cell)
    model.eval()
    tq, qnames = torch_int8(model)
    lms = {"rnnlm fp32": OrtLM.load(fp32_dir, device="cpu", threads=args.threads),
           "rnnlm quant": OrtLM.load(quant_dir, device="cpu", threads=args.threads)}
    qm = json.loads((quant_dir / "manifest.json").read_text())["quantization"]
    choices = ", ".join(f"{p['graph']}:{p['shape'][0]}x{p['shape'][1]}/{p['rows_per_call']}r={p['chosen']}" for p in qm["products"])
    print(f"  {model.num_parameters() / 1e6:.2f}M parameters; torch int8 quantizes {len(qnames)} Linear modules; "
          f"rnnlm quant products: {choices}")
    res: dict[str, Any] = {"cell": cell}

    step = step_latency(model, lms, tq, vocab.eos_id)
    res["step"] = step
    print("  1. step latency, batch 1: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in step.items()))
    print(f"     quant vs torch fp32 {ratio(step['torch fp32'], step['rnnlm quant'])} (goal >= 4x); "
          f"vs torch int8 {ratio(step['torch int8'], step['rnnlm quant'])} (goal >= 1.5x); "
          f"fp32 bundle vs torch fp32 {ratio(step['torch fp32'], step['rnnlm fp32'])}", flush=True)

    test = corpus.test[: args.tokens] if args.tokens else corpus.test
    sc = exact_scoring(model, tq, lms, test, vocab.eos_id, lms["rnnlm fp32"].score_steps(1))  # the same steps per call
    res["scoring"] = {k: {"seconds": t, "nll": n, "ppl": math.exp(n / len(test))} for k, (t, n) in sc.items()}
    n = len(test)
    print(f"  2. exact scoring, PTB test ({n:,} tokens), batch 1: " + ", ".join(
        f"{k} {n / t:,.0f} tok/s ppl {math.exp(v / n):.4f}" for k, (t, v) in sc.items()))
    fp32_diff = abs(sc["rnnlm fp32"][1] / sc["torch fp32"][1] - 1)
    rise_test = math.exp((sc["rnnlm quant"][1] - sc["rnnlm fp32"][1]) / n) - 1
    print(f"     quant vs torch fp32 {ratio(sc['torch fp32'][0], sc['rnnlm quant'][0])} (goal >= 4x); "
          f"fp32 bundle nll vs torch: {fp32_diff:.1e} relative (goal <= 1e-6); quant ppl rise on test {rise_test:+.3%} "
          f"(goal <= 1 %)", flush=True)
    if args.valid:
        valid = corpus.valid
        v32 = lms["rnnlm fp32"].score_tokens([lms["rnnlm fp32"].tokenizer.token(vocab.itos[i]) for i in valid]).nll
        vq = lms["rnnlm quant"].score_tokens([lms["rnnlm quant"].tokenizer.token(vocab.itos[i]) for i in valid]).nll
        rise_valid = math.exp((vq - v32) / len(valid)) - 1
        res["valid"] = {"fp32_ppl": math.exp(v32 / len(valid)), "quant_ppl": math.exp(vq / len(valid)), "rise": rise_valid}
        print(f"     PTB valid: fp32 bundle ppl {math.exp(v32 / len(valid)):.4f}, quant {math.exp(vq / len(valid)):.4f}: "
              f"rise {rise_valid:+.3%} (goal <= 1 %)", flush=True)

    seqs = [[t.id for t in lms["rnnlm quant"].tokenizer.line_tokens(line)] for line in lines]
    seqs = [s for s in seqs if s]
    t_torch = torch_line_loop(model, seqs, vocab.eos_id)
    per = {name: profiled_lines(lm, d, seqs, args.batch, args.threads)
           for (name, lm), d in zip(lms.items(), (fp32_dir, quant_dir), strict=True)}
    res["lines"] = {"torch serial": t_torch, **per}
    print(f"  3. per-line scoring of {len(seqs):,} lines: serial torch loop {len(seqs) / t_torch:,.0f} lines/s; " + ", ".join(
        f"{k} batched {len(seqs) / p['wall']:,.0f} lines/s ({ratio(t_torch, p['wall'])})" for k, p in per.items())
        + "  (goal quant >= 10x)")
    for k, p in per.items():
        if not p["calls"]:
            continue
        rows = p["rows"] / p["calls"]
        achieved = 2 * p["rows"] * p["k"] * len(vocab) / p["decoder"]
        plain = plain_gemm(p["form"], p["k"], len(vocab), int(rows), args.threads)
        p.update(achieved=achieved, plain=plain, rows_per_call=rows)
        print(f"     {k}: decoder ({p['form']}) {p['decoder']:.2f} s of {p['runs']:.2f} s in the graph "
              f"({p['decoder'] / p['runs']:.0%}), {rows:.0f} rows/call, {achieved / 1e9:.1f} GFLOP/s vs plain GEMM "
              f"{plain / 1e9:.1f} GFLOP/s = {achieved / plain:.0%} (goal >= 50 %)", flush=True)

    res["cold"] = {"rnnlm fp32": score_one_line(fp32_dir), "rnnlm quant": score_one_line(quant_dir)}
    print("  4. cold start of `rnnlm score` on one line (median of 5): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in res["cold"].items()) + "  (goal <= 0.4 s)")
    print(f"  load after: {os.getloadavg()[0]:.2f}\n", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="+", default=["lstm", "rhn", "hypernets"])
    ap.add_argument("--models", default=str(ROOT / "models"), help="checkpoint directories MODELS/<cell>")
    ap.add_argument("--bundles", default=str(ROOT / "models"), help="bundles in BUNDLES/<cell>/onnx and onnx-quant")
    ap.add_argument("--tokens", type=int, default=0, help="PTB test tokens for exact scoring (0: all)")
    ap.add_argument("--lines", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64, help="lines per onnxruntime call in per-line scoring")
    ap.add_argument("--no-valid", dest="valid", action="store_false", help="skip the PTB valid perplexity rise")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--data-dir", default=os.environ.get("RNNLM_DATA_DIR", str(ROOT.parent / "shared/data/ptb")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_ptb(args.data_dir, download=False)
    lines = (Path(args.data_dir) / "ptb.test.txt").read_text().splitlines()[: args.lines]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}; load {os.getloadavg()}\n")
    results = [bench_cell(cell, args, corpus, lines) for cell in args.cells]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
