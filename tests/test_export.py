"""Tests for rnnlm.export: bundles of every cell, graphs against each other and against PyTorch,
refusals that leave nothing behind, and int8 quantization.

Independent computations throughout: sha256 of the files computed here, graph names written out
by hand from the cells' state fields, eval-mode PyTorch log-softmax of a model reloaded from the
checkpoint, and directory listings before and after a refused export.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from bundles import (
    CHUNK,
    STATE_FIELDS,
    TOKENS,
    VARIANTS,
    Built,
    export,
    file_sha256,
    make_checkpoint,
    no_data_dir,
    read_manifest,
    tree,
)
from rnnlm.export import spec
from rnnlm.export.graphs import ScoreGraph
from rnnlm.export.passes import graphs_of
from rnnlm.export.validate import ValidationError
from typer.testing import CliRunner

from rnnlm.checkpoint import load_model_dir
from rnnlm.cli import app
from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel, flatten_state

CELL_LN = [pytest.param(c, ln, id=f"{c}-{'ln' if ln else 'plain'}") for c, ln in VARIANTS]
V = len(TOKENS)
# advance.onnx reads prompts (tests/test_advance.py); quantized bundles have one too
BUNDLE_FILES = {"manifest.json", "step.onnx", "score.onnx", "vocab.txt", "advance.onnx"}
# onnxruntime against PyTorch: the export's stated tolerance. A random-init HyperLSTM with layer norm
# drifts ~3e-5 from float32 PyTorch over 29 steps (float32 and float64 PyTorch differ as much), so
# 1e-5 is kept for the two graphs against each other, which run the same kernels.
TORCH_TOL = 1e-4


def expected_states(cell: str, num_layers: int) -> list[tuple[str, str, int]]:
    """(input name, output name, size) of every state tensor, layer by layer, field by field."""
    size = {"hyper_h": 16, "hyper_c": 16}
    return [(f"state.{layer}.{f}", f"next_state.{layer}.{f}", size.get(f, 32))
            for layer in range(num_layers) for f in STATE_FIELDS[cell]]


def torch_logprobs(model: LanguageModel, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eval-mode PyTorch: log-softmax (L, B, V) in float64 and the flat final state."""
    model.eval()
    with torch.no_grad():
        logits, state = model(torch.from_numpy(tokens), model.init_state(tokens.shape[1]))
    return F.log_softmax(logits.double(), -1).numpy(), [t.numpy() for t in flatten_state(state)]


def picked(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def zero_state(states: list[spec.StateSpec], batch: int) -> dict[str, np.ndarray]:
    return {s.input: np.zeros((batch, s.size), np.float32) for s in states}


def run_step(sess: ort.InferenceSession, states: list[spec.StateSpec], tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The step graph driven here, apart from the runtime: tokens (L, B) -> logprobs (L, B, V), final state."""
    state, out = zero_state(states, tokens.shape[1]), []
    for t in range(tokens.shape[0]):
        logprobs, *new = sess.run(None, {"token_ids": tokens[t], **state})
        out.append(logprobs)
        state = {s.input: v for s, v in zip(states, new, strict=True)}
    return np.stack(out), state


def run_score(sess: ort.InferenceSession, states: list[spec.StateSpec], chunk: int, tokens: np.ndarray,
              targets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The scoring graph driven here in full chunks (every column in every call), apart from the runtime."""
    L, B = tokens.shape
    state, out = zero_state(states, B), np.zeros((L, B), np.float32)
    for start in range(0, max(L, 1), chunk):
        n = min(chunk, L - start)
        x, y = np.zeros((chunk, B), np.int64), np.zeros((chunk, B), np.int64)
        x[:n], y[:n] = tokens[start : start + n], targets[start : start + n]
        lp, *new = sess.run(None, {"token_ids": x, "targets": y, "lengths": np.clip(lengths - start, 0, chunk), **state})
        out[start : start + n] = lp[:n]
        state = {s.input: v for s, v in zip(states, new, strict=True)}
    return out, state


# ------------------------------------------------------------------------------- 1. the bundle


@pytest.mark.parametrize(("cell", "ln"), CELL_LN)
def test_bundle_is_validated_self_describing_and_safe(built: Callable[[str, bool], Built], cell: str, ln: bool) -> None:
    b = built(cell, ln)
    assert b.summary["max_abs_logprob_diff"] <= 1e-4 and b.summary["max_abs_state_diff"] <= 1e-4
    assert sorted(p.name for p in b.bundle.iterdir()) == sorted(BUNDLE_FILES)  # no temp or fp32 leftovers
    assert not any(p.name.startswith(f".{b.bundle.name}") for p in b.bundle.parent.iterdir())
    m = read_manifest(b.bundle)
    assert m["format"] == "rnnlm-bundle" and m["format_version"] == spec.FORMAT_VERSION == 1
    assert m["cell"] == cell and m["config"]["layer_norm"] is ln and m["config"]["num_layers"] == b.num_layers

    # Every file but the manifest is listed with its sha256 and size, computed here independently.
    assert set(m["files"]) == BUNDLE_FILES - {"manifest.json"}
    for name, meta in m["files"].items():
        assert meta["sha256"] == file_sha256(b.bundle / name), name
        assert meta["bytes"] == (b.bundle / name).stat().st_size, name
    assert (b.bundle / "vocab.txt").read_text(encoding="utf-8") == "".join(t + "\n" for t in TOKENS)
    assert m["vocab"]["size"] == V and m["vocab"]["eos_id"] == TOKENS.index("<eos>")
    assert m["vocab"]["unk_id"] == TOKENS.index("<unk>")

    # Graph names, written out by hand from the cell's state fields (not read from spec.py).
    states = expected_states(cell, b.num_layers)
    step_in = ["token_ids", *(s[0] for s in states)]
    step_out = ["logprobs", *(s[1] for s in states)]
    score_in = ["token_ids", "targets", "lengths", *(s[0] for s in states)]
    score_out = ["target_logprobs", *(s[1] for s in states)]
    g = m["graphs"]
    assert [t["name"] for t in g["step"]["inputs"]] == step_in and [t["name"] for t in g["step"]["outputs"]] == step_out
    assert [t["name"] for t in g["score"]["inputs"]] == score_in
    assert [t["name"] for t in g["score"]["outputs"]] == score_out
    assert g["score"]["chunk"] == CHUNK and g["step"]["file"] == "step.onnx" and g["score"]["file"] == "score.onnx"
    assert [(s["input"], s["output"], s["size"]) for s in m["state"]] == states
    # ... and they are spec.py's, which the exporter and validator read.
    layout = [spec.StateSpec(s["layer"], s["field"], s["size"]) for s in m["state"]]
    assert spec.step_graph(layout, V).input_names == step_in and spec.step_graph(layout, V).output_names == step_out
    assert spec.score_graph(layout).input_names == score_in
    assert spec.score_graph(layout).output_names == score_out

    assert m["opset"] >= spec.MIN_OPSET == 17
    for name, inputs, outputs in (("step.onnx", step_in, step_out), ("score.onnx", score_in, score_out)):
        path = b.bundle / name
        assert path.read_bytes()[:1] != b"\x80" and path.read_bytes()[:4] != b"PK\x03\x04"  # not a pickle / torch zip
        model = onnx.load(str(path), load_external_data=False)
        assert [v.name for v in model.graph.input] == inputs and [v.name for v in model.graph.output] == outputs
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= 17
        assert model.graph.initializer, "weights must be inside the file"
        for t in model.graph.initializer:
            assert t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data, t.name
        sess = session(path)
        assert [i.name for i in sess.get_inputs()] == inputs and [o.name for o in sess.get_outputs()] == outputs
    for name in ("vocab.txt", "manifest.json"):
        assert (b.bundle / name).read_bytes()[:1] not in (b"\x80", b"P")

    # The probe: a fixed input and the graphs' outputs, which eval-mode PyTorch reproduces.
    probe = m["probe"]
    seq = np.array(probe["tokens"], np.int64)
    assert seq[0] == m["vocab"]["eos_id"] and len(probe["target_logprobs"]) == len(seq) - 1
    assert len(probe["last_step_logprobs_head"]) == 16 and probe["tolerance"] == pytest.approx(1e-4)
    model, _ = load_model_dir(b.checkpoint)
    ref, _ = torch_logprobs(model, seq[:-1, None])
    np.testing.assert_allclose(probe["target_logprobs"], picked(ref, seq[1:, None])[:, 0], atol=1e-4)
    np.testing.assert_allclose(probe["last_step_logprobs_head"], ref[-1, 0, :16], atol=1e-4)


# ------------------------------------------------------------- 2. scoring graph = step graph = torch


@pytest.mark.parametrize(("cell", "ln"), CELL_LN)
def test_scoring_graph_equals_step_graph_and_torch(built: Callable[[str, bool], Built], cell: str, ln: bool) -> None:
    b = built(cell, ln)
    m = read_manifest(b.bundle)
    states = [spec.StateSpec(s["layer"], s["field"], s["size"]) for s in m["state"]]
    step_sess, score_sess = session(b.bundle / "step.onnx", 1), session(b.bundle / "score.onnx", 1)
    model, _ = load_model_dir(b.checkpoint)
    rng = np.random.default_rng(5)
    for length in (1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
        seq = rng.integers(0, V, size=(length + 1, 2), dtype=np.int64)
        tokens, targets = seq[:-1], seq[1:]
        step_lp, step_state = run_step(step_sess, states, tokens)
        score_lp, score_state = run_score(score_sess, states, CHUNK, tokens, targets, np.full(2, length, np.int64))
        np.testing.assert_allclose(score_lp, picked(step_lp, targets), atol=1e-5, err_msg=f"length {length}")
        ref_lp, ref_state = torch_logprobs(model, tokens)
        np.testing.assert_allclose(step_lp, ref_lp, atol=TORCH_TOL, err_msg=f"length {length}")
        np.testing.assert_allclose(score_lp, picked(ref_lp, targets), atol=TORCH_TOL, err_msg=f"length {length}")
        np.testing.assert_allclose(np.exp(step_lp).sum(-1), 1.0, atol=1e-5)  # a distribution over the vocabulary
        for s, ref in zip(states, ref_state, strict=True):
            np.testing.assert_allclose(step_state[s.input], score_state[s.input], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(step_state[s.input], ref, atol=TORCH_TOL, rtol=TORCH_TOL)

    # Different lengths in one call: each column equals its own sequence run alone; padding is 0.
    lengths = np.array([3 * CHUNK + 5, CHUNK + 1, 0], np.int64)
    seq = rng.integers(0, V, size=(int(lengths.max()) + 1, 3), dtype=np.int64)
    mixed_lp, mixed_state = run_score(score_sess, states, CHUNK, seq[:-1], seq[1:], lengths)
    for col, n in enumerate(lengths):
        assert not mixed_lp[n:, col].any()
        if n == 0:
            for s in states:
                assert not mixed_state[s.input][col].any()  # a zero-length sample keeps its (zero) state
            continue
        ref_lp, ref_state = torch_logprobs(model, seq[:n, col : col + 1])
        np.testing.assert_allclose(mixed_lp[:n, col], picked(ref_lp, seq[1 : n + 1, col : col + 1])[:, 0],
                                   atol=TORCH_TOL)
        for s, ref in zip(states, ref_state, strict=True):
            np.testing.assert_allclose(mixed_state[s.input][col], ref[0], atol=TORCH_TOL, rtol=TORCH_TOL)


# ------------------------------------------------------------------- 3. validation refuses a bad export


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer LSTM checkpoint: the cheapest model to trace, for exports that are meant to fail."""
    return make_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", "lstm", False, num_layers=1)


def _perturb_score_output(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = ScoreGraph.forward

    def bad(self: ScoreGraph, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = forward(self, *args)
        return (out[0] + 1e-2, *out[1:])

    monkeypatch.setattr(ScoreGraph, "forward", bad)


def _perturb_reference_state(monkeypatch: pytest.MonkeyPatch) -> None:
    import rnnlm.export.validate as validate

    reference = validate.torch_reference

    def bad(model: LanguageModel, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        lp, state = reference(model, tokens)
        return lp, [s + 1e-2 for s in state]

    monkeypatch.setattr(validate, "torch_reference", bad)


@pytest.mark.parametrize(("breakage", "over_existing"), [
    pytest.param("score-logprobs", False, id="score-logprobs-new-out"),
    pytest.param("score-logprobs", True, id="score-logprobs-over-a-bundle"),
    pytest.param("reference-state", False, id="reference-state-new-out"),
])
def test_validation_refuses_a_broken_export(
    small_ckpt: Path, lstm_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: str,
    over_existing: bool,
) -> None:
    out = tmp_path / "bundle"
    if over_existing:
        shutil.copytree(lstm_bundle, out)
    no_data_dir(tmp_path)
    before = tree(tmp_path)
    hashes = {p: file_sha256(tmp_path / p) for p in before if (tmp_path / p).is_file()}
    (_perturb_score_output if breakage == "score-logprobs" else _perturb_reference_state)(monkeypatch)
    with pytest.raises(ValidationError) as info:
        export(small_ckpt, out, force=over_existing)  # the bundle there is another checkpoint's
    msg = info.value.message
    assert info.value.code == 1 and "disagrees with PyTorch beyond 0.0001" in msg
    if breakage == "score-logprobs":  # only the scoring graph is off, by exactly 1e-2 in log p
        assert "score batch 1 length 1: |Δlogp| 1.00e-02" in msg and "step batch" not in msg
        assert "length mixed 64/7/1" in msg
    else:  # every case's state is off by 1e-2 (states of a random LSTM are well inside |1|)
        assert "step batch 3 length 64" in msg and "|Δstate| 1.00e-02" in msg
    # Nothing written: no new bundle, no temporary directory, an existing bundle untouched.
    assert tree(tmp_path) == before
    assert {p: file_sha256(tmp_path / p) for p in before if (tmp_path / p).is_file()} == hashes


def test_refused_export_creates_no_parent_directories(small_ckpt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _perturb_score_output(monkeypatch)
    with pytest.raises(ValidationError):
        export(small_ckpt, tmp_path / "new" / "bundle", data_dir=no_data_dir(tmp_path / "elsewhere"))
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------- 4. bad input


def _corrupt_checkpoint(root: Path, small: Path) -> Path:
    ckpt = root / "corrupt"
    shutil.copytree(small, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ckpt


def _gru_checkpoint(root: Path, small: Path) -> Path:
    ckpt = root / "gru"
    shutil.copytree(small, ckpt)
    cfg = ckpt / "config.json"
    cfg.write_text(cfg.read_text().replace('"cell": "lstm"', '"cell": "gru"'))
    return ckpt


def _busy_dir(root: Path) -> Path:
    out = root / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    return out


# name -> (export_bundle kwargs built from (root, small checkpoint), words the message must hold)
BAD_INPUTS: dict[str, tuple[Callable[[Path, Path], dict], list[str]]] = {
    "missing-checkpoint": (lambda r, s: {"model_dir": r / "no-such-model", "out": r / "out"},
                           ["no checkpoint directory", "no-such-model"]),
    "corrupt-weights": (lambda r, s: {"model_dir": _corrupt_checkpoint(r, s), "out": r / "out"},
                        ["model.safetensors", "cannot read the weights"]),
    "unknown-cell-option": (lambda r, s: {"model_dir": None, "cell": "gru", "out": r / "out"}, ["unknown cell 'gru'"]),
    "unknown-cell-config": (lambda r, s: {"model_dir": _gru_checkpoint(r, s), "out": r / "out"}, ["unknown cell 'gru'"]),
    "out-not-a-bundle": (lambda r, s: {"model_dir": s, "out": _busy_dir(r)}, ["is not a bundle", "--force"]),
    "out-is-a-file": (lambda r, s: {"model_dir": s, "out": r / "notes.txt"}, ["is not a bundle"]),
    "opset-16": (lambda r, s: {"model_dir": s, "out": r / "out", "opset": 16}, ["--opset 16", "17"]),
    "chunk-0": (lambda r, s: {"model_dir": s, "out": r / "out", "chunk": 0}, ["--chunk"]),
    "advance-chunk-2000": (lambda r, s: {"model_dir": s, "out": r / "out", "advance_chunk": 2000},
                           ["--advance-chunk", "[0, 1024]", "2000"]),
    "quantize-int4": (lambda r, s: {"model_dir": s, "out": r / "out", "quantize": "int4"}, ["--quantize must be auto", "int8"]),
    "max-ppl-rise-negative": (lambda r, s: {"model_dir": s, "out": r / "out", "quantize": "auto", "max_ppl_rise": -0.1},
                              ["--max-ppl-rise"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(small_ckpt: Path, tmp_path: Path, case: str) -> None:
    from rnnlm.export import export_bundle

    (tmp_path / "notes.txt").write_text("not a bundle\n")
    make, words = BAD_INPUTS[case]
    kwargs = make(tmp_path, small_ckpt)
    data_dir = no_data_dir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(RnnlmError) as info:
        export_bundle(kwargs.pop("model_dir"), chunk=kwargs.pop("chunk", CHUNK), data_dir=data_dir, **kwargs)
    for w in words:
        assert w in info.value.message
    assert info.value.code == 2 and "\n" not in info.value.message
    assert tree(tmp_path) == before
    assert not (small_ckpt / "onnx").exists()


def test_force_replaces_a_directory_that_is_not_a_bundle(small_ckpt: Path, tmp_path: Path) -> None:
    out = _busy_dir(tmp_path)
    export(small_ckpt, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-ptb", "notes"]  # the old directory is gone


CLI_BAD = {
    "missing-checkpoint": lambda r, s: ["export", str(r / "no-such-model"), "--out", str(r / "out")],
    "corrupt-weights": lambda r, s: ["export", str(_corrupt_checkpoint(r, s)), "--out", str(r / "out")],
    "unknown-cell": lambda r, s: ["export", "--cell", "gru"],
    "out-not-a-bundle": lambda r, s: ["export", str(s), "--out", str(_busy_dir(r))],
    "opset-16": lambda r, s: ["export", str(s), "--out", str(r / "out"), "--opset", "16"],
    "advance-chunk-2000": lambda r, s: ["export", str(s), "--out", str(r / "out"), "--advance-chunk", "2000"],
}


def test_cli_export_sets_the_advance_chunk(small_ckpt: Path, tmp_path: Path) -> None:
    data = no_data_dir(tmp_path)
    for chunk, name in ((8, "a8"), (0, "none")):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["export", str(small_ckpt), "--out", str(out), "--advance-chunk", str(chunk),
                                          "--chunk", str(CHUNK), "--data-dir", str(data), "--force"])
        assert result.exit_code == 0, result.output
        graphs = read_manifest(out)["graphs"]
        if chunk:
            assert graphs["advance"]["chunk"] == chunk and (out / "advance.onnx").is_file()
        else:
            assert "advance" not in graphs and not (out / "advance.onnx").exists()


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_export_refusals_are_one_error_line(small_ckpt: Path, tmp_path: Path, case: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # `--cell` resolves models/<cell> relative to the working directory
    args = CLI_BAD[case](tmp_path, small_ckpt)
    before = tree(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip()
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------------- 5. int8


@pytest.fixture
def small_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the tiny test models' products count as large, and time each form briefly."""
    from rnnlm.export import quantize

    monkeypatch.setattr(quantize, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(quantize, "TIME_PER_CANDIDATE", 0.003)


@pytest.mark.usefixtures("small_products")
@pytest.mark.parametrize("mode", ["auto", "int8"])
def test_quantized_bundle_is_measured_validated_and_loads(built: Callable[[str, bool], Built], tmp_path: Path,
                                                          mode: str) -> None:
    from rnnlm.export import quantize
    from rnnlm.serve import LanguageModel as Runtime

    fp32 = built("lstm", True)
    out = tmp_path / "q"
    summary = export(fp32.checkpoint, out, quantize=mode)
    m = read_manifest(out)
    q = m["quantization"]
    assert q["mode"] == mode and q["fp32_ppl"] > 1 and q["ppl"] > 1 and q["tokens"] == 3000
    assert q["text"] == "sampled from the model" and q["max_ppl_rise"] == 0.01
    assert q["ppl_rise"] == pytest.approx(q["ppl"] / q["fp32_ppl"] - 1) and q["ppl_rise"] <= 0.01
    assert q["step_graph_ppl_rise"] <= 0.01 and q["step_graph_tokens"] == 2976  # the step graph is judged too
    assert summary["quantization"]["ppl"] == q["ppl"]
    # Its own validation against PyTorch, not the fp32 figure: recorded in both places, within its tolerance.
    assert m["validation"]["max_abs_logprob_diff"] == q["validation"]["max_abs_logprob_diff"] <= q["validation"]["tolerance"]
    if any(p["chosen"] != "fp32" for p in q["products"]):  # quantized graphs: their own, larger difference
        assert m["validation"]["max_abs_logprob_diff"] > 10 * fp32.summary["max_abs_logprob_diff"]
    else:  # every product measured fastest in fp32 (tiny products can be): the fp32 graphs, to the bit
        assert m["validation"]["max_abs_logprob_diff"] == fp32.summary["max_abs_logprob_diff"]
    # Every product of both graphs measured in every form; bf16 either timed or refused with a reason.
    assert {p["graph"] for p in q["products"]} == {"step", "score"}
    for p in q["products"]:
        forms = [c["form"] for c in p["candidates"]]
        assert forms == (quantize.candidate_forms() if mode == "auto" else ["fp32", "int8"])
        assert all(c["seconds"] is not None or c["unavailable"] for c in p["candidates"])
        assert p["chosen"] == "int8" if mode == "int8" else p["chosen"] in forms
    # The graphs hold what the manifest says was chosen.
    ops = {n.op_type for name in ("step.onnx", "score.onnx") for g in graphs_of(onnx.load(str(out / name))) for n in g.node}
    chosen = {p["chosen"] for p in q["products"]}
    assert ("DynamicQuantizeMatMul" in ops) == ("int8" in chosen)
    assert ("MatMulNBits" in ops) == any(c.startswith("nbits4") for c in chosen)
    if mode == "int8":  # the decoder's bias is added by the quantized product itself, not by an Add after it
        score_nodes = onnx.load(str(out / "score.onnx")).graph.node
        assert any(n.op_type == "DynamicQuantizeMatMul" and len(n.input) == 5 and n.input[4] for n in score_nodes)
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES)
    for name, meta in m["files"].items():
        assert meta["sha256"] == file_sha256(out / name)

    # Its advance graph: every product in the form chosen for the scoring graph's product with the same
    # matrix, checked against PyTorch at export, and passing the check serving runs on first use (its state
    # after the probe equals the scoring graph's within the probe's tolerance).
    advance, score = onnx.load(str(out / "advance.onnx")), onnx.load(str(out / "score.onnx"))
    assert form_of_matrices(advance) <= form_of_matrices(score)
    if mode == "int8":  # every product quantized: the advance graph's recurrence is too
        assert form_of_matrices(advance)
    assert m["validation"]["advance"]["max_abs_state_diff"] <= q["validation"]["state_tolerance"]
    Runtime.load(out, threads=1).session("advance")

    # The runtime loads it (its probe included), and it scores close to the fp32 bundle of the same checkpoint.
    text = "the stock market fell\nshares of the company rose N percent in the quarter\n"
    rq, r32 = Runtime.load(out, threads=1).score(text), Runtime.load(fp32.bundle, threads=1).score(text)
    assert rq.tokens == r32.tokens == 16
    assert abs(rq.ppl / r32.ppl - 1) < 0.05


def form_of_matrices(model: onnx.ModelProto) -> set[tuple[str, bytes]]:
    """(op, the quantized matrix's bytes) for every quantized product in ``model`` and its Scan bodies."""
    inits = {i.name: i for g in graphs_of(model) for i in g.initializer}
    return {(n.op_type, onnx.numpy_helper.to_array(inits[n.input[1]]).tobytes()) for g in graphs_of(model)
            for n in g.node
            if n.op_type in ("DynamicQuantizeMatMul", "MatMulNBits")}


def _fake_timings(form: str, w: np.ndarray, rows: int, threads: int) -> dict:
    """4-bit at block 32, accuracy level 4 is 'measured' fastest, so that auto picks it deterministically."""
    return {"form": form, "seconds": 1e-6 if form == "nbits4-b32-a4" else 1e-3, "max_rel_error": 0.0}


@pytest.mark.usefixtures("small_products")
def test_a_quantization_that_costs_accuracy_is_demoted_then_refused(small_ckpt: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnlm.export import quantize

    monkeypatch.setattr(quantize, "time_form", _fake_timings)
    nbits4 = quantize.nbits4_weights
    monkeypatch.setattr(quantize, "nbits4_weights", lambda w, block: nbits4(w * 50.0, block))  # a broken 4-bit form
    out = tmp_path / "q"
    summary = export(small_ckpt, out, quantize="auto")
    q = read_manifest(out)["quantization"]
    choices = [a["choices"] for a in q["attempts"]]  # a failing graph is demoted, then the bundle rebuilt
    assert choices[0] == ["nbits4-b32-a4"] and choices[-1] == ["int8"] and 2 <= len(choices) <= 3
    assert max(q["attempts"][0]["ppl_rise"].values()) > 0.01 >= q["ppl_rise"] == summary["quantization"]["ppl_rise"]
    assert all(p["chosen"] == "int8" and p["demoted_from"] == "nbits4-b32-a4" for p in q["products"])

    # Now int8 is broken too: refused, with nothing written.
    int8 = quantize.int8_weights
    monkeypatch.setattr(quantize, "int8_weights", lambda w: (int8(w)[0], int8(w)[1] * 50.0))
    before = tree(tmp_path)
    with pytest.raises(RnnlmError) as info:
        export(small_ckpt, tmp_path / "q2", quantize="auto")
    assert info.value.code == 1 and "--max-ppl-rise 1.00%" in info.value.message and "no bundle written" in info.value.message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("form", ["int8", "nbits4-b32-a0", "nbits4-b32-a4", "nbits4-b128-a4"])
def test_each_quantized_form_computes_the_product(form: str) -> None:
    """Each form's one-node graph against numpy's float64 product, within its quantization error."""
    from rnnlm.export import quantize

    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 300)).astype(np.float32) * 0.1
    x = rng.standard_normal((5, 256)).astype(np.float32)
    sess = ort.InferenceSession(quantize.one_node_model(form, w), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ w.astype(np.float64)
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    # int8 per column: weights within scale/2 and activations in 8 bits, ~1 %; 4-bit blocks: ~10 %.
    assert rel < (0.02 if form == "int8" else 0.2), rel
    assert rel > 1e-5  # it really is quantized
    q, scale = quantize.int8_weights(w)
    assert np.abs(q.astype(np.float32) * scale - w).max() <= scale.max() / 2 + 1e-7


def test_products_are_the_large_weights_with_rows_per_call(built: Callable[[str, bool], Built]) -> None:
    from rnnlm.export import quantize

    b = built("lstm", True)  # one layer, untied: an input and a recurrent product, and the decoder
    score = onnx.load(str(b.bundle / "score.onnx"))
    step = onnx.load(str(b.bundle / "step.onnx"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "MIN_ELEMENTS", 0)
        sp, tp = quantize.find_products(score, "score", CHUNK), quantize.find_products(step, "step", CHUNK)
    # Scoring graph: the decoder and the input projection are hoisted over the chunk (one MatMul of
    # CHUNK rows each); the recurrent matrix is in the Scan body, written once, one row per call at batch 1.
    assert sorted((p.k, p.n, p.uses, p.rows) for p in sp) == sorted([(32, V, 1, CHUNK), (32, 128, 1, CHUNK), (32, 128, 1, 1)])
    assert sorted((p.k, p.n, p.uses, p.rows) for p in tp) == sorted([(32, V, 1, 1), (32, 128, 1, 1), (32, 128, 1, 1)])
    # The per-step product also meets BATCH_ROWS rows in per-line scoring; nothing else does.
    assert sorted((p.rows, p.batch_rows) for p in sp) == [(1, quantize.BATCH_ROWS), (CHUNK, None), (CHUNK, None)]
    assert all(p.batch_rows is None for p in tp)
    assert quantize.find_products(score, "score", CHUNK) == []  # nothing this small is worth quantizing


def test_a_product_met_at_two_row_counts_is_chosen_for_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit fastest at one row but slowest at 64, int8 a little slower at one row and fastest at 64 (as
    measured, bench/RESULTS.md): a step-graph product takes 4-bit, a scoring graph's per-step one int8."""
    from rnnlm.export import quantize

    def fake(form: str, w: np.ndarray, rows: int, threads: int) -> dict:
        seconds = {"fp32": 1.0, "int8": 0.7 if rows == 1 else 0.35, "nbits4-b32-a4": 0.5 if rows == 1 else 1.6}
        return {"form": form, "seconds": seconds.get(form, 3.0) * 1e-4, "max_rel_error": 0.0}

    monkeypatch.setattr(quantize, "time_form", fake)
    w = np.zeros((4, 8), np.float32)
    step = quantize.choose(quantize.Product("step", "w", 4, 8, 1, 1), w, 1)
    assert step["chosen"] == "nbits4-b32-a4" and "batch_candidates" not in step
    body = quantize.choose(quantize.Product("score", "w", 4, 8, 1, 1, quantize.BATCH_ROWS), w, 1)
    assert body["chosen"] == "int8"  # sqrt(0.7 * 0.35) = 0.49 against sqrt(0.5 * 1.6) = 0.89
    assert body["speedup"] == pytest.approx(1 / np.sqrt(0.7 * 0.35))
    assert body["batch_rows_per_call"] == quantize.BATCH_ROWS
    assert [c["form"] for c in body["batch_candidates"]] == [c["form"] for c in body["candidates"]]


# ------------------------------------------------------------------ 6. issue 11: source, replacing, shadowing


def test_manifest_identifies_its_source_without_a_path(built: Callable[[str, bool], Built]) -> None:
    b = built("rhn", False)
    m = read_manifest(b.bundle)
    assert m["source"] == {"config_sha256": file_sha256(b.checkpoint / "config.json"),
                           "weights_sha256": file_sha256(b.checkpoint / "model.safetensors"),
                           "vocab_sha256": file_sha256(b.checkpoint / "vocab.txt")}
    text = (b.bundle / "manifest.json").read_text(encoding="utf-8")
    assert str(b.checkpoint) not in text and str(b.checkpoint.parent) not in text


def test_replacing_a_bundle_of_another_checkpoint_needs_force(small_ckpt: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", "lstm", False, num_layers=1, seed=7)
    out = tmp_path / "bundle"
    export(small_ckpt, out)
    export(small_ckpt, out)  # the same checkpoint again: a plain refresh
    before = {p: file_sha256(out / p) for p in BUNDLE_FILES}
    with pytest.raises(RnnlmError) as info:
        export(other, out)
    assert info.value.code == 2 and "another checkpoint" in info.value.message and "--force" in info.value.message
    assert {p: file_sha256(out / p) for p in BUNDLE_FILES} == before
    export(other, out, force=True)
    assert read_manifest(out)["source"]["weights_sha256"] == file_sha256(other / "model.safetensors")


@pytest.mark.parametrize(("args", "option"), [(["--out", "json"], "--out json"), (["--triton", "numpy"], "--triton numpy")])
def test_export_refuses_a_folder_that_shadows_a_module(small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       args: list[str], option: str) -> None:
    monkeypatch.chdir(tmp_path)
    no_data_dir(tmp_path)
    before = tree(tmp_path)
    out = ["--out", str(tmp_path / "b")] if args[0] != "--out" else []
    result = CliRunner().invoke(app, ["export", str(small_ckpt), *out, *args, "--data-dir", "no-ptb"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}: ") and "shadow" in lines[0], result.stderr
    assert tree(tmp_path) == before


def test_model_repository_is_not_refused(small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnlm.export.exporter import refuse_shadowing

    monkeypatch.chdir(tmp_path)
    refuse_shadowing("model_repository")  # Triton's own name shadows nothing
    refuse_shadowing(tmp_path / "sub" / "json")  # not in the current directory: not on sys.path
    with pytest.raises(RnnlmError):
        refuse_shadowing("json")



def test_a_tied_decoder_is_stored_once(built: Callable[[str, bool], Built]) -> None:
    """The embedding's Gather and the decoder read one matrix: no transposed copy in either graph."""
    b = built("lstm", False)  # tied
    model, _ = load_model_dir(b.checkpoint)
    emb = model.embedding.weight.detach().numpy()
    for name in ("step.onnx", "score.onnx"):
        g = onnx.load(str(b.bundle / name)).graph
        arrays = [onnx.numpy_helper.to_array(t) for t in g.initializer]
        assert sum(a.shape == emb.shape and np.array_equal(a, emb) for a in arrays) == 1, name
        assert not any(a.shape == emb.T.shape and np.array_equal(a, emb.T) for a in arrays), name
        gemms = [n for n in g.node if n.op_type == "Gemm"]
        assert len(gemms) == 1 and {a.name: a.i for a in gemms[0].attribute}.get("transB") == 1, name
        assert len(gemms[0].input) == 3 and gemms[0].input[1] == "model.embedding.weight", name  # bias folded in
