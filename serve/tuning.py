"""Tuning the combination weights against reference transcripts: a grid over lm-weight,
word-penalty and λ, each point scored by the corpus word error rate of the hypotheses it picks.

WER = (substitutions + deletions + insertions of the picked hypotheses) / reference words, summed
over the corpus (what Kaldi's compute-wer and jiwer report). Each hypothesis' word errors against
its reference are counted once while streaming; a grid point then needs only arithmetic.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np
from rnnlm.serve.nbest import NbestError
from rnnlm.serve.rescore import ScoredUtterance, Weights

from rnnlm.errors import RnnlmError


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance between two word sequences (unit costs), one numpy row at a time.

    Within a row, d[j] = min(up[j] + 1, diag[j], d[j-1] + 1) has a running dependency; written as
    d[j] = j + min_{k<=j}(c[k] - k) for the row's candidates c, it is a cumulative minimum."""
    if not ref or not hyp:
        return max(len(ref), len(hyp))
    vocab: dict[str, int] = {}
    r = np.array([vocab.setdefault(w, len(vocab)) for w in ref])
    h = np.array([vocab.setdefault(w, len(vocab)) for w in hyp])
    j = np.arange(len(h) + 1)
    row = j.copy()
    for i, w in enumerate(r, 1):
        cand = np.empty(len(h) + 1, np.int64)
        cand[0] = i
        cand[1:] = np.minimum(row[1:] + 1, row[:-1] + (h != w))
        row = j + np.minimum.accumulate(cand - j)
    return int(row[-1])


def parse_range(text: str, what: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included) or a comma-separated list of values."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            values = [start + k * step for k in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(x) for x in text.split(",")]
    except ValueError:
        raise RnnlmError(f"{what} must be START:STOP:STEP (STEP > 0) or a list a,b,c; got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise RnnlmError(f"{what}: every value must be a finite number; got {text!r}")
    return [round(v, 10) for v in values]


@dataclass
class GridPoint:
    lm_weight: float
    word_penalty: float
    interpolate: float | None
    errors: int
    wer: float


class Collector:
    """What the grid search needs of every hypothesis, as compact arrays (five numbers each)."""

    def __init__(self, refs: dict[str, str], weights: Weights) -> None:
        self.refs, self.weights = refs, weights
        self.fixed, self.rnn, self.ngram, self.words = array("d"), array("d"), array("d"), array("d")
        self.errors = array("l")
        self.counts = array("l")  # hypotheses per utterance
        self.ref_words = 0
        self.seen: set[str] = set()

    def add(self, utt: ScoredUtterance) -> None:
        if utt.id not in self.refs:
            raise NbestError(f"utterance {utt.id!r} has no reference transcript in --ref")
        self.seen.add(utt.id)
        ref = self.refs[utt.id].split()
        self.ref_words += len(ref)
        self.counts.append(len(utt.hyps))
        for s in utt.hyps:
            self.fixed.append(self.weights.fixed(s.hyp))
            self.rnn.append(s.cost)
            self.ngram.append(self.weights.ngram_cost(s.hyp))
            self.words.append(s.hyp.word_count)
            self.errors.append(word_errors(ref, s.hyp.words))

    def check(self) -> None:
        unused = sorted(set(self.refs) - self.seen)
        if unused:
            shown = ", ".join(repr(u) for u in unused[:5])
            raise NbestError(f"--ref has {len(unused)} utterance(s) not in the n-best list: {shown}"
                             + (" ..." if len(unused) > 5 else ""))
        if self.ref_words == 0:
            raise NbestError("--ref: the reference transcripts have no words; WER is undefined")


def picked_errors(totals: np.ndarray, errors: np.ndarray, counts: np.ndarray) -> int:
    """Word errors of the lowest-total hypothesis of each utterance (the first one on a tie)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mins = np.minimum.reduceat(totals, starts)
    utt_of = np.repeat(np.arange(len(counts)), counts)
    first = np.flatnonzero(totals == mins[utt_of])
    _, at = np.unique(utt_of[first], return_index=True)
    return int(errors[first[at]].sum())


def grid_search(c: Collector, lm_weights: list[float], penalties: list[float],
                lambdas: list[float] | None) -> list[GridPoint]:
    """The WER at every point of the grid (λ only when interpolating), in grid order."""
    fixed, rnn, ngram = np.asarray(c.fixed), np.asarray(c.rnn), np.asarray(c.ngram)
    words, errors, counts = np.asarray(c.words), np.asarray(c.errors), np.asarray(c.counts)
    points = []
    for lam in lambdas if lambdas is not None else [None]:
        lm = rnn if lam is None else lam * rnn + (1.0 - lam) * ngram
        for lw in lm_weights:
            for wp in penalties:
                e = picked_errors(fixed + lw * lm + wp * words, errors, counts)
                points.append(GridPoint(lw, wp, lam, e, e / c.ref_words))
    return points


def best_point(points: list[GridPoint]) -> GridPoint:
    """The lowest WER; on a tie, the first in grid order."""
    return min(points, key=lambda p: p.wer)
