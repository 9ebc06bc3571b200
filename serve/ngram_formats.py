"""``rnnlm score --format srilm|kenlm``: sentence scores in the layouts of SRILM's ``ngram -ppl``
and KenLM's ``query``, so scripts written for those tools read rnnlm's numbers unchanged.

Units: both tools print log10. Every log10 value here is the same float64 natural-log value the
runtime computes, divided by ln 10 (``nats / LN10``), so it equals ``rnnlm score``'s nats / ln 10
exactly; numbers are printed in Python's shortest round-trip form, not rounded to 6 digits.

Sentences: every non-blank line is one. With bos (the default) it starts from the ``<eos>``
state, as rnnlm scores a line; ``--no-bos`` continues from where the previous line left off (the
first line from the ``<eos>`` state: there is nothing before it). With eos (the default) ``</s>``
is predicted at the end of the line (rnnlm's ``<eos>``); ``--no-eos`` leaves it out.

OOVs (words outside the model's vocabulary) are scored as ``<unk>`` by the model. SRILM leaves
them out of logprob and ppl and counts them apart (``[OOV] 0 [ -inf ]``); KenLM includes their
probability in Total and gives "Perplexity excluding OOVs" without them. A recurrent model never
gives probability zero, so SRILM's zeroprobs is 0 unless a probability underflows.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import IO, BinaryIO

import numpy as np
from rnnlm.serve.runtime import LanguageModel

from rnnlm.text import TextError, Token, lines_of

LN10 = math.log(10)
GROUP_LINES = 8192  # lines scored together (bounded memory)


@dataclass
class Sentence:
    text: str  # the line as read, whitespace collapsed
    tokens: list[Token]  # what was scored: the words, then <eos> when eos
    logprobs: np.ndarray  # float64 natural-log probability of each token
    eos: bool

    def surface(self, i: int) -> str:
        """Token ``i`` as the input wrote it (before lower-casing and numbers to N), ``</s>`` for the end."""
        if self.eos and i == len(self.tokens) - 1:
            return "</s>"
        written = self._written
        return written[i] if len(written) == self.words else self.tokens[i].text  # char level: the token

    @cached_property
    def _written(self) -> list[str]:
        return self.text.split()

    @property
    def words(self) -> int:
        return len(self.tokens) - self.eos

    @property
    def oov(self) -> int:
        return sum(t.oov for t in self.tokens)

    def nats(self, *, in_vocab: bool) -> float:
        """Σ ln p over the tokens (the in-vocabulary ones only, when asked), as ``result_of`` sums it."""
        lp = self.logprobs
        if in_vocab:
            lp = lp[~np.fromiter((t.oov for t in self.tokens), bool, len(self.tokens))]
        return float(lp.sum())


def log10_of(nats: float) -> float:
    """A natural-log value in log10: the same float64 divided by ln 10 (exact by construction)."""
    return nats / LN10


def fmt(x: float) -> str:
    """Shortest round-trip text of a float (``-inf`` for minus infinity)."""
    return repr(float(x))


# ------------------------------------------------------------------------------ scoring lines


def sentences_bos(lm: LanguageModel, lines: Iterable[str], *, eos: bool, batch_size: int) -> Iterator[Sentence]:
    """Each line from the ``<eos>`` state, many lines per call of the batched scorer."""
    texts = (" ".join(line.split()) for line in lines if line.split())
    for group in iter(lambda: list(itertools.islice(texts, GROUP_LINES)), []):
        tokens = [lm.tokenizer.line_tokens(text, eos=eos) for text in group]
        logprobs = lm.sequence_logprobs([[t.id for t in seq] for seq in tokens], batch_size=batch_size)
        for text, seq, lp in zip(group, tokens, logprobs, strict=True):
            yield Sentence(text, seq, np.asarray(lp, np.float64), eos)


class LineSplitter:
    """Cuts the blocks of a token stream (``score_tokens``' ``on_block``) back into its lines."""

    def __init__(self, sink: Callable[[Sentence], None], eos: bool) -> None:
        self.sink, self.eos = sink, eos
        self.lines: deque[tuple[str, int]] = deque()  # (text, tokens) of lines not yet complete
        self.tokens: list[Token] = []
        self.logprobs: list[np.ndarray] = []

    def on_block(self, block: list[Token], lp: np.ndarray) -> None:
        pos = 0
        while pos < len(block):
            text, n = self.lines[0]
            take = min(n - len(self.tokens), len(block) - pos)
            self.tokens.extend(block[pos : pos + take])
            self.logprobs.append(np.asarray(lp[pos : pos + take], np.float64))
            pos += take
            if len(self.tokens) == n:
                self.lines.popleft()
                self.sink(Sentence(text, self.tokens, np.concatenate(self.logprobs), self.eos))
                self.tokens, self.logprobs = [], []


def score_continuing(lm: LanguageModel, lines: Iterable[str], sink: Callable[[Sentence], None], *, eos: bool) -> None:
    """``--no-bos``: the lines as one stream, each continuing the previous one's context."""
    splitter = LineSplitter(sink, eos)

    def tokens() -> Iterator[Token]:
        for line in lines:
            if line.split():
                seq = lm.tokenizer.line_tokens(line, eos=eos)
                splitter.lines.append((" ".join(line.split()), len(seq)))
                yield from seq

    lm.score_tokens(tokens(), on_block=splitter.on_block)


# ------------------------------------------------------------------------------ SRILM


class SrilmPrinter:
    """``ngram -ppl`` output: per sentence with ``debug`` >= 1 (per word with 2), then the file summary."""

    def __init__(self, out: IO[str], name: str, *, debug: int, bos: bool) -> None:
        self.out, self.name, self.debug, self.bos = out, name, debug, bos
        self.sentences = self.words = self.oov = self.zero = self.eos_count = 0
        self.nats = 0.0  # in-vocabulary log-probability, summed over sentences

    @staticmethod
    def stats(sentences: int, words: int, oov: int, zero: int, eos: int, nats: float) -> str:
        logprob = log10_of(nats)
        denom = words - oov - zero
        ppl = fmt(10 ** (-logprob / (denom + eos))) if denom + eos > 0 else "undefined"
        ppl1 = fmt(10 ** (-logprob / denom)) if denom > 0 else "undefined"
        return (f"{sentences} sentences, {words} words, {oov} OOVs\n"
                f"{zero} zeroprobs, logprob= {fmt(logprob)} ppl= {ppl} ppl1= {ppl1}\n")

    def word_lines(self, s: Sentence) -> str:
        out = []
        for i, (t, lp) in enumerate(zip(s.tokens, s.logprobs, strict=True)):
            word = s.surface(i)
            context = ("<s> " if self.bos else "... ") if i == 0 else f"{s.surface(i - 1)} ..."
            detail = "[OOV] 0 [ -inf ]" if t.oov else f"[rnn] {fmt(math.exp(lp))} [ {fmt(log10_of(float(lp)))} ]"
            out.append(f"\tp( {word} | {context}) \t= {detail}\n")
        return "".join(out)

    def sentence(self, s: Sentence) -> None:
        zero = int(np.isneginf(s.logprobs).sum())
        nats = s.nats(in_vocab=True)
        self.sentences += 1
        self.words, self.oov, self.zero = self.words + s.words, self.oov + s.oov, self.zero + zero
        self.eos_count += int(s.eos)
        self.nats += nats
        if self.debug >= 1:
            self.out.write(s.text + "\n" + (self.word_lines(s) if self.debug >= 2 else "")
                           + self.stats(1, s.words, s.oov, zero, int(s.eos), nats) + "\n")

    def finish(self) -> None:
        self.out.write(f"file {self.name}: " + self.stats(self.sentences, self.words, self.oov, self.zero,
                                                          self.eos_count, self.nats))


# ------------------------------------------------------------------------------ KenLM


class KenlmPrinter:
    """``query`` output: ``word=id n log10`` per token, ``Total: T OOV: k`` per line, then the summary.

    KenLM reserves id 0 for unknown words, so ids are vocab.txt line numbers (rnnlm id + 1) and 0
    for an OOV. ``n`` is the context length a recurrent model conditions on: every token since the
    start of the sentence, ``<s>`` included, plus the word itself."""

    def __init__(self, out: IO[str], *, bos: bool) -> None:
        self.out, self.bos = out, bos
        self.tokens = self.oov = 0
        self.nats = self.oov_nats = 0.0

    def sentence(self, s: Sentence) -> None:
        parts = []
        for i, (t, lp) in enumerate(zip(s.tokens, s.logprobs, strict=True)):
            word = s.surface(i)
            parts.append(f"{word}={0 if t.oov else t.id + 1} {i + 1 + int(self.bos)} {fmt(log10_of(float(lp)))}\t")
        nats = s.nats(in_vocab=False)
        self.out.write("".join(parts) + f"Total: {fmt(log10_of(nats))} OOV: {s.oov}\n")
        self.tokens += len(s.tokens)
        self.oov += s.oov
        self.nats += nats
        self.oov_nats += nats - s.nats(in_vocab=True)

    def finish(self) -> None:
        total, in_vocab = log10_of(self.nats), log10_of(self.nats - self.oov_nats)
        n_in = self.tokens - self.oov
        self.out.write(f"Perplexity including OOVs:\t{fmt(10 ** (-total / self.tokens))}\n"
                       f"Perplexity excluding OOVs:\t{fmt(10 ** (-in_vocab / n_in)) if n_in else 'nan'}\n"
                       f"OOVs:\t{self.oov}\nTokens:\t{self.tokens}\n")


# ------------------------------------------------------------------------------ the command


def ngram_score(lm: LanguageModel, source: BinaryIO, name: str, out: IO[str], *, fmt_name: str, debug: int,
                bos: bool, eos: bool, batch_size: int) -> None:
    """Score every non-blank line of ``source`` and print it as SRILM or KenLM would."""
    printer: SrilmPrinter | KenlmPrinter = (SrilmPrinter(out, name, debug=debug, bos=bos) if fmt_name == "srilm"
                                            else KenlmPrinter(out, bos=bos))
    lines = lines_of(source, name)
    if bos:
        for s in sentences_bos(lm, lines, eos=eos, batch_size=batch_size):
            printer.sentence(s)
    else:
        score_continuing(lm, lines, printer.sentence, eos=eos)
    if (printer.sentences if isinstance(printer, SrilmPrinter) else printer.tokens) == 0:
        raise TextError(f"{name} is empty or only whitespace: nothing to score")
    printer.finish()


def check_options(fmt_name: str, *, debug: int, bos: bool, eos: bool, per_line: bool, per_token: bool,
                  as_json: bool) -> None:
    """Refuse option combinations that mean nothing together, before the model loads."""
    if fmt_name not in ("text", "srilm", "kenlm"):
        raise TextError(f"--format must be text, srilm or kenlm, not {fmt_name!r}")
    if debug not in (0, 1, 2):
        raise TextError(f"--debug must be 0, 1 or 2 (SRILM's -debug levels), not {debug}")
    if debug and fmt_name != "srilm":
        raise TextError("--debug is SRILM's detail level: use it with --format srilm")
    if fmt_name == "text":
        if not (bos and eos):
            raise TextError("--no-bos and --no-eos go with --format srilm or kenlm")
        return
    for flag, given in (("--json", as_json), ("--per-token", per_token), ("--per-line", per_line)):
        if given:
            raise TextError(f"--format {fmt_name} prints its own layout (every line is a sentence); drop {flag}")


def ngram_score_command(lm: LanguageModel, source: BinaryIO, name: str, *, fmt_name: str, debug: int, bos: bool,
                        eos: bool, batch_size: int) -> None:
    """Print to standard output once everything is scored: an error midway prints nothing."""
    import shutil
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        ngram_score(lm, source, name, spool, fmt_name=fmt_name, debug=debug, bos=bos, eos=eos, batch_size=batch_size)
        spool.seek(0)
        shutil.copyfileobj(spool, sys.stdout)
