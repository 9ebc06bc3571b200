"""Tests for rnnlm.export: bundles of every cell, graphs against each other and against PyTorch,
refusals that leave nothing behind (quantization: tests/test_quantize.py).

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
    BUNDLE_FILES,
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
from rnnlm.export.validate import ValidationError
from typer.testing import CliRunner

from rnnlm.checkpoint import load_model_dir
from rnnlm.cli import app
from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel, flatten_state

CELL_LN = [pytest.param(c, ln, id=f"{c}-{'ln' if ln else 'plain'}") for c, ln in VARIANTS]
V = len(TOKENS)
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
