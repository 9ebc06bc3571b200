"""Validation of a staged bundle against eval-mode PyTorch, before it is written.

onnx's full checker on each graph; then the bundle is loaded by the runtime that ships it
(``rnnlm.serve.runtime.LanguageModel``: its graph-I/O check against the manifest, its chunked
scoring driver, its step API), and the step graph and the scoring graph are compared with the
torch model at batch sizes 1 and 3 and lengths 1, 7 and 64 (the scoring graph also with samples
of different lengths in one batch): log-probabilities and states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel, flatten_state

if TYPE_CHECKING:
    from rnnlm.serve.runtime import LanguageModel as Runtime

TOLERANCE = 1e-4  # max |Δ| of natural-log probabilities; of states, relative to max(1, |value|)
BATCHES, LENGTHS = (1, 3), (1, 7, 64)


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

    def failures(self, tol: float, state_tol: float | None = None) -> list[dict[str, Any]]:
        st = tol if state_tol is None else state_tol
        return [c for c in self.cases if c["logprobs"] > tol or c["state"] > st]


def load_staged(directory: Path) -> Runtime:
    """The bundle staged in ``directory``, loaded by the runtime that ships it (on the CPU)."""
    from rnnlm.serve.bundle import Bundle
    from rnnlm.serve.runtime import LanguageModel as Runtime

    return Runtime(Bundle.open(directory), device="cpu")


def check_graph(path: Path) -> None:
    """onnx's full checker (the graphs' names, dtypes and ranks are the runtime's check, on load)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ValidationError(f"{path.name}: onnx checker failed: {str(e).splitlines()[0][:300]}") from None


def state_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """|Δ| / max(1, |ref|): an LSTM memory cell may grow well beyond 1, and float32 keeps ~7 digits."""
    return float((np.abs(a - ref) / np.maximum(1.0, np.abs(ref))).max())


def run_step(lm: Runtime, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """tokens (L, B) through the runtime's step API from a fresh state: all logprobs (L, B, V), final state."""
    state = lm.initial_state(tokens.shape[1])
    out = []
    for t in range(tokens.shape[0]):
        logprobs, state = lm.step_ids(state, tokens[t])
        out.append(logprobs)
    return np.stack(out), state.arrays


def run_score(lm: Runtime, tokens: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns of tokens/targets (L, B) of different lengths through the runtime's scoring driver."""
    picked, state = lm._score_ids(tokens, targets, np.asarray(lengths, np.int64))
    return picked, state.arrays


@torch.no_grad()
def torch_reference(model: LanguageModel, tokens: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Eval-mode log-probabilities (L, B, V) and the flattened final state."""
    x = torch.from_numpy(tokens)
    logits, state = model(x, model.init_state(tokens.shape[1]))
    return F.log_softmax(logits.double(), dim=-1).float().numpy(), [t.numpy() for t in flatten_state(state)]


def _compare(lm: Runtime, model: LanguageModel, rng: np.random.Generator, batch: int, length: int) -> list[dict[str, Any]]:
    seq = rng.integers(0, model.cfg.vocab_size, size=(length + 1, batch), dtype=np.int64)
    tokens, targets = seq[:-1], seq[1:]
    ref_lp, ref_state = torch_reference(model, tokens)
    names = [s["input"] for s in lm.states]
    lp, st = run_step(lm, tokens)
    step = {"graph": "step", "batch": batch, "length": length, "logprobs": float(np.abs(lp - ref_lp).max()),
            "state": max(state_diff(st[n], r) for n, r in zip(names, ref_state, strict=True))}
    ref_picked = np.take_along_axis(ref_lp, targets[..., None], axis=-1)[..., 0]
    picked, st = run_score(lm, tokens, targets, np.full(batch, length, np.int64))
    score = {"graph": "score", "batch": batch, "length": length, "logprobs": float(np.abs(picked - ref_picked).max()),
             "state": max(state_diff(st[n], r) for n, r in zip(names, ref_state, strict=True))}
    return [step, score]


def _compare_mixed(lm: Runtime, model: LanguageModel, rng: np.random.Generator, batch: int) -> dict[str, Any]:
    """Different lengths in one call: each sample must equal the same sequence run alone in torch."""
    lengths = np.array([LENGTHS[-1], LENGTHS[1], LENGTHS[0]][:batch], np.int64)
    seq = rng.integers(0, model.cfg.vocab_size, size=(int(lengths.max()) + 1, batch), dtype=np.int64)
    picked, st = run_score(lm, seq[:-1], seq[1:], lengths)
    names = [s["input"] for s in lm.states]
    lp_diff, st_diff = 0.0, 0.0
    for b, n in enumerate(lengths):
        ref_lp, ref_state = torch_reference(model, seq[:n, b : b + 1])
        ref_picked = np.take_along_axis(ref_lp, seq[1 : n + 1, b : b + 1, None], axis=-1)[..., 0]
        lp_diff = max(lp_diff, float(np.abs(picked[:n, b : b + 1] - ref_picked).max()))
        st_diff = max(st_diff, max(state_diff(st[k][b], r[0]) for k, r in zip(names, ref_state, strict=True)))
    return {"graph": "score", "batch": batch, "length": "mixed " + "/".join(map(str, lengths)),
            "logprobs": lp_diff, "state": st_diff}


def validate(model: LanguageModel, lm: Runtime, tol: float = TOLERANCE, seed: int = 0, *,
             state_tol: float | None = None, what: str = "onnxruntime") -> Report:
    """Raise ValidationError (listing every failing case) unless the bundle ``lm`` agrees with torch."""
    model.eval()
    for key in ("step", "score"):
        check_graph(lm.bundle.file(key))
    rng = np.random.default_rng(seed)
    report = Report()
    for batch in BATCHES:
        for length in LENGTHS:
            report.cases.extend(_compare(lm, model, rng, batch, length))
        report.cases.append(_compare_mixed(lm, model, rng, batch))
    bad = report.failures(tol, state_tol)
    if bad:
        rows = "; ".join(f"{c['graph']} batch {c['batch']} length {c['length']}: |Δlogp| {c['logprobs']:.2e}, "
                         f"|Δstate| {c['state']:.2e}" for c in bad)
        limit = f"{tol:g}" if state_tol is None else f"{tol:g} (states {state_tol:g})"
        raise ValidationError(f"{what} disagrees with PyTorch beyond {limit}: {rows}")
    return report


def _advance_case(lm: Runtime, model: LanguageModel, rng: np.random.Generator, lengths: list[int]) -> dict[str, Any]:
    """Columns of the given lengths read at once by the advance driver: each column's state must equal
    eval-mode PyTorch's after the same tokens read alone."""
    seq = rng.integers(0, model.cfg.vocab_size, size=(max(lengths), len(lengths)), dtype=np.int64)
    got = lm._advance_ids(seq, np.asarray(lengths, np.int64)).arrays
    names = [s["input"] for s in lm.states]
    diff = 0.0
    for b, n in enumerate(lengths):
        _, ref_state = torch_reference(model, seq[:n, b : b + 1])
        diff = max(diff, max(state_diff(got[k][b], r[0]) for k, r in zip(names, ref_state, strict=True)))
    return {"graph": "advance", "batch": len(lengths), "length": "/".join(map(str, lengths)), "logprobs": 0.0,
            "state": diff}


def validate_advance(model: LanguageModel, lm: Runtime, tol: float = TOLERANCE, seed: int = 0) -> Report:
    """Raise ValidationError unless the advance graph's state after N tokens equals PyTorch's, at
    lengths around its chunk C (1, C-1, C, C+1, 2C+3), batch 1, and in one batch of different lengths."""
    model.eval()
    check_graph(lm.bundle.file("advance"))
    C = lm.advance_chunk
    lengths = sorted({1, max(C - 1, 1), C, C + 1, 2 * C + 3})
    rng = np.random.default_rng(seed)
    report = Report([_advance_case(lm, model, rng, [n]) for n in lengths])
    report.cases.append(_advance_case(lm, model, rng, lengths[::-1]))
    bad = report.failures(tol)
    if bad:
        rows = "; ".join(f"lengths {c['length']}: |Δstate| {c['state']:.2e}" for c in bad)
        raise ValidationError(f"the advance graph disagrees with PyTorch beyond {tol:g}: {rows}")
    return report
