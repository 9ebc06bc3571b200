"""Small rewrites of the traced ONNX graphs, applied before validation (so validation covers them).

``gemm_to_matmul``: the tracer writes ``nn.Linear`` on 2-D inputs as Gemm(x, W, b, transB=1), and
the unrolled graphs use each W at every step. onnxruntime's int8 quantizer rewrites each such
Gemm with its own transposed copy of W under one shared name, and produces an invalid model.
MatMul(x, W^T) + b with one transposed initializer per weight is the same function, quantizes
cleanly, and lets onnxruntime prepack each weight once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def graphs_of(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph and every subgraph in it (the Scan bodies of ``export.recurrence``), outermost first.

    A pass that rewrites nodes runs over them innermost first (``reversed``): rewriting a graph's node
    list copies its nodes, so a body taken from the old list would be rewritten in a detached copy."""
    out = [model.graph]
    for graph in out:  # grows as it goes: bodies of bodies too
        out.extend(subgraphs(graph))
    return out


def subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graphs held in ``graph``'s nodes' attributes (one level down)."""
    return [g for n in graph.node for g in node_graphs(n)]


def scan_bodies(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The body of every Scan in ``model``, at any depth (inside an If's branches too)."""
    return [body for graph in graphs_of(model) for n in graph.node if n.op_type == "Scan" for body in node_graphs(n)]


def node_graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in one node's attributes (a Scan's body)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def reads(graph: onnx.GraphProto) -> set[str]:
    """Every name ``graph``'s nodes read, their subgraphs' reads included (a body may read an outer name)."""
    names = {x for n in graph.node for x in n.input}
    for g in subgraphs(graph):
        names |= reads(g)
    return names


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm nodes with a constant B in place, in every graph; returns how many were rewritten."""
    return sum(_gemm_to_matmul(graph) for graph in reversed(graphs_of(model)))


def _gemm_to_matmul(graph: onnx.GraphProto) -> int:
    inits = {i.name: i for i in graph.initializer}
    transposed: dict[str, str] = {}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            if weight not in transposed:
                name = f"{weight}.T"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), name))
                transposed[weight] = name
            weight = transposed[weight]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.Add"))
        rewritten += 1
    replace_nodes(graph, nodes)
    return rewritten


def drop_weight_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes that only alias an initializer (the tracer writes one for a weight used more
    than once), pointing their consumers at the initializer itself, in every graph. Quantization then
    sees one weight with all its uses. Returns how many were removed."""
    return sum(_drop_weight_identities(graph) for graph in reversed(graphs_of(model)))


def _drop_weight_identities(graph: onnx.GraphProto) -> int:
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def share_tied_weights(model: onnx.ModelProto) -> int:
    """Undo ``gemm_to_matmul``'s transposed copy where the original matrix is still in the graph (a tied
    decoder: the embedding's Gather reads it): MatMul(x, W.T) on a 2-D x becomes Gemm(x, W, transB=1),
    the same product from the one copy. The file then holds the 10,000 x 256 matrix once, not twice,
    and loading hashes and parses that many fewer bytes. Returns how many products were rewritten."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    ranks = _ranks(graph)
    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "MatMul" or not node.input[1].endswith(".T") or ranks.get(node.input[0]) != 2:
            continue
        original = node.input[1][:-2]
        if original not in inits or node.input[1] not in inits:
            continue
        if not np.array_equal(numpy_helper.to_array(inits[original]).T, numpy_helper.to_array(inits[node.input[1]])):
            continue
        add, bias = _bias_add(graph, node.output[0], inits)
        ins, outs = ([node.input[0], original, bias], list(add.output)) if add is not None else \
            ([node.input[0], original], list(node.output))
        gemm = helper.make_node("Gemm", ins, outs, name=f"{node.name}.Gemm", transB=1)
        graph.node.remove(node)
        graph.node.insert(i, gemm)
        if add is not None:  # Gemm adds the bias as it writes the logits: no second pass over them
            graph.node.remove(add)
        rewritten += 1
    used = reads(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


def _bias_add(graph: onnx.GraphProto, name: str, inits: dict[str, onnx.TensorProto]) -> tuple[onnx.NodeProto | None, str]:
    """The Add that alone reads ``name`` with a 1-D initializer as its other input, and that input's name."""
    readers = [n for n in graph.node if name in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or name in {o.name for o in graph.output}:
        return None, ""
    other = [x for x in readers[0].input if x != name]
    if len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) == 1:
        return readers[0], other[0]
    return None, ""


def _ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """Ranks of the tensors shape inference knows (inputs, outputs and value_info)."""
    model = helper.make_model(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - an unknown rank only means no rewrite
        inferred = graph
    out = {}
    for v in [*inferred.input, *inferred.output, *inferred.value_info]:
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = len(v.type.tensor_type.shape.dim)
    return out


def replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` the graph's nodes and drop the initializers that nothing reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = reads(graph)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
