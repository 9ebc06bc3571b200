"""The runtime's values: a recurrent state, a context (a state and its last token) that can be
forked, exported and imported, and a scoring result with its units (natural-log probabilities;
nll in nats; ppl = exp(nll / tokens); bpc = nll / (tokens · ln 2))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnlm.errors import RnnlmError


class Cancelled(RnnlmError):
    """Work stopped because its caller gave up on it (a timeout, a closed connection)."""


@dataclass
class State:
    """The recurrent state of ``batch`` sequences: one float32 array (batch, size) per state input.

    Opaque to callers; pass it back to ``step``. ``copy()`` (or ``fork()``) to branch a sequence."""

    arrays: dict[str, np.ndarray]

    @property
    def batch(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def copy(self) -> State:
        return State({k: v.copy() for k, v in self.arrays.items()})

    fork = copy

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.arrays.values())

    def repeat(self, n: int) -> State:
        """A batch-1 state copied into ``n`` rows (``n`` samples that share a prompt)."""
        return State({k: np.repeat(v, n, axis=0) for k, v in self.arrays.items()})

    def to_bytes(self) -> bytes:
        """The arrays as little-endian float32, one after the other in the manifest's order."""
        return b"".join(np.ascontiguousarray(v, "<f4").tobytes() for v in self.arrays.values())


class StateError(RnnlmError):
    """An exported state that this model cannot take: another bundle's, altered, truncated, not finite."""


@dataclass
class Context:
    """Where a text stands: the recurrent state after every token but the last, and that last token
    (``last``), which the next call feeds first, as ``score_tokens`` carries a text across blocks.
    So text scored in any number of pieces gets exactly the log-probabilities of the whole.

    A new context is ``lm.context()`` (nothing read: the state is zero and ``last`` is ``<eos>``,
    so the first token is predicted from ``<eos>``, as in ``rnnlm score``). ``tokens`` counts what
    it has read. ``fork()`` branches it; ``lm.export_context`` / ``lm.import_context`` carry it
    elsewhere (another process or server with the same bundle)."""

    state: State
    last: int
    tokens: int = 0

    def fork(self) -> Context:
        return Context(self.state.copy(), self.last, self.tokens)


@dataclass
class ScoreResult:
    tokens: int  # scored tokens, <eos> included
    oov: int  # of them, out of vocabulary (scored as <unk>)
    nll: float  # nats, summed over all tokens
    nll_in_vocab: float  # nats, summed over in-vocabulary tokens
    level: str = "word"
    per_token: list[tuple[str, float, bool]] | None = field(default=None, repr=False)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def ppl_in_vocab(self) -> float:
        n = self.tokens - self.oov
        return math.exp(self.nll_in_vocab / n) if n else float("nan")

    @property
    def bpc(self) -> float:
        return self.nll / (self.tokens * math.log(2)) if self.tokens else float("nan")

    def plus(self, other: ScoreResult) -> ScoreResult:
        """The total of both texts scored one after the other: counts and nats add up (per-token
        lists are not carried). The one place totals are formed."""
        return ScoreResult(self.tokens + other.tokens, self.oov + other.oov, self.nll + other.nll,
                           self.nll_in_vocab + other.nll_in_vocab, self.level)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tokens": self.tokens, "oov": self.oov, "nll": self.nll, "ppl": self.ppl,
                             "ppl_excluding_oov": self.ppl_in_vocab}
        if self.level == "char":
            d["bpc"] = self.bpc
        return d
