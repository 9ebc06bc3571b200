"""Each layer's time loop as one ONNX node: a Scan over the cell's step, or the ONNX LSTM operator.

The tracer unrolls a Python time loop into a copy of the step per time step: the 32-step scoring
graph of a one-layer LSTM was ~1,300 nodes, the HyperLSTM's several thousand, and onnxruntime's
session creation grows with the node count (0.19-0.45 s, the bulk of ``rnnlm score``'s cold start;
bench/RESULTS.md). Here each layer's loop becomes one node:

- while tracing, ``sequence`` (passed to ``LanguageModel.hidden``) runs the layer as usual but
  records it as a placeholder node ``rnnlm.export::Recurrence`` (inputs: keep, x, the hoisted
  inputs, the state; outputs: the layer's outputs over time, the final state);
- ``lower`` then replaces each placeholder by
  * an ONNX ``LSTM`` node where the layer is a plain LSTM (no layer normalization): onnxruntime
    runs the whole recurrence in one kernel, with the input product hoisted inside it; or
  * a ``Scan`` whose body is the cell's one-step ``recur`` plus ``hold``, traced on its own: the
    same step the unrolled graph repeated, written once.

The graphs' inputs and outputs do not change; export validates the result against PyTorch as before.

``full_chunk_twins`` then gives each Scan a twin without the per-step ``hold`` (one ``Where`` per state
field), which an ``If`` runs when every column advances every step of the call: a prompt, a stream,
any batch of equal lengths. Those ``Where`` nodes were ~10 % of a batch-1 HyperLSTM step.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from rnnlm.export.passes import node_graphs, reads, replace_nodes
from torch import Tensor, nn

from rnnlm.cells.base import hold, recur_all
from rnnlm.cells.lstm import LSTMCell

DOMAIN = "rnnlm.export"
PLACEHOLDER = "Recurrence"
ONNX_LSTM_GATES = (0, 3, 1, 2)  # ONNX's LSTM gate order i, o, f, c in the cell's order i, f, g, o


def _recurrence(cell: Any) -> Any:
    """An autograd Function for ``cell``: the layer's loop as PyTorch runs it, one placeholder node when
    traced (the tracer takes only tensors and numbers as a Function's arguments, so the cell is bound here)."""

    class Recurrence(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, index: int, n_pre: int, keep: Tensor, xs: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
            pres, fields = tensors[:n_pre], tensors[n_pre:]
            tracing = torch._C._get_tracing_state()  # the tracer records this call as one node; inside, it
            torch._C._set_tracing_state(None)  # type: ignore[attr-defined]  # must not see the cell's weights, which are not inputs
            try:
                ys, state = recur_all(cell, pres, type(cell.init_state(1))(*fields), keep)
            finally:
                torch._C._set_tracing_state(tracing)  # type: ignore[attr-defined]
            return (ys, *state)

        @staticmethod
        def symbolic(g: Any, index: int, n_pre: int, keep: Any, xs: Any, *tensors: Any) -> Any:
            fields = tensors[n_pre:]
            outs = g.op(f"{DOMAIN}::{PLACEHOLDER}", keep, xs, *tensors, layer_i=index, pre_i=n_pre,
                        outputs=1 + len(fields))
            # The outputs' types, which the tracer cannot infer for an unknown op (it warns otherwise):
            # ys is (T, B, H), the state as it came in. ``lower`` drops them again with the placeholder.
            outs[0].setType(xs.type().with_sizes([None, None, int(cell.hidden_size)]))
            for out, field in zip(outs[1:], fields, strict=True):
                out.setType(field.type())
            return outs

    return Recurrence


def placeholder_sequence(index: int, cell: Any, xs: Tensor, state: Any, keep: Tensor | None) -> tuple[Tensor, Any]:
    """``LanguageModel.hidden``'s ``sequence`` for tracing: the layer's loop as one placeholder node."""
    assert keep is not None, "the scoring and advance graphs always pass keep"
    pres = cell.hoist(xs)
    ys, *fields = _recurrence(cell).apply(index, len(pres), keep, xs, *pres, *state)
    return ys, type(state)(*fields)


# ------------------------------------------------------------------------------ lowering


def lower(model: onnx.ModelProto, cells: list[Any], opset: int, *, fuse_lstm: bool = True) -> int:
    """Replace every placeholder in ``model`` by a Scan or an LSTM node (in place); returns how many.

    ``fuse_lstm=False`` writes plain LSTM layers as a Scan too: their products are then MatMuls that
    quantization can rewrite (ONNX's LSTM operator takes float weights only)."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    lowered = 0
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        cell = cells[attrs["layer"]]
        if fuse_lstm and fits_onnx_lstm(cell):
            new_nodes, inits = _lstm_nodes(node, cell, attrs["layer"])
            graph.initializer.extend(inits)
        else:
            new_nodes = [_scan_node(node, cell, attrs["layer"], attrs["pre"], opset)]
        nodes.extend(new_nodes)
        lowered += 1
    replace_nodes(graph, prune_dead(nodes, {o.name for o in graph.output}))  # unread weights go too
    del graph.value_info[:]  # shapes recorded at the traced batch and chunk; onnxruntime infers its own
    kept = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered


def prune_dead(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (an LSTM node computes the input product the
    hoisting nodes computed for the Scan, so those go)."""
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for g in node_graphs(node):
                needed.update(reads(g))  # a body may read outer names
    return kept[::-1]


# ------------------------------------------------------------------------------ Scan


class _Body(nn.Module):
    """(*state, keep_t, *pre_t) -> (*held next state, y_t): one step of the layer, as Scan's body."""

    def __init__(self, cell: Any, n_state: int) -> None:
        super().__init__()
        self.cell, self.n_state = cell, n_state

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        state = type(self.cell.init_state(1))(*args[: self.n_state])
        keep, pre = args[self.n_state], args[self.n_state + 1 :]
        y, new = self.cell.recur(tuple(pre), state)
        return (*hold(keep, new, state), y)


def _scan_node(node: onnx.NodeProto, cell: Any, index: int, n_pre: int, opset: int) -> onnx.NodeProto:
    """Scan(state..., keep, pre...) -> (next_state..., ys) with the traced step as its body."""
    keep, _, *rest = node.input
    pres, states = rest[:n_pre], rest[n_pre:]
    ys, *next_states = node.output
    body = _trace_body(cell, len(states), n_pre, opset, prefix=f"layer{index}.")
    return helper.make_node("Scan", [*states, keep, *pres], [*next_states, ys], name=f"layer{index}.Scan",
                            body=body, num_scan_inputs=1 + n_pre)


def _trace_body(cell: Any, n_state: int, n_pre: int, opset: int, prefix: str) -> onnx.GraphProto:
    batch = 2
    state = list(cell.init_state(batch))
    pre = [p[0] for p in cell.hoist(torch.zeros(1, batch, int(cell.input_size)))]
    args = (*state, torch.ones(batch, 1, dtype=torch.bool), *pre)
    ins = [f"state{i}" for i in range(n_state)] + ["keep"] + [f"pre{i}" for i in range(n_pre)]
    outs = [f"next{i}" for i in range(n_state)] + ["y"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "body.onnx"
        torch.onnx.export(_Body(cell, n_state).eval(), args, str(path), input_names=ins, output_names=outs,
                          dynamic_axes={name: {0: "batch"} for name in ins + outs}, opset_version=opset,
                          dynamo=False, external_data=False, do_constant_folding=True)
        graph = onnx.load(str(path)).graph
    _prefix_names(graph, prefix)
    return graph


def _prefix_names(graph: onnx.GraphProto, prefix: str) -> None:
    """Rename every value, node and initializer of ``graph`` with ``prefix``: a Scan body's names must not
    collide with the outer graph's or another body's (each layer's body is traced on its own)."""
    def rename(name: str) -> str:
        return prefix + name if name else name

    for n in graph.node:
        n.name = rename(n.name or n.output[0])
        n.input[:] = [rename(x) for x in n.input]
        n.output[:] = [rename(x) for x in n.output]
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in collection:
            v.name = rename(v.name)


# ------------------------------------------------------------------------------ LSTM


def fits_onnx_lstm(cell: Any) -> bool:
    """A plain LSTM layer is exactly ONNX's LSTM operator (dropout is off in eval mode)."""
    return isinstance(cell, LSTMCell) and cell.gate_norm is None and cell.cell_norm is None


def _lstm_nodes(node: onnx.NodeProto, cell: LSTMCell, index: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """LSTM(xs, W, R, B, lengths, h, c) for the placeholder ``node``, with the layer's weights in ONNX's gate
    order, the forget bias folded into B, and a zero-length sample's state kept as it came in (onnxruntime
    returns zeros for it)."""
    keep, xs, _px, h_in, c_in = node.input
    ys, h_out, c_out = node.output
    H = cell.hidden_size
    p = f"layer{index}.lstm."

    def gates(w: np.ndarray) -> np.ndarray:  # rows in blocks of H, cell order -> ONNX order
        return np.concatenate([w[g * H : (g + 1) * H] for g in ONNX_LSTM_GATES])

    w = gates(cell.input_proj.weight.detach().numpy())
    r = gates(cell.hidden_proj.weight.detach().numpy())
    bias = cell.input_bias().detach().numpy()  # the forget bias folded in: the cell's one place for it
    b = np.concatenate([gates(bias), np.zeros(4 * H, np.float32)])
    inits = [numpy_helper.from_array(np.ascontiguousarray(w[None], np.float32), p + "W"),
             numpy_helper.from_array(np.ascontiguousarray(r[None], np.float32), p + "R"),
             numpy_helper.from_array(np.ascontiguousarray(b[None], np.float32), p + "B"),
             numpy_helper.from_array(np.array([0], np.int64), p + "axis0"),
             numpy_helper.from_array(np.array([1], np.int64), p + "axis1"),
             numpy_helper.from_array(np.array([0, 2], np.int64), p + "axes02"),
             numpy_helper.from_array(np.array(0, np.int32), p + "zero")]
    mk = helper.make_node
    nodes = [
        mk("Cast", [keep], [p + "keep32"], to=onnx.TensorProto.INT32),
        mk("ReduceSum", [p + "keep32", p + "axes02"], [p + "lengths"], keepdims=0),  # (B,) int32
        mk("Unsqueeze", [h_in, p + "axis0"], [p + "h0"]),
        mk("Unsqueeze", [c_in, p + "axis0"], [p + "c0"]),
        mk("LSTM", [xs, p + "W", p + "R", p + "B", p + "lengths", p + "h0", p + "c0"], [p + "Y", p + "Yh", p + "Yc"],
           name=p + "LSTM", hidden_size=H),
        mk("Squeeze", [p + "Y", p + "axis1"], [ys]),  # (T, 1, B, H) -> (T, B, H)
        mk("Squeeze", [p + "Yh", p + "axis0"], [p + "h_last"]),
        mk("Squeeze", [p + "Yc", p + "axis0"], [p + "c_last"]),
        mk("Greater", [p + "lengths", p + "zero"], [p + "any"]),
        mk("Unsqueeze", [p + "any", p + "axis1"], [p + "moved"]),  # (B, 1): advanced at all
        mk("Where", [p + "moved", p + "h_last", h_in], [h_out]),
        mk("Where", [p + "moved", p + "c_last", c_in], [c_out]),
    ]
    return nodes, inits


# ------------------------------------------------------------------------------ full-chunk twins


def full_chunk_twins(model: onnx.ModelProto) -> int:
    """Replace each Scan in the main graph by If(every step of every column is kept, twin, Scan), in place;
    returns how many.

    The twin's body is the Scan's body without the holds: the same step where keep is all true. Each body
    keeps its own copy of the weights: onnxruntime prepacks a quantized product's weight only where it is
    the body's own initializer (read from the main graph, a quantized HyperLSTM step took 46 µs, not 34).
    A time-major output that nothing reads (the advance graph's) is dropped from both."""
    graph = model.graph
    read = reads(graph) | {o.name for o in graph.output}
    nodes: list[onnx.NodeProto] = []
    conditions: dict[str, str] = {}
    twinned = 0
    for node in graph.node:
        if node.op_type != "Scan":
            nodes.append(node)
            continue
        body = node_graphs(node)[0]
        scans = helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_scan_inputs"))
        n_state = len(node.input) - scans
        keep = node.input[n_state]
        if keep not in conditions:
            conditions[keep] = f"{keep}.all"
            nodes.extend(_all_true(keep, conditions[keep]))
        outputs = [o for i, o in enumerate(node.output) if i < n_state or o in read]
        _drop_outputs(body, [i for i, o in enumerate(node.output) if o not in outputs])
        twin = onnx.GraphProto()
        twin.CopyFrom(body)
        _drop_holds(twin, body.input[n_state].name)
        nodes.append(helper.make_node("If", [conditions[keep]], outputs, name=f"{node.name}.If",
                                      then_branch=_branch(node, twin, outputs, ".full"),
                                      else_branch=_branch(node, body, outputs, ".held")))
        twinned += 1
    replace_nodes(graph, nodes)
    return twinned


def _all_true(keep: str, out: str) -> list[onnx.NodeProto]:
    """out = every element of the bool tensor ``keep`` (T, B, 1) is true."""
    as_int = f"{keep}.int"
    return [helper.make_node("Cast", [keep], [as_int], to=onnx.TensorProto.INT32),
            helper.make_node("ReduceMin", [as_int], [f"{out}.min"], keepdims=0),
            helper.make_node("Cast", [f"{out}.min"], [out], to=onnx.TensorProto.BOOL)]


def _drop_outputs(body: onnx.GraphProto, indices: list[int]) -> None:
    for i in sorted(indices, reverse=True):
        del body.output[i]


def _drop_holds(body: onnx.GraphProto, keep: str) -> None:
    """Remove the ``Where(keep, new, old)`` nodes of ``body``: the new value is the output. It is renamed to
    the output's name where nothing else names it so; an Identity copies it where it is an input or output."""
    boundary = {v.name for v in [*body.input, *body.output]}
    rename: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for n in body.node:
        if n.op_type == "Where" and n.input[0] == keep:
            new, out = n.input[1], n.output[0]
            if new in boundary or new in rename:
                nodes.append(helper.make_node("Identity", [new], [out], name=f"{n.name}.Identity"))
            else:
                rename[new] = out
            continue
        nodes.append(n)
    for n in nodes:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    del body.node[:]
    body.node.extend(nodes)


def _branch(scan: onnx.NodeProto, body: onnx.GraphProto, outputs: list[str], suffix: str) -> onnx.GraphProto:
    """A branch of the If: ``scan`` with ``body``, reading the same outer names, its outputs renamed."""
    outs = [o + suffix for o in outputs]
    attrs = {a.name: helper.get_attribute_value(a) for a in scan.attribute if a.name != "body"}
    node = helper.make_node("Scan", list(scan.input), outs, name=scan.name + suffix, body=body, **attrs)
    return helper.make_graph([node], scan.name + suffix, [],
                             [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs])
