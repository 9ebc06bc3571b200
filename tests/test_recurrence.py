"""Each layer's time loop is one ONNX node (``rnnlm.export.recurrence``): a Scan over the cell's step,
or ONNX's LSTM operator for a plain LSTM layer.

What the export validation already checks (onnxruntime against PyTorch at lengths 1, 7 and 64, batches
of mixed lengths) holds for these graphs too; here: the graphs are that shape, their size does not grow
with the chunk, and the LSTM operator's one deviation from the cell (a sample that does not advance in a
call: onnxruntime returns zeros for it) is corrected, checked against PyTorch directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from bundles import ADVANCE_CHUNK, CHUNK, VARIANTS, Built, no_data_dir, read_manifest
from rnnlm.export import export_bundle
from rnnlm.export.graphs import unflatten_state
from rnnlm.export.passes import graphs_of, node_graphs
from rnnlm.export.recurrence import DOMAIN

from rnnlm.checkpoint import load_model_dir
from rnnlm.model import flatten_state

RECURRENT_OPS = {"Scan", "LSTM"}


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def node_count(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in graphs_of(model))


@pytest.mark.parametrize(("cell", "ln"), list(VARIANTS))
def test_each_layer_is_one_recurrent_node(built: Callable[[str, bool], Built], cell: str, ln: bool) -> None:
    b = built(cell, ln)
    expected = "LSTM" if cell == "lstm" and not ln else "Scan"  # layer norm inside the gates: not ONNX's LSTM
    for name in ("score.onnx", "advance.onnx"):
        model = load(b.bundle / name)
        ops = [n.op_type for n in model.graph.node]
        outer = "LSTM" if expected == "LSTM" else "If"  # a Scan layer: If(full chunk, twin, Scan)
        assert [op for op in ops if op in RECURRENT_OPS | {"If"}] == [outer] * b.num_layers, name
        assert not any(n.domain == DOMAIN for g in graphs_of(model) for n in g.node), "a placeholder was left"
        if expected == "Scan":  # the step is written once per branch, in the body, and its products are there
            for layer in range(b.num_layers):
                full, held = (_body(model, f"layer{layer}.Scan.{kind}") for kind in ("full", "held"))
                for body in (full, held):
                    assert any(n.op_type in ("MatMul", "Gemm") for n in body.node)
                keep = f"layer{layer}.keep"
                assert not any(keep in n.input for n in full.node), "the full-chunk twin still holds"
                holds = [n for n in held.node if n.op_type == "Where" and n.input[0] == keep]
                assert len(holds) == len(read_manifest(b.bundle)["state"]) // b.num_layers  # one per state field


def _body(model: onnx.ModelProto, scan: str) -> onnx.GraphProto:
    """The body of the Scan node named ``scan``, wherever it is."""
    (body,) = [g for graph in graphs_of(model) for n in graph.node if n.name == scan for g in node_graphs(n)]
    return body


def test_graph_size_does_not_grow_with_the_chunk(built: Callable[[str, bool], Built], tmp_path: Path) -> None:
    """The unrolled graphs grew by a copy of the step per time step (1,300 nodes for a 32-step LSTM)."""
    for cell, ln in (("rhn", False), ("lstm", False)):
        b = built(cell, ln)
        out = tmp_path / f"{cell}-64"
        export_bundle(b.checkpoint, out=out, chunk=64, advance_chunk=256, data_dir=no_data_dir(tmp_path))
        for name in ("score.onnx", "advance.onnx"):
            assert node_count(load(out / name)) == node_count(load(b.bundle / name)), (cell, name)


def _score_session(bundle: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / "score.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("ln", [False, True])
def test_a_sample_that_does_not_advance_keeps_its_state(built: Callable[[str, bool], Built], ln: bool) -> None:
    """lengths [0, 3, C] in one call from a random state: sample 0 must come out with its state untouched
    (onnxruntime's LSTM returns zeros there), the others as PyTorch runs them alone."""
    b = built("lstm", ln)
    model, _ = load_model_dir(b.checkpoint)
    model.eval()
    sess = _score_session(b.bundle)
    rng = np.random.default_rng(0)
    lengths = np.array([0, 3, CHUNK], np.int64)
    tokens = rng.integers(0, model.cfg.vocab_size, (CHUNK, 3)).astype(np.int64)
    state_names = [i.name for i in sess.get_inputs()[3:]]
    state = {n: rng.standard_normal((3, int(i.shape[1]))).astype(np.float32)
             for n, i in zip(state_names, sess.get_inputs()[3:], strict=True)}
    outs = sess.run(None, {"token_ids": tokens, "targets": tokens, "lengths": lengths, **state})
    got = dict(zip([o.name for o in sess.get_outputs()], outs, strict=True))
    for name in state_names:
        np.testing.assert_array_equal(got["next_" + name][0], state[name][0], err_msg=name)
    for b_i in (1, 2):
        n = int(lengths[b_i])
        start = unflatten_state(model, tuple(torch.from_numpy(state[name][b_i : b_i + 1]) for name in state_names))
        with torch.no_grad():
            _, final = model.hidden(torch.from_numpy(tokens[:n, b_i : b_i + 1]), start)
        for name, want in zip(state_names, flatten_state(final), strict=True):
            np.testing.assert_allclose(got["next_" + name][b_i], want[0].numpy(), atol=1e-5, rtol=0, err_msg=name)


def _ran(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> tuple[set[str], list[np.ndarray]]:
    """The Scan nodes that ran for one call (onnxruntime's profiler), and the call's outputs."""
    sess.run(None, feed)  # the profiler records this call only: a new session per call
    events = json.loads(Path(sess.end_profiling()).read_text())
    names = {e["name"].removesuffix("_kernel_time") for e in events if e.get("cat") == "Node"}
    return {n for n in names if n.endswith((".Scan.full", ".Scan.held"))}, sess.run(None, feed)


@pytest.mark.parametrize("graph", ["score", "advance"])
def test_a_call_where_every_column_advances_every_step_runs_the_twin(built: Callable[[str, bool], Built],
                                                                      tmp_path: Path, graph: str) -> None:
    """Equal lengths (a prompt, a stream) take the Scans without holds, and reach the state the held Scans
    reach for the same column within a ragged call; a ragged call takes the held Scans."""
    b = built("rhn", False)  # two layers: one If each
    steps = CHUNK if graph == "score" else ADVANCE_CHUNK
    layers = range(b.num_layers)

    def session() -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.enable_profiling, opts.profile_file_prefix = True, str(tmp_path / "prof")
        return ort.InferenceSession(str(b.bundle / f"{graph}.onnx"), opts, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(1)
    manifest = read_manifest(b.bundle)
    tokens = rng.integers(0, manifest["config"]["vocab_size"], (steps, 2)).astype(np.int64)
    state = {s["input"]: rng.standard_normal((2, s["size"])).astype(np.float32) for s in manifest["state"]}

    def states(lengths: list[int]) -> tuple[set[str], list[np.ndarray]]:
        f = {"token_ids": tokens, "lengths": np.array(lengths, np.int64), **state}
        ran, outs = _ran(session(), {**f, "targets": tokens} if graph == "score" else f)
        return ran, outs[1:] if graph == "score" else outs

    ran, full = states([steps, steps])
    assert ran == {f"layer{i}.Scan.full" for i in layers}
    ran, ragged = states([steps, steps - 1])
    assert ran == {f"layer{i}.Scan.held" for i in layers}
    for a, z in zip(ragged, full, strict=True):
        np.testing.assert_allclose(a[0], z[0], rtol=0, atol=1e-6)  # column 0 advanced every step in both
        assert not np.allclose(a[1], z[1])  # column 1 stopped one step early
