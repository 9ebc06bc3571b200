"""Quantization where it pays: each large weight matrix ("product") gets the form measured fastest.

A batch-1 step is bandwidth-bound (bench/RESULTS.md): the tied 10,000 x 256 decoder is most of
the bytes it reads. Quantizing every MatMul also quantizes the many tiny per-step recurrent
products, where quantizing the activations costs more than it saves. So the choice is per product:

- the products are the MatMul weights of at least ``MIN_ELEMENTS`` (the decoder, the input
  projections, the recurrent matrices of a 256-wide cell); smaller ones stay float32;
- each is timed (``export.form_timing``) as a one-node graph with its own weights, at the row count
  it meets in the graph at batch 1 (1 in the step graph and for per-step products; ``chunk`` for a
  product the scoring graph hoists over a whole chunk), and the scoring graph's per-step products
  also at BATCH_ROWS (per-line scoring runs that many sequences side by side), in every candidate
  form:

  * ``fp32``: MatMul, unchanged;
  * ``int8``: QuantizeLinear + com.microsoft MatMulIntegerToFloat, symmetric int8 weights with one
    scale per output column, activations quantized with one fixed scale per product, calibrated at
    export (``activation_ranges``), so that a row's result never depends on the other rows of its
    call (VNNI on CPUs that have it);
  * ``nbits4-b{block}-a{level}``: com.microsoft MatMulNBits, 4-bit weights in blocks of
    ``block`` along K, ``accuracy_level`` ``level`` (0: float compute; 4: int8 compute);
  * ``bf16``: Cast + MatMul in bfloat16, which runs only where onnxruntime has a kernel for it
    (it has none on CPU in 1.31; the measurement records the refusal);

- the fastest form (for a product timed at two row counts: by the geometric mean of its two times
  relative to fp32) wins if it beats fp32 by ``form_timing.MIN_GAIN``; the exporter then checks the whole
  bundle's perplexity and refuses it above ``--max-ppl-rise``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from rnnlm.export import int8_passes
from rnnlm.export.passes import graphs_of, replace_nodes, scan_bodies

MIN_ELEMENTS = 65_536  # 256 KB of float32: below this a product is too small to be worth it
BLOCKS = (32, 64, 128)
ACCURACY_LEVELS = (0, 4)
MS_DOMAIN = int8_passes.MS_DOMAIN
# Forms that compute a row alike whatever other rows share its call: float32, and int8 with its fixed
# activation scale. MatMulNBits's kernels round a row differently alone (M = 1) than among others (by
# ~1e-6), which a later int8 rounding turns into up to 1e-2 in a log-probability: a quantized LSTM with a
# 4-bit recurrent product in its scoring graph scored 19 of 1,024 PTB sentences differently (beyond 1e-5)
# alone and under `rnnlm serve --max-batch 32` (bench/RESULTS.md, "Goals, session 8"). The scoring graph
# (and the advance graph, which takes its forms) uses these only; generation's step graph all forms.
ROW_EXACT_FORMS = ("fp32", "int8")
BATCH_ROWS = 64  # sequences per call in per-line scoring (the runtime's default batch_size)


@dataclass(frozen=True)
class Product:
    """One weight matrix W (K, N) used by ``uses`` MatMul nodes of one graph, ``rows`` rows per call at
    batch 1, and ``batch_rows`` rows per call in batched scoring where that differs (the scoring graph's
    per-step products: one row per sequence, BATCH_ROWS sequences per call in per-line scoring)."""

    graph: str
    weight: str
    k: int
    n: int
    uses: int
    rows: int
    batch_rows: int | None = None


def find_products(model: onnx.ModelProto, graph: str, chunk: int) -> list[Product]:
    """The large constant-weight MatMuls of ``model`` and of its Scan bodies; rows per call at batch 1 from
    where W is used: in a Scan body (one step of the recurrence) or the step graph, 1 row; in the scoring
    graph's own nodes (hoisted over a whole chunk: the input projections and the decoder), ``chunk``. A
    saved graph's Scan and its full-chunk twin (``recurrence.full_chunk_twins``) hold one product twice,
    under one name: it is listed once."""
    out: list[Product] = []
    for depth, g in enumerate(graphs_of(model)):  # the main graph first
        inits = {i.name: i for i in g.initializer}
        uses = Counter(n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits)
        for name, count in uses.items():
            dims = list(inits[name].dims)
            if any(p.weight == name for p in out):
                continue
            if len(dims) != 2 or dims[0] * dims[1] < MIN_ELEMENTS or inits[name].data_type != onnx.TensorProto.FLOAT:
                continue
            hoisted = graph == "score" and depth == 0
            batch_rows = BATCH_ROWS if graph == "score" and not hoisted else None
            out.append(Product(graph, name, int(dims[0]), int(dims[1]), count, chunk if hoisted else 1, batch_rows))
    return sorted(out, key=lambda p: -p.k * p.n)


def weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every initializer of ``model`` and of its Scan bodies, by name (body names are prefixed: unique)."""
    return {i.name: i for g in graphs_of(model) for i in g.initializer}


def forms_by_weights(model: onnx.ModelProto, reference: onnx.ModelProto, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Forms for ``model``'s weights: the form chosen (``rows``) for the weight of ``reference`` that holds the
    same matrix. The tracer names a folded constant after its place in the graph, so one matrix can have
    other names in two graphs traced from the same model (the advance and the scoring graph)."""
    ref = weights(reference)
    chosen = {content_key(ref[r["weight"]]): r["chosen"] for r in rows if r["weight"] in ref}
    return {name: chosen[key] for name, t in weights(model).items() if (key := content_key(t)) in chosen}


ContentKey = tuple[tuple[int, ...], int, bytes]


def content_key(t: onnx.TensorProto) -> ContentKey:
    """A matrix's identity by value (shape, dtype, sha256 of its bytes), whatever its name in a graph."""
    return tuple(t.dims), t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes()).digest()


# ------------------------------------------------------------------------------ the forms


def int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: w ~= q * scale[None, :]."""
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def nbits4_weights(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' layout of symmetric 4-bit weights: packed (N, K / block, block / 2), scales (N * K / block)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    blocks = (k + block - 1) // block
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros(n * blocks, np.float32)
    zero_points = np.zeros(n * ((blocks + 1) // 2), np.uint8)  # unused: symmetric
    quantize_matmul_4bits(packed, np.ascontiguousarray(w, np.float32), scales, zero_points, block, n, k, True)
    return packed, scales


def form_nodes(form: str, x: str, y: str, weight: str, w: np.ndarray, bias: str = "",
               act_range: float = 1.0) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing y = x @ w (+ bias, a 1-D initializer's name, for the quantized forms) in ``form``,
    and the initializers they need (named after ``weight``). ``act_range``: the int8 form's fixed
    activation range, |x| <= act_range (beyond it, x saturates)."""
    k, n = w.shape
    if form == "fp32":
        return [helper.make_node("MatMul", [x, weight], [y])], [numpy_helper.from_array(w, weight)]
    if form == "int8":
        return int8_nodes(x, y, weight, w, bias, act_range)
    if form.startswith("nbits4-"):
        block, level = (int(part[1:]) for part in form.split("-")[1:])
        packed, scales = nbits4_weights(w, block)
        names = [f"{weight}.q4b{block}", f"{weight}.q4b{block}_scale"]
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": block}
        if level:
            attrs["accuracy_level"] = level
        ins = [x, *names, "", "", bias] if bias else [x, *names]  # inputs 4-6: zero points, g_idx (none), bias
        node = helper.make_node("MatMulNBits", ins, [y], domain=MS_DOMAIN, name=f"{y}.q4", **attrs)
        return [node], [numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1])]
    if form == "bf16":
        import ml_dtypes

        bits = np.ascontiguousarray(w.astype(ml_dtypes.bfloat16)).view(np.uint16)
        t = helper.make_tensor(f"{weight}.bf16", onnx.TensorProto.BFLOAT16, list(w.shape), bits.tobytes(), raw=True)
        nodes = [helper.make_node("Cast", [x], [f"{y}.xbf16"], to=onnx.TensorProto.BFLOAT16),
                 helper.make_node("MatMul", [f"{y}.xbf16", t.name], [f"{y}.ybf16"]),
                 helper.make_node("Cast", [f"{y}.ybf16"], [y], to=onnx.TensorProto.FLOAT)]
        return nodes, [t]
    raise ValueError(f"unknown quantization form {form!r}")


def int8_nodes(x: str, y: str, weight: str, w: np.ndarray, bias: str,
               act_range: float) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The int8 form: x quantized with one fixed scale (``act_range`` / 127, uint8 around 128: the
    u8 x s8 kernels VNNI runs), then MatMulIntegerToFloat, which rescales and adds ``bias`` as it
    writes y. onnxruntime's DynamicQuantizeMatMul would quantize x with the range of each call's rows
    together: a sentence's score would then depend on what shares its call (a batch, a chunk)."""
    q, scale = int8_weights(w)
    a_scale = np.float32(act_range / 127.0 if act_range > 0 else 1.0 / 127.0)
    names = [f"{weight}.int8", f"{weight}.int8_scale", f"{weight}.act_scale", f"{weight}.act_zero"]
    xq = f"{y}.xq"
    quant = helper.make_node("QuantizeLinear", [x, names[2], names[3]], [xq], name=f"{y}.xq")
    product = int8_passes.product_node(xq, names[0], names[2], names[1], names[3], bias, y, f"{y}.int8")
    inits = [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
             numpy_helper.from_array(np.array(a_scale, np.float32), names[2]),
             numpy_helper.from_array(np.array(128, np.uint8), names[3])]
    return [quant, product], inits


def candidate_forms() -> list[str]:
    return ["fp32", "int8", *(f"nbits4-b{b}-a{a}" for b in BLOCKS for a in ACCURACY_LEVELS), "bf16"]


def is_quantized(form: str) -> bool:
    return form != "fp32"


# ------------------------------------------------------------------------------ calibration


def activation_ranges(step: onnx.ModelProto, states: list[tuple[str, str]], ids: np.ndarray, eos_id: int,
                      streams: int = 32) -> dict[ContentKey, float]:
    """The range of every product's input (max |x|), by its weight's content, for the int8 form's
    fixed activation scale. Every product of the scoring and advance graphs is also a product of the
    step graph (one step of the same cell, without Scan), where its input is a tensor of the main graph:
    ``ids`` are stepped through the float32 step graph, ``streams`` side by side from fresh states, with
    those tensors as extra outputs. An input gathered from a table (the embedding) takes the table's
    max |value| instead: a token the text never used cannot exceed it. ``states``: (input, output)
    names of each state field."""
    import onnxruntime as ort

    graph = step.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    watched: dict[str, list[ContentKey]] = {}
    ranges: dict[ContentKey, float] = {}
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or inits[n.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        key, src = content_key(inits[n.input[1]]), producers.get(n.input[0])
        if src is not None and src.op_type == "Gather" and src.input[0] in inits:
            ranges[key] = max(ranges.get(key, 0.0), float(np.abs(numpy_helper.to_array(inits[src.input[0]])).max()))
        else:
            watched.setdefault(n.input[0], []).append(key)
    probe = onnx.ModelProto()
    probe.CopyFrom(step)
    names = sorted(watched)
    probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    sizes = {i.name: i.shape[1] for i in sess.get_inputs() if i.name != "token_ids"}
    n = max(len(ids) // streams, 1)
    cols = np.resize(np.asarray(ids, np.int64), n * streams).reshape(streams, n).T
    feed = {inp: np.zeros((streams, sizes[inp]), np.float32) for inp, _ in states}
    prev, seen = np.full(streams, eos_id, np.int64), dict.fromkeys(names, 0.0)
    for t in range(n):
        got = dict(zip(outputs, sess.run(None, {"token_ids": prev, **feed}), strict=True))
        for x in names:
            seen[x] = max(seen[x], float(np.abs(got[x]).max()))
        feed = {inp: got[out] for inp, out in states}
        prev = cols[t]
    for x, keys in watched.items():
        for key in keys:
            ranges[key] = max(ranges.get(key, 0.0), seen[x])
    return ranges


# ------------------------------------------------------------------------------ rewriting


def apply_forms(model: onnx.ModelProto, forms: dict[str, str], ranges: dict[ContentKey, float], *,
                one_row_steps: bool = False) -> int:
    """Rewrite every MatMul whose weight has a quantized form in ``forms`` (weight name -> form), in place,
    in the main graph and its Scan bodies. A bias Add that follows (a 1-D initializer of N values) is
    folded into the quantized node, which adds it as it writes its output: the decoder's logits are then
    written once, not read back and rewritten ([rows, 10,000] floats, measured 23 % of batched scoring).
    ``ranges``: each int8 product's activation range, by its weight's content (``activation_ranges``).
    Int8 products that quantize one tensor alike are then merged into one, and with ``one_row_steps``
    (a graph that runs one row per step: the advance graph) the Scan bodies' int8 products apply their
    scales after the product (``export.int8_passes``; both leave every output equal to the bit).
    Returns the number of products rewritten; float32 weights no node uses any more are dropped."""
    rewritten = 0
    for graph in reversed(graphs_of(model)):  # innermost first
        rewritten += _apply_forms(graph, forms, ranges)
        int8_passes.merge_shared_inputs(graph)
    if one_row_steps:
        for body in reversed(scan_bodies(model)):  # innermost first, as above
            int8_passes.one_row_scales(body)
    if rewritten and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return rewritten


def _apply_forms(graph: onnx.GraphProto, forms: dict[str, str], ranges: dict[ContentKey, float]) -> int:
    inits = {i.name: i for i in graph.initializer}
    arrays: dict[str, np.ndarray] = {}
    added: set[str] = set()
    folded = _bias_adds(graph, inits)
    nodes, rewritten, skip = [], 0, set()
    for node in graph.node:
        if id(node) in skip:
            continue
        form = forms.get(node.input[1], "fp32") if node.op_type == "MatMul" and len(node.input) == 2 else "fp32"
        if form == "fp32" or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = node.input[1]
        if weight not in arrays:
            arrays[weight] = numpy_helper.to_array(inits[weight])
        add, bias = folded.get(node.output[0], (None, ""))
        if form == "bf16" or (bias and list(inits[bias].dims) != [arrays[weight].shape[1]]):
            add, bias = None, ""
        out = add.output[0] if add is not None else node.output[0]
        act_range = 1.0
        if form == "int8":
            key = content_key(inits[weight])
            if key not in ranges:
                raise ValueError(f"{weight}: no activation range was calibrated for this int8 product")
            act_range = ranges[key]
        new_nodes, new_inits = form_nodes(form, node.input[0], out, weight, arrays[weight], bias, act_range)
        if add is not None:
            skip.add(id(add))
        for i, n in enumerate(new_nodes):
            n.name = f"{node.name or node.output[0]}.{form}.{i}"
        nodes.extend(new_nodes)
        for t in new_inits:
            if t.name not in added:
                graph.initializer.append(t)
                added.add(t.name)
        rewritten += 1
    replace_nodes(graph, nodes)
    return rewritten


def _bias_adds(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> dict[str, tuple[onnx.NodeProto, str]]:
    """MatMul output name -> (the Add that alone reads it, with a 1-D initializer as its other input; that name)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    out = {}
    for n in graph.node:
        if n.op_type != "MatMul" or n.output[0] in outputs:
            continue
        users = readers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        other = [x for x in users[0].input if x != n.output[0]]
        if len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) == 1:
            out[n.output[0]] = (users[0], other[0])
    return out


def demote(rows: list[dict[str, Any]], frm: str, to: str, *, graph: str | None = None) -> bool:
    """Replace every choice starting with ``frm`` by ``to`` (after an accuracy refusal), in ``graph``'s
    products or all; True if any changed."""
    changed = False
    for r in rows:
        if r["chosen"].startswith(frm) and graph in (None, r["graph"]):
            r["chosen"], r["demoted_from"] = to, r["chosen"]
            changed = True
    return changed
