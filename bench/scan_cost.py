"""What one step of an onnxruntime Scan costs at batch 1: the loop itself, a small elementwise node,
and a float32 or int8 product of an RHN's size, on synthetic graphs (no bundle needed).

    python bench/scan_cost.py [--hidden 256] [--steps 20000] [--threads 1,2]

Each graph is a Scan over --steps steps whose body chains the named nodes from a [1, H] state: "loop"
(the state passed through), "+30 Tanh" (30 elementwise nodes), "1 Gemm" and "3 Gemm" (H -> 2H
float32 products, the first half kept, as in an RHN micro-layer), "3 int8" (the same three in the
exporter's int8 form, ``export.quantize.int8_nodes``: what a quantized bundle runs). Printed: microseconds per
step, best of 3. A step graph of N small nodes and P products costs about loop + N x node + P x
product: the bound that bench/RESULTS.md's "The 1 MiB prompt, session 5" quotes. "3 int8, scales
after" is the form the advance graph's bodies take (``export.int8_passes.one_row_scales``): the same
products with unit scales, then a Mul by the column scales and an Add of the bias (zeros here, as
"3 int8" adds them inside the product).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from rnnlm.export.int8_passes import one_row_scales
from rnnlm.export.quantize import int8_nodes


def body(h: int, products: int, elementwise: int, int8: bool) -> tuple[list[NodeProto], list[TensorProto]]:
    """The body's nodes and initializers: ``products`` H -> 2H products (first half kept), then
    ``elementwise`` Tanh nodes, from state ``s`` to ``s_out``."""
    rng = np.random.default_rng(0)
    nodes: list[NodeProto] = []
    inits: list[TensorProto] = []
    prev = "s"
    starts = [numpy_helper.from_array(np.array(v), n) for v, n in (([0], "zero"), ([h], "h"), ([1], "axis"))]
    for i in range(products):
        w = (rng.standard_normal((h, 2 * h)) * 0.01).astype(np.float32)
        if int8:  # the exporter's own int8 form, its bias (zeros) added by the product
            product, weights = int8_nodes(prev, f"g{i}", f"w{i}", w, f"b{i}", 1.0)
            nodes += product
            inits += [*weights, numpy_helper.from_array(np.zeros(2 * h, np.float32), f"b{i}")]
        else:
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(2 * h, np.float32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        nodes.append(helper.make_node("Slice", [f"g{i}", "zero", "h", "axis"], [f"q{i}"]))
        prev = f"q{i}"
    for j in range(elementwise):
        nodes.append(helper.make_node("Tanh", [prev], [f"e{j}"]))
        prev = f"e{j}"
    nodes += [helper.make_node("Add", [prev, "x"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y"])]
    return nodes, inits + (starts if products else [])


def vi(name: str, shape: list[int | str]) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def scan_model(h: int, products: int, elementwise: int, int8: bool, scales_after: bool = False) -> bytes:
    nodes, inits = body(h, products, elementwise, int8)
    g = helper.make_graph(nodes, "body", [vi("s", [1, h]), vi("x", [1, h])], [vi("s_out", [1, h]), vi("y", [1, h])],
                          initializer=inits)
    if scales_after:
        one_row_scales(g)
    scan = helper.make_node("Scan", ["s0", "xs"], ["sN", "ys"], num_scan_inputs=1, body=g)
    outer = helper.make_graph([scan], "scan", [vi("s0", [1, h]), vi("xs", ["T", 1, h])], [vi("sN", [1, h]), vi("ys", ["T", 1, h])])
    model = helper.make_model(outer, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=9)
    return model.SerializeToString()


CASES = {"loop": (0, 0, False, False), "+30 Tanh": (0, 30, False, False), "1 Gemm": (1, 0, False, False),
         "3 Gemm": (3, 0, False, False), "3 int8": (3, 0, True, False), "3 int8, scales after": (3, 0, True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    h = args.hidden
    xs, s0 = np.zeros((args.steps, 1, h), np.float32), np.zeros((1, h), np.float32)
    for threads in (int(n) for n in args.threads.split(",")):
        row = []
        for name, (products, elementwise, int8, scales_after) in CASES.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.log_severity_level = threads, 3
            sess = ort.InferenceSession(scan_model(h, products, elementwise, int8, scales_after), opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"s0": s0, "xs": xs[:100]})
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                sess.run(None, {"s0": s0, "xs": xs})
                best = min(best, time.perf_counter() - t)
            row.append(f"{name} {best / args.steps * 1e6:.2f}")
        print(f"{threads} thread(s), H={h}, us per step: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
