"""``export.int8_passes``: merging int8 products that quantize one tensor alike, and applying their
scales after the product at one row. Both must leave every output equal to the bit, checked here on
onnxruntime against the graph as ``quantize.int8_nodes`` writes it, at one row and at several; and the
quantized HyperLSTM bundle's advance graph, written with both, must reach its scoring graph's state
exactly.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bundles import Built, export
from onnx import TensorProto, helper
from rnnlm.export import int8_passes
from rnnlm.export.passes import graphs_of, scan_bodies
from rnnlm.export.quantize import MS_DOMAIN, int8_nodes

K = 48


def products_graph() -> onnx.ModelProto:
    """x -> three int8 products: two with x's activation range 2.0 (one with a bias), one with 3.0; and
    a fourth of x's square, which shares nothing; outputs y0..y3."""
    rng = np.random.default_rng(5)
    nodes: list[onnx.NodeProto] = [helper.make_node("Mul", ["x", "x"], ["x2"])]
    inits: list[onnx.TensorProto] = []
    for i, (source, width, act_range, bias) in enumerate([("x", 40, 2.0, True), ("x", 24, 2.0, False),
                                                          ("x", 16, 3.0, False), ("x2", 8, 2.0, True)]):
        w = rng.standard_normal((K, width)).astype(np.float32) * 0.2
        if bias:
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}"))
        new, weights = int8_nodes(source, f"y{i}", f"w{i}", w, f"b{i}" if bias else "", act_range)
        nodes += new
        inits += weights
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", None]) for i in range(4)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)],
                             ir_version=9)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def same_bits(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Equal bit pattern for bit pattern (-0.0 and 0.0 differ here; NaNs of one pattern are equal)."""
    return len(a) == len(b) and all(p.shape == q.shape and np.array_equal(p.view(np.uint32), q.view(np.uint32))
                                    for p, q in zip(a, b, strict=True))


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for g in graphs_of(model) for n in g.node)


def test_both_rewrites_leave_every_output_equal_to_the_bit() -> None:
    original = products_graph()
    merged = copy.deepcopy(original)
    assert int8_passes.merge_shared_inputs(merged.graph) == 1  # y0 and y1 only: y2's scale, y3's input differ
    one_row = copy.deepcopy(merged)
    assert int8_passes.one_row_scales(one_row.graph) == 3
    assert ops(original)["MatMulIntegerToFloat"] == 4 and ops(original)["QuantizeLinear"] == 4
    assert ops(merged)["MatMulIntegerToFloat"] == 3 and ops(merged)["QuantizeLinear"] == 3 and ops(merged)["Split"] == 1
    assert ops(one_row)["Mul"] == 1 + 3 and ops(one_row)["Add"] == 2  # a Mul per product; an Add per biased one
    rng = np.random.default_rng(0)
    for rows in (1, 7):
        x = (rng.standard_normal((rows, K)) * 1.5).astype(np.float32)  # some beyond the range: saturated alike
        want = run(original, x)
        for rewritten in (merged, one_row):
            assert same_bits(run(rewritten, x), want), rows


def test_products_that_share_one_quantizer_keep_it() -> None:
    """y1 reads y0's QuantizeLinear (its scale and zero too): merged, that quantizer stays, the graph runs."""
    original = products_graph()
    nodes = list(original.graph.node)
    y0 = next(n for n in nodes if n.output[0] == "y0")
    y1 = next(n for n in nodes if n.output[0] == "y1")
    for i in (0, 2, 4):
        y1.input[i] = y0.input[i]
    kept = [n for n in original.graph.node if n.output[0] != "y1.xq"]
    del original.graph.node[:]
    original.graph.node.extend(kept)
    merged = copy.deepcopy(original)
    assert int8_passes.merge_shared_inputs(merged.graph) == 1
    assert ops(merged)["QuantizeLinear"] == ops(original)["QuantizeLinear"] == 3
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    assert same_bits(run(merged, x), run(original, x))


def test_products_whose_constants_live_elsewhere_are_left_alone() -> None:
    """A product whose weight is an outer graph's name (as a Scan body may read) is not rewritten."""
    graph = products_graph().graph
    keep = [i for i in graph.initializer if i.name != "w0.int8"]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    assert int8_passes.merge_shared_inputs(graph) == 0  # y0 would have been y1's partner
    assert int8_passes.one_row_scales(graph) == 3  # y1, y2, y3, not y0


@pytest.mark.usefixtures("small_products")
def test_quantized_hyperlstm_advance_graph_reaches_the_scoring_state_exactly(
        built: Callable[[str, bool], Built], tmp_path: Path) -> None:
    """The HyperLSTM reads its hidden state with two products: merged in every graph; the advance
    graph's Scan body applies the scales after them; its state after a prompt is the scoring graph's,
    to the bit."""
    from rnnlm.serve import LanguageModel

    out = tmp_path / "q"
    export(built("hypernets", False).checkpoint, out, quantize="int8")
    advance, score = (onnx.load(str(out / f"{g}.onnx")) for g in ("advance", "score"))
    for model in (advance, score):
        assert any(n.op_type == "Split" and n.name.endswith(".merged.split") for g in graphs_of(model) for n in g.node)
    assert scan_bodies(advance) and scan_bodies(score)
    for body in scan_bodies(advance):
        products = [n for n in body.node if n.op_type == "MatMulIntegerToFloat"]
        assert products and all(n.name.endswith(".unscaled") for n in products)
    for body in scan_bodies(score):
        assert not any(n.name.endswith(".unscaled") for n in body.node)
    lm = LanguageModel.load(out, device="cpu", threads=1)
    ids = np.random.default_rng(2).integers(0, len(lm.vocab), 3 * lm.advance_chunk + 5).astype(np.int64)
    advanced = lm._advance_ids(ids[:, None], np.array([len(ids)])).arrays
    scored = lm._score_ids(ids[:, None], ids[:, None], np.array([len(ids)]))[1].arrays
    assert advanced.keys() == scored.keys()
    assert all(same_bits([advanced[k]], [scored[k]]) for k in advanced)
