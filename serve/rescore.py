"""N-best rescoring with the recurrent LM: every hypothesis scored through the runtime's batched
path, combined with the scores the recognizer gave it, the best one picked per utterance.

Units: every score here is a cost in nats (−ln P; lower is better). A hypothesis' rnnlm cost is
−ln P(w1 ... wn <eos>), the first word predicted from the ``<eos>`` state, as ``rnnlm score
--per-line`` scores a line. The combined score is

    total = Σ_i w_i · score_i + lm_weight · lm + word_penalty · words
    lm    = rnnlm cost,  or with --interpolate λ:  λ · rnnlm cost + (1 − λ) · ngram cost

where the n-gram cost is one of the given scores (``--ngram-score``, default ``lm``), which then
takes no part in the sum. The best hypothesis has the lowest total (the first one on a tie).

Context across utterances (``carry``): ``never`` starts every utterance from the ``<eos>`` state;
``always`` starts it from the state the previous utterance's best hypothesis ended in (after its
``<eos>``), as one stream; ``speaker`` does that within each speaker (a Kaldi ``utt2spk``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from rnnlm.serve.nbest import Hypothesis, NbestError, Utterance
from rnnlm.serve.runtime import LanguageModel, State

from rnnlm.errors import RnnlmError
from rnnlm.text import Token

CARRY_MODES = ("never", "always", "speaker")
BATCH_HYPOTHESES = 4096  # hypotheses gathered (from several utterances) into one call of the scorer


@dataclass(frozen=True)
class Weights:
    """How the scores of a hypothesis combine into its total (see the module docstring)."""

    scores: dict[str, float] = field(default_factory=dict)  # w_i by score name; a score not named has 1
    lm_weight: float = 1.0
    word_penalty: float = 0.0
    interpolate: float | None = None  # λ, the rnnlm's share of the interpolated LM cost
    ngram: str = "lm"  # the score that λ interpolates with

    def check(self) -> Weights:
        """Refuse a weight that is not a finite number, and a λ outside [0, 1]."""
        named = {"--lm-weight": self.lm_weight, "--word-penalty": self.word_penalty,
                 **{f"--weight {k}": v for k, v in self.scores.items()}}
        if self.interpolate is not None:
            named["--interpolate"] = self.interpolate
        for name, value in named.items():
            if not math.isfinite(value):
                raise RnnlmError(f"{name} is {value}; weights must be finite numbers")
        if self.interpolate is not None and not 0.0 <= self.interpolate <= 1.0:
            raise RnnlmError(f"--interpolate must be in [0, 1], not {self.interpolate}")
        return self

    def fixed(self, hyp: Hypothesis) -> float:
        """Σ_i w_i · score_i over the given scores, the interpolated n-gram score left out."""
        return sum(self.scores.get(name, 1.0) * value for name, value in hyp.scores.items()
                   if self.interpolate is None or name != self.ngram)

    def ngram_cost(self, hyp: Hypothesis) -> float:
        if self.interpolate is None:
            return 0.0
        if self.ngram not in hyp.scores:
            raise NbestError(f"{hyp.where}: --interpolate needs the n-gram score {self.ngram!r} "
                             f"(given: {', '.join(sorted(hyp.scores)) or 'none'}); name it with --ngram-score")
        return hyp.scores[self.ngram]

    def lm_cost(self, rnn: float, ngram: float) -> float:
        return rnn if self.interpolate is None else self.interpolate * rnn + (1.0 - self.interpolate) * ngram

    def total(self, hyp: Hypothesis, rnn: float) -> float:
        return (self.fixed(hyp) + self.lm_weight * self.lm_cost(rnn, self.ngram_cost(hyp))
                + self.word_penalty * hyp.word_count)


@dataclass
class Scored:
    hyp: Hypothesis
    cost: float  # rnnlm cost, nats, <eos> included
    tokens: int  # scored tokens, <eos> included
    oov: int
    total: float


@dataclass
class ScoredUtterance:
    id: str
    hyps: list[Scored]
    best: int  # index into hyps

    @property
    def best_hyp(self) -> Scored:
        return self.hyps[self.best]


def chain_of(utt: Utterance, carry: str, utt2spk: dict[str, str] | None) -> str | None:
    """Which context chain an utterance continues: none, the one stream, or its speaker's."""
    if carry == "never":
        return None
    if carry == "always":
        return ""
    if utt2spk is None:
        raise RnnlmError("--carry-over speaker needs --utt2spk FILE")
    if utt.id not in utt2spk:
        raise NbestError(f"{utt.where}: utterance {utt.id!r} is not in the utt2spk file")
    return utt2spk[utt.id]


def batches(utterances: Iterable[Utterance], chain: Callable[[Utterance], str | None],
            limit: int = BATCH_HYPOTHESES) -> Iterator[list[Utterance]]:
    """Consecutive utterances gathered until they hold ``limit`` hypotheses; an utterance that
    continues a chain already in the batch waits for the next one (it needs that one's best state)."""
    batch: list[Utterance] = []
    chains: set[str] = set()
    size = 0
    for utt in utterances:
        if not utt.hyps:
            raise NbestError(f"{utt.where}: utterance {utt.id!r} has 0 hypotheses")
        key = chain(utt)
        if batch and (size >= limit or (key is not None and key in chains)):
            yield batch
            batch, chains, size = [], set(), 0
        batch.append(utt)
        size += len(utt.hyps)
        if key is not None:
            chains.add(key)
    if batch:
        yield batch


class Rescorer:
    """Scores n-best lists with ``lm`` and picks each utterance's best hypothesis by ``weights``."""

    def __init__(self, lm: LanguageModel, weights: Weights, *, carry: str = "never",
                 utt2spk: dict[str, str] | None = None, batch_size: int = 128,
                 batch_hypotheses: int = BATCH_HYPOTHESES) -> None:
        if carry not in CARRY_MODES:
            raise RnnlmError(f"--carry-over must be never, always or speaker, not {carry!r}")
        if batch_size < 1 or batch_hypotheses < 1:
            raise RnnlmError(f"--batch-size must be >= 1, got {batch_size}")
        self.lm, self.weights, self.carry, self.utt2spk = lm, weights.check(), carry, utt2spk
        self.batch_size, self.batch_hypotheses = batch_size, batch_hypotheses
        self.carried: dict[str, State] = {}  # chain -> the state its last best hypothesis ended in

    def tokens(self, hyp: Hypothesis) -> list[Token]:
        """The hypothesis as the model scores it: its words, then ``<eos>`` (an empty one is ``<eos>`` alone)."""
        eos = Token(self.lm.tokenizer.eos, self.lm.eos_id, False)
        return [*self.lm.tokenizer.line_tokens(hyp.text, eos=False), eos]

    def run(self, utterances: Iterable[Utterance], progress: Callable[[int], None] | None = None
            ) -> Iterator[ScoredUtterance]:
        """Rescored utterances, in input order, scored a batch of many utterances per call."""
        chain = lambda u: chain_of(u, self.carry, self.utt2spk)  # noqa: E731
        for batch in batches(utterances, chain, self.batch_hypotheses):
            yield from self.score_batch(batch, [chain(u) for u in batch])
            if progress is not None:
                progress(sum(len(u.hyps) for u in batch))

    def start_states(self, chains: list[str | None]) -> State | None:
        """One start row per utterance of a batch: its chain's carried state, else the fresh one."""
        if all(c is None or c not in self.carried for c in chains):
            return None
        fresh = self.lm.initial_state(1)
        rows = [self.carried.get(c, fresh) if c is not None else fresh for c in chains]
        return State({k: np.concatenate([r.arrays[k] for r in rows]) for k in fresh.arrays})

    def score_batch(self, batch: list[Utterance], chains: list[str | None]) -> list[ScoredUtterance]:
        tokens = [self.tokens(h) for u in batch for h in u.hyps]
        rows = np.repeat(np.arange(len(batch)), [len(u.hyps) for u in batch])
        start = self.start_states(chains)
        logprobs, finals = self.lm.sequence_logprobs_from(
            [[t.id for t in seq] for seq in tokens], start, rows if start is not None else None,
            batch_size=self.batch_size, final_states=self.carry != "never")
        out, i = [], 0
        for utt, key in zip(batch, chains, strict=True):
            scored = [self.scored(h, tokens[i + j], logprobs[i + j]) for j, h in enumerate(utt.hyps)]
            best = min(range(len(scored)), key=lambda j: scored[j].total)
            if finals is not None and key is not None:
                self.carried[key] = State({k: v[i + best : i + best + 1].copy() for k, v in finals.arrays.items()})
            out.append(ScoredUtterance(utt.id, scored, best))
            i += len(utt.hyps)
        return out

    def scored(self, hyp: Hypothesis, tokens: list[Token], logprobs: np.ndarray) -> Scored:
        r = self.lm.result_of(tokens, logprobs)
        return Scored(hyp, r.nll, r.tokens, r.oov, self.weights.total(hyp, r.nll))
