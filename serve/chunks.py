"""The one chunk driver over the chunked graphs (scoring and advance): a batch of sequences of any
lengths through graph calls of at most ``chunk`` steps, the state carried from call to call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from rnnlm.serve.values import Cancelled


def run_chunks(sess: ort.InferenceSession, states: list[dict[str, Any]], C: int, fixed: bool, inputs: np.ndarray,
               targets: np.ndarray | None, lengths: np.ndarray, arrays: dict[str, np.ndarray],
               cancelled: Callable[[], bool] | None) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """(L, B) inputs (and targets, for the scoring graph), per-column lengths and the state's
    ``arrays`` -> target log-probabilities (L, B) (None without targets) and the final state's arrays.

    A call gets at most ``C`` steps: as many as its longest column needs, or exactly ``C`` (padded)
    when the graph is ``fixed``. A chunk after the first gets only the columns that have not ended
    yet (a batch of sentences where a few are long pays for the long ones alone); the others keep
    their final state."""
    L, B = inputs.shape
    out = np.zeros((L, B), np.float32) if targets is not None else None
    for start in range(0, max(L, 1), C):
        if cancelled is not None and cancelled():
            raise Cancelled("the request was cancelled")
        cols = np.flatnonzero(lengths > start) if start else np.arange(B)
        if len(cols) == 0:
            break
        every = len(cols) == B
        n = min(C, L - start)
        rows = C if fixed else n
        feed = {"token_ids": window(inputs, start, n, rows, None if every else cols),
                "lengths": np.clip(lengths[cols] - start, 0, C).astype(np.int64),
                **(arrays if every else {k: v[cols] for k, v in arrays.items()})}
        if targets is not None:
            feed["targets"] = window(targets, start, n, rows, None if every else cols)
        results = sess.run(None, feed)
        new = results[1:] if out is not None else results
        if out is not None:
            out[start : start + n, cols] = results[0][:n]
        if every:
            arrays = {s["input"]: v for s, v in zip(states, new, strict=True)}
        else:
            arrays = dict(arrays)
            for s, v in zip(states, new, strict=True):
                arrays[s["input"]] = arrays[s["input"]].copy()
                arrays[s["input"]][cols] = v
    return out, arrays


def window(a: np.ndarray, start: int, n: int, rows: int, cols: np.ndarray | None) -> np.ndarray:
    """Rows start..start+n of ``a`` (L, B) (of columns ``cols``; all when None), zero-padded to ``rows`` rows."""
    x = np.zeros((rows, a.shape[1] if cols is None else len(cols)), np.int64)
    x[:n] = a[start : start + n] if cols is None else a[start : start + n, cols]
    return x


def padded(sequences: Sequence[Sequence[int]], idx: Sequence[int], eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, B) inputs (``<eos>`` then each sequence but its last id), targets and lengths of the
    sequences ``idx``: column b is sequence ``idx[b]``."""
    lengths = np.array([len(sequences[i]) for i in idx], np.int64)
    L = max(int(lengths.max()), 1)
    inputs = np.full((L, len(idx)), eos_id, np.int64)
    targets = np.zeros((L, len(idx)), np.int64)
    for b, i in enumerate(idx):
        ids = sequences[i]
        targets[: len(ids), b] = ids
        inputs[1 : len(ids), b] = ids[:-1]
    return inputs, targets, lengths
