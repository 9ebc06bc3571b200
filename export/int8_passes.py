"""Two rewrites of a graph's int8 products (``quantize.int8_nodes``: QuantizeLinear, then
MatMulIntegerToFloat with one scale per output column and the bias), each leaving every output equal
to the bit: int32 accumulation is exact, and the same float scale and bias meet the same sum.

``merge_shared_inputs``: products that quantize the same tensor with the same activation scale become
one product over their weights side by side, and a Split. The HyperLSTM reads its hidden state with
two (the main cell's 256 -> 1024 and the hyper cell's 256 -> 256): one QuantizeLinear and one product
call per step fewer.

``one_row_scales``: onnxruntime 1.31 applies a per-column scale inside MatMulIntegerToFloat slower
than a Mul after it does, at one row: the product with a unit scale, then Mul by the column scales,
then Add the bias (``bench/scan_cost.py``, "3 int8, scales after"). At 64 rows and more the fused node
is faster, so the exporter writes this form in the advance graph's Scan bodies only: that graph reads
one prompt at a time (``serve.runtime.LanguageModel.advance``), one row per step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from rnnlm.export.passes import replace_nodes

PRODUCT = "MatMulIntegerToFloat"


def _arrays(graph: onnx.GraphProto, names: list[str]) -> list[np.ndarray] | None:
    """The named initializers of ``graph`` as arrays, or None where one is not in it (an outer name)."""
    inits = {i.name: i for i in graph.initializer}
    if not all(n in inits for n in names):
        return None
    return [numpy_helper.to_array(inits[n]) for n in names]


def _is_column_scaled(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """An int8 product of ``quantize.int8_nodes``, its constants all in ``graph``: weight, scalar
    activation scale and zero, one weight scale per output column, and the bias where it has one."""
    if node.op_type != PRODUCT or len(node.input) < 5:
        return False
    arrays = _arrays(graph, [node.input[1], node.input[2], node.input[3], node.input[4], *filter(None, [_bias(node)])])
    return arrays is not None and arrays[1].ndim == 0 and arrays[3].ndim == 0 and arrays[2].shape == arrays[0].shape[1:]


def _bias(node: onnx.NodeProto) -> str:
    return node.input[6] if len(node.input) > 6 else ""


# ------------------------------------------------------------------------------ merging


def merge_shared_inputs(graph: onnx.GraphProto) -> int:
    """Merge the int8 products of ``graph`` (this graph only) that quantize one tensor alike; returns how
    many products were merged away."""
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    groups: dict[tuple[str, bytes, bytes], list[onnx.NodeProto]] = {}
    for node in graph.node:
        q = quantizers.get(node.input[0]) if node.op_type == PRODUCT else None
        if q is None or len(q.input) < 3 or not _is_column_scaled(graph, node):
            continue
        scale_zero = _arrays(graph, [q.input[1], q.input[2]])
        if scale_zero is not None:
            groups.setdefault((q.input[0], scale_zero[0].tobytes(), scale_zero[1].tobytes()), []).append(node)
    merged = [group for group in groups.values() if len(group) > 1]
    if not merged:
        return 0
    replaced: dict[int, list[onnx.NodeProto]] = {}  # the first product of a group -> its merged nodes
    dropped: set[int] = set()
    for group in merged:
        replaced[id(group[0])] = _merged_nodes(graph, group)
        dropped |= {id(n) for n in group[1:]} | {id(quantizers[n.input[0]]) for n in group[1:]}
    nodes = [m for n in graph.node if id(n) not in dropped for m in replaced.get(id(n), [n])]
    replace_nodes(graph, nodes)
    return sum(len(g) - 1 for g in merged)


def _merged_nodes(graph: onnx.GraphProto, group: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """One product over the group's weights side by side (biases too, zeros where one has none), then a
    Split that writes each product's own output."""
    weights, scales, biases = [], [], []
    for node in group:  # every constant is in ``graph`` (_is_column_scaled)
        w, s, *b = _arrays(graph, [node.input[1], node.input[3], *filter(None, [_bias(node)])]) or []
        weights.append(w)
        scales.append(s)
        biases.append(b[0] if b else np.zeros(w.shape[1], np.float32))
    widths = [w.shape[1] for w in weights]
    base = f"{group[0].output[0]}.merged"
    names = {"w": f"{base}.int8", "s": f"{base}.int8_scale", "b": f"{base}.bias", "split": f"{base}.split"}
    graph.initializer.extend([
        numpy_helper.from_array(np.concatenate(weights, axis=1), names["w"]),
        numpy_helper.from_array(np.concatenate(scales).astype(np.float32), names["s"]),
        numpy_helper.from_array(np.array(widths, np.int64), names["split"])])
    first = group[0]
    inputs = [first.input[0], names["w"], first.input[2], names["s"], first.input[4]]
    if any(_bias(n) for n in group):
        graph.initializer.append(numpy_helper.from_array(np.concatenate(biases).astype(np.float32), names["b"]))
        inputs += ["", names["b"]]
    product = helper.make_node(PRODUCT, inputs, [base], domain=first.domain, name=base)
    split = helper.make_node("Split", [base, names["split"]], [n.output[0] for n in group], axis=-1, name=f"{base}.split")
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
    arrays = _arrays(graph, [node.input[2], node.input[3]])
    assert arrays is not None
    act_scale, weight_scales = arrays
    y, bias = node.output[0], _bias(node)
    names = {"one": f"{y}.unit_scale", "scales": f"{y}.column_scales"}
    graph.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), names["one"]),
                              numpy_helper.from_array((act_scale * weight_scales).astype(np.float32), names["scales"])])
    unscaled, scaled = f"{y}.unscaled", f"{y}.scaled" if bias else y
    out = [helper.make_node(PRODUCT, [node.input[0], node.input[1], names["one"], names["one"], node.input[4]],
                            [unscaled], domain=node.domain, name=f"{node.name or y}.unscaled"),
           helper.make_node("Mul", [unscaled, names["scales"]], [scaled], name=f"{node.name or y}.scales")]
    if bias:
        out.append(helper.make_node("Add", [scaled, bias], [y], name=f"{node.name or y}.bias"))
    return out
