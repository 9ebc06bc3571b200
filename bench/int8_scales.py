"""An int8 product (``export.quantize.int8_nodes``) with its per-column scales inside
MatMulIntegerToFloat ("fused", every graph's form) against the same product with unit scales, then a
Mul by the column scales and an Add of the bias ("after", ``export.int8_passes.one_row_scales``: the
advance graph's Scan bodies), one node graph each, at several rows per call. Both give the same
output to the bit (checked here too); which is faster depends on the rows, which is why only the
advance graph, one row per step, takes "after".

    python bench/int8_scales.py [--shapes 256x512,256x1024] [--rows 1,64,128,4096] [--threads 1]

Printed: microseconds per call (best of 7 interleaved rounds) and after / fused.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rnnlm.export.int8_passes import one_row_scales
from rnnlm.export.quantize import MS_DOMAIN, int8_nodes


def product_model(k: int, n: int, after: bool) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits = int8_nodes("x", "y", "w", (rng.standard_normal((k, n)) * 0.05).astype(np.float32), "b", 4.0)
    inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
    graph = helper.make_graph(nodes, "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    if after:
        one_row_scales(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)],
                              ir_version=9)
    return model.SerializeToString()


def best_us(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int = 7) -> dict[str, float]:
    calls = max(10, 20_000 // len(x))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            for _ in range(calls):
                sess.run(None, {"x": x})
            times[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256x512,256x1024")
    ap.add_argument("--rows", default="1,64,128,4096")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        sessions = {form: ort.InferenceSession(product_model(k, n, form == "after"), opts, providers=["CPUExecutionProvider"])
                    for form in ("fused", "after")}
        for rows in (int(r) for r in args.rows.split(",")):
            x = (np.random.default_rng(rows).standard_normal((rows, k)) * 2).astype(np.float32)
            same = np.array_equal(*(s.run(None, {"x": x})[0].view(np.uint32) for s in sessions.values()))
            us = best_us(sessions, x)
            print(f"{k}x{n}, {rows:5d} rows, {args.threads} thread(s): fused {us['fused']:9.1f} us, after {us['after']:9.1f} us, "
                  f"after / fused {us['after'] / us['fused']:.2f}; same bits: {same}", flush=True)


if __name__ == "__main__":
    main()
