"""A bundle's step graph as an NVIDIA Triton Inference Server model repository.

    DIR/<model>/config.pbtxt         onnxruntime backend, sequence batcher with implicit state
    DIR/<model>/1/model.onnx         the step graph plus the two sequence controls (below)
    DIR/<model>/vocab.txt            line number = token id; also the labels of ``logprobs``
    DIR/<model>/rnnlm-triton.json    provenance: source bundle, sha256 of every file written

One request carries one token per sequence (``token_ids``, shape [batch, 1]) and returns
``logprobs`` [batch, vocab]. The recurrent state never leaves the server: each
``state.<layer>.<field>`` input is a Triton *implicit state* whose value in request i+1 is the
``next_state.<layer>.<field>`` output of request i of the same sequence (correlation id), and it
starts from zeros (``initial_state { zero_data: true }``). Names, dtypes and sizes come from the
bundle's manifest only; the bundle's names are valid Triton tensor names, so none is renamed.

Why the graph gets two extra inputs. The onnxruntime backend refuses a model unless its inputs are
exactly the config's inputs, its control inputs and its state inputs, and a control needs a model
input. The copy therefore takes ``START`` and ``READY`` (int32 [batch, 1], 0/1) and uses them:

* START = 1 zeroes the incoming state, so a sequence starts fresh even on a server that hands the
  first request uninitialised state memory (Triton's behaviour without ``initial_state``);
* READY = 0 marks a batch slot Triton filled with a padding request: its token becomes 0 (always a
  valid id, so padding never makes the batch fail) and its state passes through unchanged.

Nothing is written unless ``onnx.checker`` accepts the copy and onnxruntime shows that it computes
what the bundle's step graph computes (``_verify``). Imports onnx and onnxruntime, never torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rnnlm.serve.bundle import Bundle
from rnnlm.serve.runtime import LanguageModel as Runtime

from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_bytes, atomic_write_text, replace_dir, sha256, staging_dir

MARKER = "rnnlm-triton.json"
FORMAT = "rnnlm-triton"
FORMAT_VERSION = 1
VERSION = "1"  # Triton's numeric version directory
START, READY = "START", "READY"  # the sequence-control inputs added to the graph (int32, [batch, 1])
TOLERANCE = 1e-5  # the copy against the bundle's step graph: same kernels, so ~bit-identical
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_IDLE_SECONDS = 60.0  # Triton's own default (1 s) would drop a sequence whose client pauses
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# manifest dtype -> (ONNX element type, numpy dtype, Triton config data type)
DTYPES: dict[str, tuple[int, type[np.generic], str]] = {
    "int64": (TensorProto.INT64, np.int64, "TYPE_INT64"),
    "float32": (TensorProto.FLOAT, np.float32, "TYPE_FP32"),
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    dims: tuple[int, ...]  # without the batch axis; -1 for another dynamic axis


@dataclass(frozen=True)
class _State:
    input: str
    output: str
    dtype: str
    dims: tuple[int, ...]


def write_triton_repository(
    bundle_dir: str | Path,
    repo_dir: str | Path,
    *,
    model_name: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_sequence_idle_seconds: float = DEFAULT_IDLE_SECONDS,
    force: bool = False,
) -> Path:
    """Write the bundle's step graph as model ``model_name`` (default ``rnnlm_<cell>``) of the Triton
    model repository ``repo_dir``; return the model's directory.

    The model directory is built beside its destination and renamed into place, replacing an earlier
    one written by rnnlm. Other models in ``repo_dir`` are left alone. Refused unless ``force``: a
    ``repo_dir`` holding anything but models written by rnnlm, or a model directory of that name
    that rnnlm did not write. ``force`` never deletes anything but ``repo_dir/<model_name>``.
    """
    bundle = Bundle.open(bundle_dir)  # verifies the format version and every file's sha256
    m = bundle.manifest
    name = model_name if model_name is not None else f"rnnlm_{m['cell']}"
    if not _NAME.fullmatch(name):
        raise RnnlmError(f"Triton model name {name!r}: use letters, digits, '_', '.' and '-' (not first)")
    if max_batch_size < 1:
        raise RnnlmError(f"max_batch_size must be >= 1 (the step graph batches on its first axis), got {max_batch_size}")
    if not (math.isfinite(max_sequence_idle_seconds) and max_sequence_idle_seconds > 0):
        raise RnnlmError(f"max_sequence_idle_seconds must be > 0, got {max_sequence_idle_seconds}")
    repo = Path(repo_dir)
    from rnnlm.export.exporter import refuse_shadowing  # torch-free at call time: the exporter imports torch

    refuse_shadowing(repo, "--triton")
    _check_destination(repo, name, force)

    inputs, outputs, states = _interface(m)
    step_path = bundle.file("step")
    # The runtime that ships the bundle checks its graphs' inputs and outputs against the manifest and
    # reruns its probe: one graph-I/O check for export, serving and this copy.
    Runtime(bundle, device="cpu", eager=True)
    model_bytes = _verified_copy(step_path, inputs, states, bundle.vocab_size)
    bundle.read_vocab()  # refuse a vocabulary that disagrees with the manifest
    vocab_bytes = (bundle.path / m["vocab"]["file"]).read_bytes()
    config = render_config(name, max_batch_size, round(max_sequence_idle_seconds * 1e6), inputs, outputs, states,
                           labels=("vocab.txt", bundle.vocab_size), comment=f"the step graph of a {m['cell']} language model")

    step_sha256 = m["files"][m["graphs"]["step"]["file"]]["sha256"]
    marker = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": name,
        "bundle": str(bundle.path.resolve()), "bundle_step_sha256": step_sha256,
        "controls": {START: "CONTROL_SEQUENCE_START, int32 0/1: zero the incoming state",
                     READY: "CONTROL_SEQUENCE_READY, int32 0/1: 0 = padding slot, state kept"},
        "state": [{"input": s.input, "output": s.output, "dims": list(s.dims)} for s in states],
    }
    _write_model_dir(repo, name, {f"{VERSION}/model.onnx": model_bytes, "vocab.txt": vocab_bytes,
                                  "config.pbtxt": config.encode()}, marker)
    return repo / name


def _verified_copy(step_path: Path, inputs: list[_Tensor], states: list[_State], vocab_size: int) -> bytes:
    """The step graph with Triton's sequence controls (``with_sequence_controls``), serialized, once
    onnx's checker passes it and onnxruntime runs it to within TOLERANCE of the original."""
    model = with_sequence_controls(onnx.load(str(step_path)), states)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise RnnlmError(f"the Triton copy of {step_path} fails onnx's checker: {e}", code=1) from None
    model_bytes = model.SerializeToString()
    try:
        worst = _verify(step_path.read_bytes(), model_bytes, inputs, states, vocab_size)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        raise RnnlmError(f"the Triton copy of {step_path} does not run in onnxruntime: "
                         f"{str(e).splitlines()[0][:300]}", code=1) from None
    if not worst <= TOLERANCE:  # also catches NaN
        raise RnnlmError(f"the Triton copy of {step_path} differs from it by {worst:.2e} (> {TOLERANCE:g}): "
                         "nothing written", code=1)
    return model_bytes


def _write_model_dir(repo: Path, name: str, files: dict[str, bytes], marker: dict[str, Any]) -> None:
    """Write ``files`` (relative path -> bytes) and rnnlm's marker (``marker`` plus each file's sha256
    and size) as ``repo/name``, replacing it in one rename.

    The temporary directory lives in the repository itself, so the final rename never crosses file
    systems (a repository is often a mounted volume). A Triton polling the repository may log a
    failed load of it meanwhile; one started with the default --model-control-mode=none never sees it."""
    with staging_dir(repo, name) as tmp:
        for rel, data in files.items():
            atomic_write_bytes(tmp / rel, data)
        marker = {**marker, "files": {f: {"sha256": sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in sorted(files)}}
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        # mkdtemp and the atomic writes create 0700/0600, but Triton often runs in a container as
        # another user: the repository is meant to be read by it.
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if (repo / name).is_symlink() or (repo / name).is_file():  # only with force: replace_dir moves directories
            (repo / name).unlink()
        replace_dir(tmp, repo / name)


# ----------------------------------------------------------------------------- the destination


def is_rnnlm_model_dir(path: Path) -> bool:
    """A directory holding a marker written by this module."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT


def _check_destination(repo: Path, name: str, force: bool) -> None:
    if repo.exists() and not repo.is_dir():
        raise RnnlmError(f"{repo} exists and is not a directory: refusing to write a Triton repository there")
    if not repo.is_dir() or force:
        return
    target = repo / name
    if target.exists() and not is_rnnlm_model_dir(target):
        raise RnnlmError(f"{target} exists and was not written by rnnlm: refusing to replace it (pass --force)")
    foreign = sorted(p.name for p in repo.iterdir() if not (p.is_dir() and is_rnnlm_model_dir(p)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RnnlmError(f"{repo} is not empty and is not a Triton repository written by rnnlm ({shown}): "
                         "refusing to write into it (pass --force to add the model beside them)")


# ----------------------------------------------------------------------------- the interface


def _dims(shape: list[Any], what: str) -> tuple[int, ...]:
    """The manifest's shape without its leading batch axis; other dynamic axes become -1."""
    if not shape or not isinstance(shape[0], str):
        raise RnnlmError(f"{what}: shape {shape} has no leading batch axis, which Triton batching needs")
    return tuple(-1 if isinstance(d, str) else int(d) for d in shape[1:])


def _interface(m: dict[str, Any]) -> tuple[list[_Tensor], list[_Tensor], list[_State]]:
    """The step graph's request inputs and outputs, and its states, all read from the manifest."""
    step = m["graphs"]["step"]
    ins = {t["name"]: t for t in step["inputs"]}
    outs = {t["name"]: t for t in step["outputs"]}
    states = []
    for s in m["state"]:
        if s["input"] not in ins or s["output"] not in outs:
            raise RnnlmError(f"manifest: state {s['input']} -> {s['output']} is not an input/output of the step graph")
        t_in, t_out = ins[s["input"]], outs[s["output"]]
        dims = _dims(t_in["shape"], s["input"])
        if t_in["dtype"] != t_out["dtype"] or dims != _dims(t_out["shape"], s["output"]) or -1 in dims:
            raise RnnlmError(f"manifest: state {s['input']} -> {s['output']} needs one dtype and one fixed shape")
        states.append(_State(s["input"], s["output"], t_in["dtype"], dims))
    stated_in, stated_out = {s.input for s in states}, {s.output for s in states}
    inputs = [_Tensor(t["name"], t["dtype"], _dims(t["shape"], t["name"])) for t in step["inputs"] if t["name"] not in stated_in]
    outputs = [_Tensor(t["name"], t["dtype"], _dims(t["shape"], t["name"])) for t in step["outputs"] if t["name"] not in stated_out]
    for dtype in [t.dtype for t in inputs + outputs] + [s.dtype for s in states]:
        if dtype not in DTYPES:
            raise RnnlmError(f"manifest: dtype {dtype!r} has no Triton equivalent here (int64, float32)")
    if {START, READY} & (set(ins) | set(outs)):
        raise RnnlmError(f"the step graph already has a tensor named {START} or {READY}")
    return inputs, outputs, states


# ----------------------------------------------------------------------------- the graph


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input named ``old`` reads ``new`` instead, subgraphs (outer-scope reads) included."""
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_uses(g, old, new)


def with_sequence_controls(source: onnx.ModelProto, states: list[_State]) -> onnx.ModelProto:
    """A copy of the step graph with inputs START and READY (int32 [batch, 1]):

        state'      = START ? 0 : state                  (for every state input)
        x'          = READY ? x : 0                      (for every other input: token ids)
        next_state  = READY ? f(x', state')_state : state

    The graph's own inputs and outputs keep their names, order and meaning when START = 0, READY = 1.
    """
    model = onnx.ModelProto()
    model.CopyFrom(source)
    g = model.graph
    batch = g.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    state_in = {s.input for s in states}
    others = [v for v in g.input if v.name not in state_in]
    pre: list[onnx.NodeProto] = []
    post: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    pre.append(helper.make_node("Cast", [START], ["triton/start"], name="triton/start", to=TensorProto.BOOL))
    pre.append(helper.make_node("Cast", [READY], ["triton/ready"], name="triton/ready", to=TensorProto.BOOL))
    for v in others:  # READY = 0 -> token 0, so a padding slot cannot index outside the embedding
        rank = len(v.type.tensor_type.shape.dim)
        zero, shape, masked = f"triton/zero/{v.name}", f"triton/shape/{v.name}", f"triton/masked/{v.name}"
        elem = v.type.tensor_type.elem_type
        inits.append(numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(elem)), zero))
        inits.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape))
        _rename_uses(g, v.name, masked)
        pre.append(helper.make_node("Reshape", ["triton/ready", shape], [f"{masked}/ready"], name=f"{masked}/ready"))
        pre.append(helper.make_node("Where", [f"{masked}/ready", v.name, zero], [masked], name=masked))
    producers = {o: n for n in g.node for o in n.output}
    for s in states:
        zero, reset, raw = f"triton/zero/{s.input}", f"triton/reset/{s.input}", f"triton/raw/{s.output}"
        inits.append(numpy_helper.from_array(np.zeros((), DTYPES[s.dtype][1]), zero))
        _rename_uses(g, s.input, reset)
        pre.append(helper.make_node("Where", ["triton/start", zero, s.input], [reset], name=reset))
        node = producers.get(s.output)
        if node is None:
            raise RnnlmError(f"the step graph's output {s.output} is not computed by any node")
        node.output[list(node.output).index(s.output)] = raw
        _rename_uses(g, s.output, raw)
        for vi in g.value_info:
            if vi.name == s.output:
                vi.name = raw
        post.append(helper.make_node("Where", ["triton/ready", raw, s.input], [s.output], name=f"triton/keep/{s.output}"))
        out = next(o for o in g.output if o.name == s.output)  # the shape the manifest states
        out.CopyFrom(helper.make_tensor_value_info(s.output, DTYPES[s.dtype][0], [batch, *s.dims]))

    nodes = [*pre, *g.node, *post]
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.extend([helper.make_tensor_value_info(c, TensorProto.INT32, [batch, 1]) for c in (START, READY)])
    return model


def _verify(source: bytes, copy: bytes, inputs: list[_Tensor], states: list[_State], vocab: int) -> float:
    """The largest difference between the copy and the bundle's graph in onnxruntime, over a sequence
    that uses every control: three slots, one starting late over garbage state, one padded for a step
    with an out-of-range token (which must not reach the embedding)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ref = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(copy, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    B, T = 3, 5
    tokens = {t.name: rng.integers(0, vocab, size=(T, B)).astype(DTYPES[t.dtype][1]) for t in inputs}
    start = np.zeros((T, B), np.int32)
    start[0, :2] = start[2, 2] = 1  # slot 2 starts at step 2 over whatever its state holds
    ready = np.ones((T, B), np.int32)
    ready[:2, 2] = ready[3, 1] = 0  # slot 2 unused before it starts; slot 1 padded at step 3
    garbage = {s.input: rng.normal(0, 10, (B, *s.dims)).astype(DTYPES[s.dtype][1]) for s in states}
    served = dict(garbage)
    reference = [{s.input: np.zeros((1, *s.dims), DTYPES[s.dtype][1]) for s in states} for _ in range(B)]
    worst = 0.0
    for t in range(T):
        feed = {name: x[t].copy() for name, x in tokens.items()}
        for name in feed:
            feed[name][ready[t] == 0] = vocab + 1000  # out of range: must be masked
        out = new.run(None, {**feed, **served, START: start[t][:, None], READY: ready[t][:, None]})
        new_state = dict(zip((s.input for s in states), out[1:], strict=True))
        for b in range(B):
            if not ready[t, b]:
                worst = max(worst, *(float(np.abs(new_state[k][b] - served[k][b]).max()) for k in served))
                continue
            lp, *st = ref.run(None, {**{k: v[t, b : b + 1] for k, v in tokens.items()}, **reference[b]})
            reference[b] = dict(zip((s.input for s in states), st, strict=True))
            worst = max(worst, float(np.abs(out[0][b] - lp[0]).max()),
                        *(float(np.abs(new_state[k][b] - reference[b][k][0]).max()) for k in served))
        served = new_state
    return worst


# ----------------------------------------------------------------------------- config.pbtxt


def _q(s: str) -> str:
    """A protobuf text-format string literal."""
    if not s.isprintable():
        raise RnnlmError(f"tensor name {s!r} has unprintable characters")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _shape(t: _Tensor) -> str:
    # Triton needs non-empty dims: a tensor that is only [batch] is [batch, 1] on the wire, reshaped.
    return f"dims: [ {', '.join(map(str, t.dims))} ]" if t.dims else "dims: [ 1 ]\n    reshape: { shape: [ ] }"


def render_config(name: str, max_batch_size: int, idle_us: int, inputs: list[_Tensor], outputs: list[_Tensor],
                  states: list[_State], *, labels: tuple[str, int] | None = None, comment: str = "") -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig). ``labels``: a file of that many
    lines in the model directory, named as the labels of every output over that many classes."""
    def io(t: _Tensor, output: bool) -> str:
        labelled = output and labels is not None and t.dims == (labels[1],)
        extra = f"\n    label_filename: {_q(labels[0])}" if labelled and labels is not None else ""
        return f"  {{\n    name: {_q(t.name)}\n    data_type: {DTYPES[t.dtype][2]}\n    {_shape(t)}{extra}\n  }}"

    def control(tensor: str, kind: str) -> str:
        return (f"    {{\n      name: {_q(tensor)}\n      control [ {{ kind: {kind} int32_false_true: [ 0, 1 ] }} ]\n    }}")

    def state(s: _State) -> str:
        t, dims = DTYPES[s.dtype][2], ", ".join(map(str, s.dims))
        return (f"    {{\n      input_name: {_q(s.input)}\n      output_name: {_q(s.output)}\n      data_type: {t}\n"
                f"      dims: [ {dims} ]\n"
                f"      initial_state: {{ data_type: {t} dims: [ {dims} ] zero_data: true name: \"zeros\" }}\n    }}")

    # logprobs (the output over the vocabulary) gets the vocabulary as labels: Triton's
    # classification extension then answers "top k" requests with the tokens themselves.
    return "\n".join([
        f"# Written by rnnlm: {' '.join(comment.split())}." if comment else "# Written by rnnlm.",
        "# One request = one token per sequence. The recurrent state stays on the server between the",
        "# requests of a sequence (implicit state) and starts from zeros; see rnnlm-triton.json.",
        f"name: {_q(name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(io(t, False) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(io(t, True) for t in outputs) + "\n]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {idle_us}",
        "  direct { }",
        "  control_input [\n" + ",\n".join([control(START, "CONTROL_SEQUENCE_START"),
                                           control(READY, "CONTROL_SEQUENCE_READY")]) + "\n  ]",
        "  state [\n" + ",\n".join(state(s) for s in states) + "\n  ]",
        "}",
        "",
    ])
