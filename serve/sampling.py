"""Sampling from log-probabilities: temperature, top-k, top-p (nucleus), in numpy.

Temperature 0 means greedy: the argmax, with no randomness drawn. The order of filtering is
onnxruntime-genai's and Hugging Face's: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from rnnlm.errors import RnnlmError


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   vocab_size: int, num_samples: int = 1, cap: int, seed: int | None = None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise RnnlmError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise RnnlmError(f"top-k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RnnlmError(f"top-p must be in (0, 1], got {top_p}")
    if not 1 <= max_new_tokens <= cap:
        raise RnnlmError(f"max-tokens must be between 1 and {cap:,}, got {max_new_tokens}")
    if not 1 <= num_samples <= 1024:
        raise RnnlmError(f"num-samples must be between 1 and 1024, got {num_samples}")
    if seed is not None and not 0 <= seed < 2**64:
        raise RnnlmError(f"seed must be between 0 and 2**64 - 1, got {seed}")


def sample(logprobs: np.ndarray, rng: np.random.Generator, *, temperature: float, top_k: int | None = None,
           top_p: float | None = None) -> np.ndarray:
    """One token id per row of logprobs (B, V)."""
    if temperature == 0:
        return logprobs.argmax(axis=-1).astype(np.int64)
    # The max is taken out before dividing: with a tiny temperature the others overflow to -inf (their
    # probability, 0), never inf - inf = NaN. The limit is the greedy choice, as it should be.
    shifted = logprobs.astype(np.float64) - logprobs.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        logits = shifted / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


def sample_steps(logprobs: np.ndarray, step: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator, *,
                 eos_id: int, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                 stop_at_eos: bool, check: Callable[[], None]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The sampling loop: from ``logprobs`` (samples, vocab), draw each sample's next id, yield (ids,
    logprobs), and ``step`` the ids to the next log-probabilities, up to ``max_new_tokens`` times. A
    sample that drew ``eos_id`` keeps yielding it; with ``stop_at_eos`` the loop ends once all have.
    ``check`` runs before each step (it raises to stop: a cancelled request)."""
    done = np.zeros(logprobs.shape[0], bool)
    for _ in range(max_new_tokens):
        nxt = np.where(done, eos_id, sample(logprobs, rng, temperature=temperature, top_k=top_k, top_p=top_p))
        yield nxt, logprobs
        if stop_at_eos:
            done |= nxt == eos_id
            if done.all():
                return
        check()
        logprobs = step(nxt)


def cut_samples(columns: Sequence[np.ndarray], num_samples: int, eos_id: int | None) -> list[list[int]]:
    """Each sample's token ids from the loop's columns (one (samples,) array per step), cut before its
    first ``eos_id`` (None: not cut)."""
    out = []
    for b in range(num_samples):
        ids = [int(c[b]) for c in columns]
        if eos_id is not None and eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        out.append(ids)
    return out
