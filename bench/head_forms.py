"""The scoring graph's head: target log-probabilities from logits, four ways, side by side in one run.

    python bench/head_forms.py [--rows 32 2048] [--threads N]

The scoring graph needs, per position, log p(target) = logit[target] - logsumexp(logits). It can be
built from ONNX operators as:
  log_softmax   LogSoftmax over the vocabulary, then GatherElements of the target (what export writes)
  reduce_lse    ReduceLogSumExp (the normaliser alone, no [rows, vocab] output), GatherElements, Sub
  manual_lse    ReduceMax, Sub, Exp, ReduceSum, Log, then the target's shifted logit minus it
  softmax_log   Softmax, GatherElements, Log (one exponential pass; loses log-probabilities below ~-87)
each after the same decoder product (256 x 10,000, float32 MatMul + bias, or int8 DynamicQuantizeMatMul),
at the rows one call meets: 32 (a chunk at batch 1) and 2,048 (a chunk of 64 lines). Prints each
form's time and its ratio to log_softmax; the decoder product alone (logits_only) bounds what any
head can save.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rnnlm.export.quantize import int8_weights

K, N = 256, 10_000


def head(kind: str) -> list:
    node = helper.make_node
    if kind == "logits_only":
        return [node("GatherElements", ["l", "t"], ["y"], axis=-1)]
    if kind == "log_softmax":
        return [node("LogSoftmax", ["l"], ["ls"], axis=-1), node("GatherElements", ["ls", "t"], ["y"], axis=-1)]
    if kind == "reduce_lse":
        return [node("ReduceLogSumExp", ["l", "ax"], ["lse"], keepdims=1), node("GatherElements", ["l", "t"], ["g"], axis=-1),
                node("Sub", ["g", "lse"], ["y"])]
    if kind == "manual_lse":
        return [node("ReduceMax", ["l", "ax"], ["mx"], keepdims=1), node("Sub", ["l", "mx"], ["d"]), node("Exp", ["d"], ["e"]),
                node("ReduceSum", ["e", "ax"], ["s"], keepdims=1), node("Log", ["s"], ["ls"]),
                node("GatherElements", ["d", "t"], ["g"], axis=-1), node("Sub", ["g", "ls"], ["y"])]
    if kind == "softmax_log":
        return [node("Softmax", ["l"], ["sm"], axis=-1), node("GatherElements", ["sm", "t"], ["g"], axis=-1), node("Log", ["g"], ["y"])]
    raise ValueError(kind)


def model(kind: str, decoder: str, w: np.ndarray, b: np.ndarray) -> bytes:
    if decoder == "int8":
        q, s = int8_weights(w)
        product = [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws"], ["m"], domain="com.microsoft")]
        inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(s, "ws")]
    else:
        product = [helper.make_node("MatMul", ["x", "w"], ["m"])]
        inits = [numpy_helper.from_array(w, "w")]
    nodes = [*product, helper.make_node("Add", ["m", "b"], ["l"]), *head(kind)]
    inits += [numpy_helper.from_array(b, "b")]
    if any("ax" in n.input for n in nodes):
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K]),
                                              helper.make_tensor_value_info("t", TensorProto.INT64, ["m", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 1])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 2048])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    kinds = ["logits_only", "log_softmax", "reduce_lse", "manual_lse", "softmax_log"]
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    for decoder in ("fp32", "int8"):
        for rows in args.rows:
            x = rng.standard_normal((rows, K)).astype(np.float32)
            t = rng.integers(0, N, (rows, 1))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            sessions = {k: ort.InferenceSession(model(k, decoder, w, b), opts, providers=["CPUExecutionProvider"]) for k in kinds}
            ref = sessions["log_softmax"].run(None, {"x": x, "t": t})[0]
            calls = max(2, int(400 / rows))
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.rounds):  # interleaved: load changes fall on every form alike
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        y = s.run(None, {"x": x, "t": t})[0]
                    times[k].append((time.perf_counter() - t0) / calls)
                    if k not in ("logits_only",):
                        assert np.abs(y - ref).max() < 1e-3, (k, np.abs(y - ref).max())
            base = statistics.median(times["log_softmax"])
            print(f"decoder {decoder}, {rows} rows: " + ", ".join(
                f"{k} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.2f})" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
