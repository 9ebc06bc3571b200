"""Tests for rnnlm.export.triton: the Triton model repository written from a bundle.

There is no Triton server here, so the checks are the two things Triton itself would do with the
repository: parse config.pbtxt into its ModelConfig protobuf (tritonclient's generated classes,
which reject unknown fields), and run model.onnx the way the sequence batcher (direct strategy) and
the onnxruntime backend do, keeping each sequence's implicit state between requests. Its log-probs
are compared with the bundle's own runtime (rnnlm.serve) stepping each sequence alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.model_config_pb2 as mc
from bundles import Built, file_sha256, read_manifest, tree
from google.protobuf import text_format
from rnnlm.export import triton
from rnnlm.export.triton import write_triton_repository
from rnnlm.serve import BundleError, LanguageModel

from rnnlm.errors import RnnlmError

CELLS = ["lstm", "rhn", "hypernets"]  # state layouts: 2 layers x (h, c); 2 layers x (s); (h, c, hyper_h, hyper_c) 32/16
TRITON_TYPES = {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32}  # written out here, not read from triton.py
NUMPY = {mc.TYPE_INT64: np.int64, mc.TYPE_FP32: np.float32, mc.TYPE_INT32: np.int32}
Seq = mc.ModelSequenceBatching


def parse(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), mc.ModelConfig())


def request_shape(io: mc.ModelInput | mc.ModelOutput) -> list[int]:
    """The shape the model sees, batch axis excluded: ``reshape`` when given, else ``dims``."""
    return list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)


def manifest_dims(shape: list[str | int]) -> list[int]:
    assert isinstance(shape[0], str), "the leading axis is the batch"
    return [-1 if isinstance(d, str) else d for d in shape[1:]]


class TritonSim:
    """Triton's sequence batcher (direct strategy) in front of model.onnx, read from config.pbtxt only.

    ``step`` takes one entry per batch slot: (correlation id, token id, sequence start) or None for a
    slot Triton pads (READY false, garbage token and state). Implicit state: each sequence's
    ``output_name`` tensors are kept and fed back as ``input_name`` in its next request; a starting
    request gets ``initial_state`` (zeros), or, with ``uninitialised``, garbage (NaN), which is
    what Triton hands over when a config declares no initial state.
    """

    def __init__(self, model_dir: Path, *, uninitialised: bool = False) -> None:
        self.cfg = parse(model_dir)
        self.sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.uninitialised = uninitialised
        self.store: dict[int, dict[str, np.ndarray]] = {}

    def _initial(self, s: mc.ModelSequenceBatching.State) -> np.ndarray:
        (init,) = s.initial_state
        assert init.WhichOneof("state_data") == "zero_data" and init.zero_data
        if self.uninitialised:
            return np.full(list(s.dims), np.nan, NUMPY[s.data_type])
        return np.zeros(list(init.dims), NUMPY[init.data_type])

    def step(self, slots: list[tuple[int, int, bool] | None]) -> list[np.ndarray | None]:
        cfg, B = self.cfg, len(slots)
        assert cfg.max_batch_size >= B
        feed: dict[str, np.ndarray] = {}
        for io in cfg.input:  # the token: [B, *dims] on the wire, [B, *reshape] for the model
            wire = np.array([[10**6] if r is None else [r[1]] for r in slots], NUMPY[io.data_type])
            assert list(wire.shape[1:]) == list(io.dims)
            feed[io.name] = wire.reshape([B, *request_shape(io)])
        for c in cfg.sequence_batching.control_input:
            (ctl,) = c.control
            flag = {Seq.Control.CONTROL_SEQUENCE_START: [r is not None and r[2] for r in slots],
                    Seq.Control.CONTROL_SEQUENCE_READY: [r is not None for r in slots]}[ctl.kind]
            feed[c.name] = np.array([[ctl.int32_false_true[int(f)]] for f in flag], np.int32)
        for r in slots:
            if r is not None and r[2]:
                self.store[r[0]] = {s.input_name: self._initial(s) for s in cfg.sequence_batching.state}
        for s in cfg.sequence_batching.state:
            rows = [np.full(list(s.dims), np.nan, NUMPY[s.data_type]) if r is None else self.store[r[0]][s.input_name]
                    for r in slots]
            feed[s.input_name] = np.stack(rows)
        names = [o.name for o in self.sess.get_outputs()]
        out = dict(zip(names, self.sess.run(None, feed), strict=True))
        for b, r in enumerate(slots):
            if r is not None:
                self.store[r[0]] = {s.input_name: out[s.output_name][b] for s in cfg.sequence_batching.state}
        (logprobs,) = cfg.output
        return [None if r is None else out[logprobs.name][b] for b, r in enumerate(slots)]


@pytest.fixture(scope="module")
def repos(built: Callable[[str, bool], Built], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One repository holding a model of every cell (the LSTM with max_batch_size 4): cell -> model dir."""
    root = tmp_path_factory.mktemp("triton") / "repo"
    out = {}
    for cell in CELLS:
        kw = {"max_batch_size": 4} if cell == "lstm" else {}
        out[cell] = write_triton_repository(built(cell, False).bundle, root, **kw)
    return out


# ------------------------------------------------------------------------------- 1. the repository


@pytest.mark.parametrize("cell", CELLS)
def test_config_states_the_manifests_interface(built: Callable[[str, bool], Built], repos: dict[str, Path], cell: str) -> None:
    b, model_dir = built(cell, False), repos[cell]
    m = read_manifest(b.bundle)
    assert model_dir.name == f"rnnlm_{cell}" and model_dir.parent == repos["lstm"].parent
    assert sorted(tree(model_dir)) == ["1", "1/model.onnx", "config.pbtxt", "rnnlm-triton.json", "vocab.txt"]
    for p in (model_dir, *model_dir.rglob("*")):  # readable by a Triton running as another user
        assert p.stat().st_mode & 0o555 == (0o555 if p.is_dir() else 0o444), p
    cfg = parse(model_dir)
    assert cfg.name == model_dir.name and cfg.backend == "onnxruntime" and cfg.platform in ("", "onnxruntime_onnx")
    assert cfg.max_batch_size == (4 if cell == "lstm" else 8)

    # Request inputs and outputs: the manifest's step graph minus the state tensors.
    state_in = [s["input"] for s in m["state"]]
    state_out = [s["output"] for s in m["state"]]
    step = m["graphs"]["step"]
    for declared, actual in ((step["inputs"], cfg.input), (step["outputs"], cfg.output)):
        expected = [t for t in declared if t["name"] not in state_in + state_out]
        assert [io.name for io in actual] == [t["name"] for t in expected] != []
        for t, io in zip(expected, actual, strict=True):
            assert io.data_type == TRITON_TYPES[t["dtype"]], t["name"]
            assert request_shape(io) == manifest_dims(t["shape"]), t["name"]
            assert list(io.dims), f"{t['name']}: Triton refuses empty dims"
    assert [list(io.dims) for io in cfg.input] == [[1]]  # token_ids is [batch]: [batch, 1] on the wire
    (logprobs,) = cfg.output
    assert list(logprobs.dims) == [len(read_vocab(b.bundle))] and logprobs.label_filename == "vocab.txt"
    assert (model_dir / "vocab.txt").read_bytes() == (b.bundle / "vocab.txt").read_bytes()

    # Implicit state: one entry per manifest state, in order, zero-initialised, in neither I/O list.
    sb = cfg.sequence_batching
    assert [(s.input_name, s.output_name) for s in sb.state] == list(zip(state_in, state_out, strict=True))
    for s, ms in zip(sb.state, m["state"], strict=True):
        t = next(t for t in step["inputs"] if t["name"] == ms["input"])
        assert s.data_type == TRITON_TYPES[t["dtype"]] and list(s.dims) == [ms["size"]] == manifest_dims(t["shape"])
        (init,) = s.initial_state
        assert init.data_type == s.data_type and list(init.dims) == list(s.dims)
        assert init.WhichOneof("state_data") == "zero_data" and init.zero_data
    assert not {s.input_name for s in sb.state} & {io.name for io in cfg.input}
    assert not {s.output_name for s in sb.state} & {io.name for io in cfg.output}
    controls = {c.name: [(k.kind, list(k.int32_false_true)) for k in c.control] for c in sb.control_input}
    assert controls == {"START": [(Seq.Control.CONTROL_SEQUENCE_START, [0, 1])],
                        "READY": [(Seq.Control.CONTROL_SEQUENCE_READY, [0, 1])]}
    assert sb.WhichOneof("strategy_choice") == "direct"
    assert sb.max_sequence_idle_microseconds >= 10_000_000  # Triton's 1 s default would drop a pausing client

    # model.onnx: what the onnxruntime backend requires, its inputs being exactly the config's
    # inputs, state inputs and controls (it compares the counts and looks each name up).
    onnx.checker.check_model(onnx.load(str(model_dir / "1" / "model.onnx")), full_check=True)
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == [io.name for io in cfg.input] + state_in + [c.name for c in sb.control_input]
    assert [o.name for o in sess.get_outputs()] == [io.name for io in cfg.output] + state_out
    for c in sb.control_input:  # controls must be [batch, 1] of the declared type
        assert ins[c.name].type == "tensor(int32)" and len(ins[c.name].shape) == 2 and ins[c.name].shape[1] == 1
    outs = {o.name: o for o in sess.get_outputs()}
    for s in sb.state:
        assert ins[s.input_name].type == outs[s.output_name].type == "tensor(float)"
        assert ins[s.input_name].shape[1:] == outs[s.output_name].shape[1:] == list(s.dims)

    marker = json.loads((model_dir / "rnnlm-triton.json").read_text(encoding="utf-8"))
    assert marker["format"] == "rnnlm-triton" and marker["bundle_step_sha256"] == file_sha256(b.bundle / "step.onnx")
    for name, meta in marker["files"].items():
        assert meta == {"sha256": file_sha256(model_dir / name), "bytes": (model_dir / name).stat().st_size}, name


def read_vocab(bundle: Path) -> list[str]:
    return (bundle / "vocab.txt").read_text(encoding="utf-8").splitlines()


# ------------------------------------------------------------------------------- 2. served as Triton would


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("uninitialised", [False, True], ids=["initial-zeros", "start-resets-garbage"])
def test_sequences_through_implicit_state_match_the_bundle(built: Callable[[str, bool], Built], repos: dict[str, Path],
                                                           cell: str, uninitialised: bool) -> None:
    bundle = built(cell, False).bundle
    lm = LanguageModel.load(bundle, device="cpu", threads=1)
    texts = {1: "the stock market fell sharply", 2: "investors said", 3: "bank rates rose"}
    ids = {k: [lm.eos_id, *(lm.id(w) for w in t.split())] for k, t in texts.items()}
    sim = TritonSim(repos[cell], uninitialised=uninitialised)
    got: dict[int, list[np.ndarray]] = {k: [] for k in ids}

    # Two batch slots, as the direct strategy fills them: sequences 1 and 2 side by side, slot 1
    # padded once 2 has ended, then sequence 3 reusing that slot over the state 2 left behind.
    schedule: list[list[tuple[int, int] | None]] = [[(1, 0), (2, 0)], [(1, 1), (2, 1)], [(1, 2), (2, 2)], [(1, 3), None],
                                                    [(1, 4), (3, 0)], [(1, 5), (3, 1)], [None, (3, 2)], [None, (3, 3)]]
    for slots in schedule:
        reqs = [None if r is None else (r[0], ids[r[0]][r[1]], r[1] == 0) for r in slots]
        for r, lp in zip(slots, sim.step(reqs), strict=True):
            if r is not None:
                assert lp is not None
                got[r[0]].append(lp)
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in ids.items()}

    for k, seq in ids.items():
        # The bundle's step graph, through rnnlm.serve, one sequence at a time from its zero state.
        state = lm.initial_state()
        for t, tok in enumerate(seq):
            ref, state = lm.step_ids(state, np.array([tok]))
            np.testing.assert_allclose(got[k][t], ref[0], rtol=0, atol=1e-5, err_msg=f"sequence {k}, step {t}")
        # ... and the scoring graph: the served log-probs of each next token, <eos> last.
        picked = [float(got[k][t][tok]) for t, tok in enumerate([*seq[1:], lm.eos_id])]
        expected = [lp for _, lp, _ in lm.token_logprobs(texts[k])]
        np.testing.assert_allclose(picked, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------- 3. refusals and rewrites


def test_rewrites_its_own_repository_and_adds_models(built: Callable[[str, bool], Built], tmp_path: Path) -> None:
    repo = tmp_path / "a" / "repo"  # parents created
    first = write_triton_repository(built("lstm", False).bundle, repo)
    before = (first / "config.pbtxt").read_text(encoding="utf-8")
    again = write_triton_repository(built("lstm", False).bundle, repo, max_batch_size=2)  # no force needed
    assert again == first and parse(again).max_batch_size == 2 and before != (again / "config.pbtxt").read_text()
    write_triton_repository(built("rhn", False).bundle, repo, model_name="lm-rhn.v1")
    assert sorted(p.name for p in repo.iterdir()) == ["lm-rhn.v1", "rnnlm_lstm"]  # no temp or old leftovers
    assert parse(repo / "lm-rhn.v1").name == "lm-rhn.v1"


def test_refuses_a_foreign_directory_unless_forced(built: Callable[[str, bool], Built], tmp_path: Path) -> None:
    bundle = built("lstm", False).bundle
    repo = tmp_path / "repo"
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    (repo / "notes.txt").write_text("keep me\n")
    snapshot = tree(repo)
    with pytest.raises(RnnlmError, match=r"not empty and is not a Triton repository written by rnnlm.*--force") as e:
        write_triton_repository(bundle, repo)
    assert e.value.code == 2 and tree(repo) == snapshot

    # A model directory of the same name that rnnlm did not write is refused on its own account.
    (repo / "rnnlm_lstm").mkdir()
    (repo / "rnnlm_lstm" / "config.pbtxt").write_text('name: "rnnlm_lstm"\n')
    snapshot = tree(repo)
    with pytest.raises(RnnlmError, match=r"rnnlm_lstm exists and was not written by rnnlm.*--force"):
        write_triton_repository(bundle, repo)
    assert tree(repo) == snapshot

    # force replaces that model directory only; everything else stays.
    model_dir = write_triton_repository(bundle, repo, force=True)
    assert sorted(p.name for p in repo.iterdir()) == ["notes.txt", "other_model", "rnnlm_lstm"]
    assert (repo / "notes.txt").read_text() == "keep me\n" and parse(model_dir).backend == "onnxruntime"


@pytest.mark.parametrize(("kw", "match"), [
    ({"model_name": "../escape"}, "Triton model name"),
    ({"model_name": ""}, "Triton model name"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"max_sequence_idle_seconds": 0.0}, "max_sequence_idle_seconds"),
])
def test_refuses_bad_arguments_writing_nothing(built: Callable[[str, bool], Built], tmp_path: Path,
                                                kw: dict[str, object], match: str) -> None:
    with pytest.raises(RnnlmError, match=match):
        write_triton_repository(built("lstm", False).bundle, tmp_path / "repo", **kw)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "escape").exists()


def test_refuses_a_file_and_a_damaged_bundle(built: Callable[[str, bool], Built], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RnnlmError, match="is not a directory"):
        write_triton_repository(built("lstm", False).bundle, tmp_path / "file", force=True)
    damaged = tmp_path / "bundle"
    shutil.copytree(built("lstm", False).bundle, damaged)
    data = bytearray((damaged / "step.onnx").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        write_triton_repository(damaged, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# ------------------------------------------------------------------------------- 4. the write-time check


def _sabotage(op: str) -> Callable[[onnx.ModelProto, list], onnx.ModelProto]:
    """with_sequence_controls, then one of its safeguards undone: the check must notice."""
    real = triton.with_sequence_controls

    def broken(source: onnx.ModelProto, states: list) -> onnx.ModelProto:
        model = real(source, states)
        for node in model.graph.node:
            if op == "reset" and node.name.startswith("triton/reset/"):
                node.input[1] = node.input[2]  # START no longer zeroes the state
            if op == "mask" and node.name.startswith("triton/masked/") and node.op_type == "Where":
                node.input[2] = node.input[1]  # padding tokens reach the embedding
        return model

    return broken


@pytest.mark.parametrize(("op", "match"), [("reset", "differs from it by"), ("mask", "does not run in onnxruntime")])
def test_a_copy_that_computes_otherwise_is_not_written(built: Callable[[str, bool], Built], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, op: str, match: str) -> None:
    monkeypatch.setattr(triton, "with_sequence_controls", _sabotage(op))
    with pytest.raises(RnnlmError, match=match) as e:
        write_triton_repository(built("rhn", False).bundle, tmp_path / "repo")
    assert e.value.code == 1 and not (tmp_path / "repo").exists()
