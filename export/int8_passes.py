"""The int8 product node, and two rewrites of a graph's int8 products (``quantize.int8_nodes``:
QuantizeLinear, then MatMulIntegerToFloat with one scale per output column and the bias), each
leaving every output equal to the bit: int32 accumulation is exact, and the same float scale and bias
meet the same sum (onnxruntime's x86 kernels multiply, then add, in float32; checked in
tests/test_int8_passes.py, bit pattern for bit pattern).

``merge_shared_inputs``: products that quantize the same tensor with the same activation scale become
one product over their weights side by side, and a Split. The HyperLSTM reads its hidden state with
two (the main cell's 256 -> 1024 and the hyper cell's 256 -> 256): one QuantizeLinear and one product
call per step fewer.

``one_row_scales``: the product with unit scales, then Mul by the column scales, then Add the bias.
In a Scan step at one row, onnxruntime 1.31 runs these three nodes faster than the one node that
applies per-column scales itself (``bench/scan_cost.py``, "3 int8" against "3 int8, scales after";
the trained RHN's and HyperLSTM's prompts, bench/RESULTS.md "Goals, session 10"); at 64 rows and
more the one node is 1.1-1.5x faster (``bench/int8_scales.py``). So the exporter writes this form in
the advance graph's Scan bodies only: that graph reads one prompt at a time
(``serve.runtime.LanguageModel.advance``), one row per step.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper
from rnnlm.export.passes import replace_nodes

PRODUCT = "MatMulIntegerToFloat"
MS_DOMAIN = "com.microsoft"


def product_node(xq: str, weight: str, act_scale: str, weight_scale: str, act_zero: str, bias: str, y: str,
                 name: str) -> onnx.NodeProto:
    """y = (xq - act_zero) @ weight * (act_scale * weight_scale) (+ bias): MatMulIntegerToFloat, whose
    input 5 (the weight's zero point) stays empty: the weights are symmetric."""
    inputs = [xq, weight, act_scale, weight_scale, act_zero] + (["", bias] if bias else [])
    return helper.make_node(PRODUCT, inputs, [y], domain=MS_DOMAIN, name=name)


def _arrays(graph: onnx.GraphProto, names: list[str]) -> list[np.ndarray] | None:
    """The named initializers of ``graph`` as arrays, or None where one is not in it (an outer name)."""
    inits = {i.name: i for i in graph.initializer}
    if not all(n in inits for n in names):
        return None
    return [numpy_helper.to_array(inits[n]) for n in names]


def _bias(node: onnx.NodeProto) -> str:
    return node.input[6] if len(node.input) > 6 else ""


def _is_column_scaled(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """A product as ``product_node`` writes it, its constants all in ``graph``: int8 weight with no zero
    point, scalar activation scale and zero, one float weight scale per output column, the bias where
    it has one."""
    if node.op_type != PRODUCT or len(node.input) < 5 or (len(node.input) > 5 and node.input[5]):
        return False
    arrays = _arrays(graph, [node.input[1], node.input[2], node.input[3], node.input[4], *filter(None, [_bias(node)])])
    if arrays is None:
        return False
    w, act_scale, weight_scale, act_zero = arrays[:4]
    return (w.dtype == np.int8 and w.ndim == 2 and act_scale.ndim == 0 and act_zero.ndim == 0
            and weight_scale.dtype == np.float32 and weight_scale.shape == w.shape[1:])


# ------------------------------------------------------------------------------ merging


def merge_shared_inputs(graph: onnx.GraphProto) -> int:
    """Merge the int8 products of ``graph`` (this graph only) that quantize one tensor alike; returns how
    many products were merged away."""
    groups = [g for g in _groups(graph) if len(g) > 1]
    if not groups:
        return 0
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    readers = Counter(x for n in graph.node for x in n.input)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # the first product of a group -> its merged nodes
    dropped: set[int] = set()
    for group in groups:
        replaced[id(group[0])] = _merged_nodes(graph, group)
        dropped |= {id(n) for n in group[1:]}
        # A later product's own quantizer goes with it, unless something else reads it (the first one's).
        dropped |= {id(quantizers[n.input[0]]) for n in group[1:]
                    if n.input[0] != group[0].input[0] and readers[n.input[0]] == 1}
    nodes = [m for n in graph.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    replace_nodes(graph, nodes)
    return sum(len(g) - 1 for g in groups)


def _groups(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """The column-scaled products of ``graph``, grouped by what they quantize: the same tensor, with the
    same activation scale and zero (values and types), fed to the product as its own scale and zero."""
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    groups: dict[tuple[str, str, bytes, str, bytes], list[onnx.NodeProto]] = {}
    for node in graph.node:
        q = quantizers.get(node.input[0]) if node.op_type == PRODUCT else None
        if q is None or len(q.input) < 3 or not _is_column_scaled(graph, node):
            continue
        if (node.input[2], node.input[4]) != (q.input[1], q.input[2]):
            continue
        scale, zero = _arrays(graph, [q.input[1], q.input[2]]) or (None, None)
        if scale is not None and zero is not None:
            key = (q.input[0], scale.dtype.str, scale.tobytes(), zero.dtype.str, zero.tobytes())
            groups.setdefault(key, []).append(node)
    return list(groups.values())


def _merged_nodes(graph: onnx.GraphProto, group: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """One product over the group's weights side by side (biases too, zeros where one has none), then a
    Split that writes each product's own output."""
    weights, scales, biases = [], [], []
    for node in group:  # every constant is in ``graph`` (_is_column_scaled)
        w, s, *b = _arrays(graph, [node.input[1], node.input[3], *filter(None, [_bias(node)])]) or []
        weights.append(w)
        scales.append(s)
        biases.append(b[0] if b else np.zeros(w.shape[1], np.float32))
    base = f"{group[0].output[0]}.merged"
    names = {"w": f"{base}.int8", "s": f"{base}.int8_scale", "b": f"{base}.bias" if any(map(_bias, group)) else "",
             "widths": f"{base}.widths"}
    graph.initializer.extend([numpy_helper.from_array(np.concatenate(weights, axis=1), names["w"]),
                              numpy_helper.from_array(np.concatenate(scales), names["s"]),
                              numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), names["widths"])])
    if names["b"]:
        graph.initializer.append(numpy_helper.from_array(np.concatenate(biases).astype(np.float32), names["b"]))
    first = group[0]
    product = product_node(first.input[0], names["w"], first.input[2], names["s"], first.input[4], names["b"], base, base)
    split = helper.make_node("Split", [base, names["widths"]], [n.output[0] for n in group], axis=-1, name=f"{base}.split")
    return [product, split]


# ------------------------------------------------------------------------------ scales after the product


def one_row_scales(graph: onnx.GraphProto) -> int:
    """Write each int8 product of ``graph`` as the product with unit scales, Mul by its column scales
    (activation scale x weight scale), Add its bias; returns how many were rewritten."""
    nodes, rewritten = [], 0
    for node in graph.node:
        if not _is_column_scaled(graph, node):
            nodes.append(node)
            continue
        nodes += _scales_after(graph, node)
        rewritten += 1
    if rewritten:
        replace_nodes(graph, nodes)
    return rewritten


def _scales_after(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    act_scale, weight_scales = _arrays(graph, [node.input[2], node.input[3]]) or []
    y, bias, name = node.output[0], _bias(node), node.name or node.output[0]
    names = {"one": f"{y}.unit_scale", "scales": f"{y}.column_scales"}
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), names["one"]),
                              numpy_helper.from_array((act_scale * weight_scales).astype(np.float32), names["scales"])])
    unscaled, scaled = f"{y}.unscaled", f"{y}.scaled" if bias else y
    out = [product_node(node.input[0], node.input[1], names["one"], names["one"], node.input[4], "", unscaled,
                        f"{name}.unscaled"),
           helper.make_node("Mul", [unscaled, names["scales"]], [scaled], name=f"{name}.scales")]
    if bias:
        out.append(helper.make_node("Add", [scaled, bias], [y], name=f"{name}.bias"))
    return out
