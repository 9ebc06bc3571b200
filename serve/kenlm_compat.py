"""KenLM's Python interface over an rnnlm bundle, so that code written against ``kenlm.Model``
switches with one import:

    import rnnlm.serve.kenlm_compat as kenlm        # instead of: import kenlm
    model = kenlm.Model("models/lstm/onnx")
    model.score("the stock market fell", bos=True, eos=True)   # log10 P, </s> included

Units as KenLM's: log10. Each value is the runtime's float64 natural-log value divided by ln 10.

What differs, because a recurrent model is not an n-gram model:
- ``bos=True`` starts from the ``<eos>`` state (rnnlm's start of a sentence). A recurrent model
  trained on running text has no "null context"; ``bos=False`` and ``NullContextWrite`` use that
  same start, which is the nearest there is.
- A ``State`` holds the whole history (the recurrent state), so two states are equal only when
  their histories since the start are; ``ngram_length`` is the length of that history plus one.
- An out-of-vocabulary word is scored as ``<unk>`` (a real probability) and flagged ``oov``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rnnlm.serve.runtime import LanguageModel as Runtime
from rnnlm.serve.runtime import State as RnnState

from rnnlm.text import Token

LN10 = math.log(10)
EOS = "</s>"


@dataclass(frozen=True)
class FullScoreReturn:
    log_prob: float  # log10
    ngram_length: int
    oov: bool


class State:
    """Where a sentence has got to: the recurrent state after the words so far, with the last word
    still to be read. Written by ``BeginSentenceWrite``/``NullContextWrite``/``BaseScore``."""

    def __init__(self) -> None:
        self.history: tuple[int, ...] = ()
        self.recurrent: RnnState | None = None
        self.pending = -1  # the id to read before predicting the next word
        self._next: tuple[np.ndarray, RnnState] | None = None  # (log-probs, state) after reading it

    def _write(self, recurrent: RnnState, pending: int, history: tuple[int, ...]) -> None:
        self.recurrent, self.pending, self.history, self._next = recurrent, pending, history, None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, State) and self.history == other.history and self.pending == other.pending

    def __hash__(self) -> int:
        return hash((self.history, self.pending))

    def __repr__(self) -> str:
        return f"State(words={len(self.history)})"


class Model:
    """An rnnlm bundle with ``kenlm.Model``'s methods. ``path``: a bundle or model directory."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, raw: bool = False,
                 batch_size: int = 64) -> None:
        self.path = str(path)
        self.lm = Runtime.load(path, device=device, threads=threads, raw=raw)
        self.batch_size = batch_size
        self.order = 0  # no n-gram order: the whole history conditions every word

    def _tokens(self, sentence: str, eos: bool) -> list[Token]:
        if not isinstance(sentence, str):
            raise TypeError(f"sentence must be a str of space-separated words, not {type(sentence).__name__}")
        tokens = self.lm.tokenizer.line_tokens(sentence, eos=False)
        return [*tokens, Token(EOS, self.lm.eos_id, False)] if eos else tokens

    def _logprobs(self, sentences: Sequence[list[Token]]) -> list[np.ndarray]:
        """Natural-log probabilities of each token sequence, batched, each from the ``<eos>`` state."""
        out = self.lm.sequence_logprobs([[t.id for t in seq] for seq in sentences], batch_size=self.batch_size)
        return [np.asarray(lp, np.float64) for lp in out]

    def score(self, sentence: str, bos: bool = True, eos: bool = True) -> float:
        """log10 P of a sentence of space-separated words, ``</s>`` included when ``eos``.

        Right: ``model.score("the stock market fell")``.
        Wrong: ``model.score(["the", "stock"])`` (a list: TypeError), ``model.score("<s> the stock </s>")``
        (the markers are added for you and would be scored as words)."""
        return self.scores([sentence], bos=bos, eos=eos)[0]

    def scores(self, sentences: Sequence[str], bos: bool = True, eos: bool = True) -> list[float]:
        """``score`` of many sentences in one batched pass (not in KenLM; much faster than a loop)."""
        tokens = [self._tokens(s, eos) for s in sentences]
        return [float(lp.sum()) / LN10 for lp in self._logprobs(tokens)]

    def full_scores(self, sentence: str, bos: bool = True, eos: bool = True) -> Iterator[tuple[float, int, bool]]:
        """(log10 p, ngram length, oov) for each word, then for ``</s>`` when ``eos``; they sum to ``score``."""
        tokens = self._tokens(sentence, eos)
        lp = self._logprobs([tokens])[0]
        for i, (t, v) in enumerate(zip(tokens, lp, strict=True)):
            yield float(v) / LN10, i + 2, t.oov

    def perplexity(self, sentence: str) -> float:
        """10^(−score / (words + 1)): KenLM's per-sentence perplexity, ``</s>`` counted."""
        words = len(sentence.split()) + 1
        return 10.0 ** (-self.score(sentence) / words)

    def __contains__(self, word: str) -> bool:
        tokens = self.lm.tokenizer.line_tokens(word, eos=False)  # normalized as a sentence's words are
        return len(tokens) == 1 and not tokens[0].oov

    # ------------------------------------------------------------------ the state API
    def BeginSentenceWrite(self, state: State) -> None:  # noqa: N802 - KenLM's name
        """Make ``state`` the start of a sentence: the next word is predicted from the ``<eos>`` state."""
        state._write(self.lm.initial_state(1), self.lm.eos_id, ())

    def NullContextWrite(self, state: State) -> None:  # noqa: N802 - KenLM's name
        """KenLM's empty context. A recurrent LM has none; this is the start of a sentence too."""
        self.BeginSentenceWrite(state)

    def BaseFullScore(self, in_state: State, word: str, out_state: State) -> FullScoreReturn:  # noqa: N802
        """Score ``word`` after ``in_state``; write the state after it into ``out_state``.

        The distribution after ``in_state`` is computed once and kept on it, so scoring many
        candidate words from one state (what a beam search does) costs one step of the model."""
        if in_state.recurrent is None:
            raise ValueError("in_state is empty: write it with BeginSentenceWrite first")
        if in_state._next is None:
            logprobs, after = self.lm.step_ids(in_state.recurrent, np.array([in_state.pending], np.int64))
            in_state._next = (logprobs, after)
        logprobs, after = in_state._next
        token = Token(EOS, self.lm.eos_id, False) if word == EOS else self._word(word)
        history = in_state.history
        out_state._write(after, token.id, (*history, token.id))
        return FullScoreReturn(float(logprobs[0, token.id]) / LN10, len(history) + 2, token.oov)

    def _word(self, word: str) -> Token:
        tokens = self.lm.tokenizer.line_tokens(word, eos=False)
        if len(tokens) != 1:
            raise ValueError(f"BaseScore takes one word, got {word!r}")
        return tokens[0]

    def BaseScore(self, in_state: State, word: str, out_state: State) -> float:  # noqa: N802 - KenLM's name
        """log10 p(word | in_state), and the state after it in ``out_state``."""
        return self.BaseFullScore(in_state, word, out_state).log_prob


LanguageModel = Model  # kenlm.LanguageModel is the older name of kenlm.Model
