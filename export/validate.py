"""Validation of exported graphs against eval-mode PyTorch, before a bundle is written.

onnx's full checker first; then the step graph and the scoring graph in onnxruntime against
the torch model at batch sizes 1 and 3 and lengths 1, 7 and 64 (the scoring graph also with
samples of different lengths in one batch), comparing log-probabilities and states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from rnnlm.export.spec import GraphSpec, StateSpec

from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel, flatten_state

TOLERANCE = 1e-4  # max |Δ| of natural-log probabilities; of states, relative to max(1, |value|)
BATCHES, LENGTHS = (1, 3), (1, 7, 64)
ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}


class ValidationError(RnnlmError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code=1)


@dataclass
class Report:
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_logprob_diff(self) -> float:
        return max((c["logprobs"] for c in self.cases), default=0.0)

    @property
    def max_state_diff(self) -> float:
        return max((c["state"] for c in self.cases), default=0.0)

    def failures(self, tol: float) -> list[dict[str, Any]]:
        return [c for c in self.cases if c["logprobs"] > tol or c["state"] > tol]


def session(path: Path | str, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_graph(path: Path, spec: GraphSpec) -> None:
    """onnx's full checker, then names, dtypes and ranks against the specification."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ValidationError(f"{path.name}: onnx checker failed: {e}") from None
    for kind, declared, actual in (("input", spec.inputs, model.graph.input), ("output", spec.outputs, model.graph.output)):
        names = [v.name for v in actual]
        if names != [t.name for t in declared]:
            raise ValidationError(f"{path.name}: {kind}s {names} differ from the specification {[t.name for t in declared]}")
        for t, v in zip(declared, actual, strict=True):
            dims = v.type.tensor_type.shape.dim
            if v.type.tensor_type.elem_type != ONNX_DTYPES[t.dtype] or len(dims) != len(t.shape):
                raise ValidationError(f"{path.name}: {kind} {t.name} is not {t.dtype} of rank {len(t.shape)}")


def state_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """|Δ| / max(1, |ref|): an LSTM memory cell may grow well beyond 1, and float32 keeps ~7 digits."""
    return float((np.abs(a - ref) / np.maximum(1.0, np.abs(ref))).max())


def zero_state(states: list[StateSpec], batch: int) -> dict[str, np.ndarray]:
    return {s.input: np.zeros((batch, s.size), np.float32) for s in states}


def run_step(sess: ort.InferenceSession, states: list[StateSpec], tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """tokens (L, B) through the step graph from a zero state: all logprobs (L, B, V), final state."""
    state = zero_state(states, tokens.shape[1])
    out = []
    for t in range(tokens.shape[0]):
        logprobs, *new = sess.run(None, {"token_ids": tokens[t], **state})
        out.append(logprobs)
        state = {s.input: v for s, v in zip(states, new, strict=True)}
    return np.stack(out), state


def run_score(
    sess: ort.InferenceSession, states: list[StateSpec], chunk: int, tokens: np.ndarray, targets: np.ndarray,
    lengths: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sequences of different lengths (columns of tokens/targets (L, B)) in chunks of the scoring graph."""
    L, B = tokens.shape
    state = zero_state(states, B)
    out = np.zeros((L, B), np.float32)
    for start in range(0, max(L, 1), chunk):
        n = np.clip(lengths - start, 0, chunk).astype(np.int64)
        x = np.zeros((chunk, B), np.int64)
        y = np.zeros((chunk, B), np.int64)
        x[: min(chunk, L - start)] = tokens[start : start + chunk]
        y[: min(chunk, L - start)] = targets[start : start + chunk]
        picked, *new = sess.run(None, {"token_ids": x, "targets": y, "lengths": n, **state})
        out[start : start + chunk] = picked[: min(chunk, L - start)]
        state = {s.input: v for s, v in zip(states, new, strict=True)}
    return out, state


@torch.no_grad()
def torch_reference(model: LanguageModel, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eval-mode log-probabilities (L, B, V) and the flattened final state."""
    x = torch.from_numpy(tokens)
    logits, state = model(x, model.init_state(tokens.shape[1]))
    return F.log_softmax(logits.double(), dim=-1).float().numpy(), [t.numpy() for t in flatten_state(state)]


def validate(
    model: LanguageModel, step_path: Path, score_path: Path, step_spec: GraphSpec, score_spec: GraphSpec,
    states: list[StateSpec], chunk: int, tol: float = TOLERANCE, seed: int = 0,
) -> Report:
    """Raise ValidationError (listing every failing case) unless onnxruntime agrees with torch."""
    model.eval()
    check_graph(step_path, step_spec)
    check_graph(score_path, score_spec)
    step_sess, score_sess = session(step_path), session(score_path)
    rng = np.random.default_rng(seed)
    V = model.cfg.vocab_size
    report = Report()
    for batch in BATCHES:
        for length in LENGTHS:
            seq = rng.integers(0, V, size=(length + 1, batch), dtype=np.int64)
            tokens, targets = seq[:-1], seq[1:]
            ref_lp, ref_state = torch_reference(model, tokens)
            lp, st = run_step(step_sess, states, tokens)
            report.cases.append({"graph": "step", "batch": batch, "length": length,
                                 "logprobs": float(np.abs(lp - ref_lp).max()),
                                 "state": max(state_diff(st[s.input], r) for s, r in zip(states, ref_state, strict=True))})
            ref_picked = np.take_along_axis(ref_lp, targets[..., None], axis=-1)[..., 0]
            picked, st = run_score(score_sess, states, chunk, tokens, targets, np.full(batch, length, np.int64))
            report.cases.append({"graph": "score", "batch": batch, "length": length,
                                 "logprobs": float(np.abs(picked - ref_picked).max()),
                                 "state": max(state_diff(st[s.input], r) for s, r in zip(states, ref_state, strict=True))})
        # Different lengths in one call: each sample must equal the same sequence run alone.
        lengths = np.array([LENGTHS[-1], LENGTHS[1], LENGTHS[0]][:batch], np.int64)
        seq = rng.integers(0, V, size=(int(lengths.max()) + 1, batch), dtype=np.int64)
        picked, st = run_score(score_sess, states, chunk, seq[:-1], seq[1:], lengths)
        lp_diff, st_diff = 0.0, 0.0
        for b, n in enumerate(lengths):
            ref_lp, ref_state = torch_reference(model, seq[:n, b : b + 1])
            ref_picked = np.take_along_axis(ref_lp, seq[1 : n + 1, b : b + 1, None], axis=-1)[..., 0]
            lp_diff = max(lp_diff, float(np.abs(picked[:n, b : b + 1] - ref_picked).max()))
            st_diff = max(st_diff, max(state_diff(st[s.input][b], r[0]) for s, r in zip(states, ref_state, strict=True)))
        report.cases.append({"graph": "score", "batch": batch, "length": "mixed " + "/".join(map(str, lengths)),
                             "logprobs": lp_diff, "state": st_diff})
    bad = report.failures(tol)
    if bad:
        rows = "; ".join(f"{c['graph']} batch {c['batch']} length {c['length']}: |Δlogp| {c['logprobs']:.2e}, "
                         f"|Δstate| {c['state']:.2e}" for c in bad)
        raise ValidationError(f"onnxruntime disagrees with PyTorch beyond {tol:g}: {rows}")
    return report
