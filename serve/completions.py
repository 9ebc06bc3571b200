"""The engine behind ``POST /v1/completions`` (OpenAI's completions API), without HTTP: prompts
in, per-choice deltas out, in a worker thread.

    prompt -> tokens (``lm.prompt_tokens``, or token ids as given) -> read through the scoring
    graph (``lm.feed``: the prompt's own log-probabilities, the first predicted from <eos> as in
    ``rnnlm score``) -> n samples from the step graph (``lm.sample_from``, seeded as ``rnnlm
    generate``) -> each choice's text, cut at a stop string or <eos> ("stop") or at max_tokens
    ("length")

Generated text reads as ``rnnlm generate`` prints it: at word level a token follows a space (none
at the very start or after a newline), so prompt + text is the CLI's line. ``text_offset`` counts
characters of the choice's text (with echo, from the prompt's start). A choice's tokens are handed
out only once no stop string can still begin inside them, so a stream never takes text back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rnnlm.serve.runtime import LanguageModel


@dataclass(frozen=True)
class Prompt:
    """A prompt's tokens as plain strings and ints: a 1 MiB prompt is 200,000 tokens, and as many
    Token objects alive at once make the garbage collector stop every thread for ~100 ms."""

    text: str  # as the client wrote it, or the token ids' text
    tokens: list[str]  # each token as scored
    ids: list[int]
    offsets: list[int]  # of each token in ``text``


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    seed: int | None
    stop: tuple[str, ...]
    echo: bool
    logprobs: int | None  # alternatives per position, or None for no logprobs at all


@dataclass
class Delta:
    """New text of one choice, its logprob entries (when asked), and its end once known."""

    index: int
    text: str
    logprobs: dict[str, list[Any]] | None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


# ---------------------------------------------------------------------------- text and offsets
def ids_prompt(lm: LanguageModel, ids: Sequence[int]) -> Prompt:
    """A prompt given as token ids: its text is what the tokens read as."""
    text, offsets, tokens = "", [], []
    for tid in ids:
        tok = lm.vocab[tid]
        p = lm.tokenizer.piece(tok, text)
        offsets.append(len(text) + (1 if len(p) > 1 and p.startswith(" ") else 0))  # after its space
        text += p
        tokens.append(tok)
    return Prompt(text, tokens, [int(t) for t in ids], offsets)


def text_prompt(lm: LanguageModel, text: str) -> Prompt:
    """A prompt given as text: ``lm.prompt_tokens``, a line at a time (each line's Token objects
    die at once), with where each token stands in the text: a word (or character) where it
    starts, a line's <eos> at its newline."""
    tokens: list[str] = []
    ids: list[int] = []
    offsets: list[int] = []
    known = True  # False if the tokenizer made tokens this scan cannot place
    at = 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        complete = i < len(lines) - 1
        toks = lm.prompt_tokens(line + "\n" if complete else line)
        tokens.extend(t.text for t in toks)
        ids.extend(t.id for t in toks)
        starts = [at + s for s in _line_offsets(lm, line.rstrip("\r"))]
        if len(toks) == len(starts) + complete:
            offsets.extend(starts + [at + len(line)] * complete)
        elif len(toks) == len(starts):
            offsets.extend(starts)
        else:
            known = False
        at += len(line) + 1
    if not known:  # a tokenizer rule this scan does not know: offsets of the tokens' own text
        offsets = ids_prompt(lm, ids).offsets
    return Prompt(text, tokens, ids, offsets)


def _line_offsets(lm: LanguageModel, line: str) -> list[int]:
    words = list(re.finditer(r"\S+", line))
    if lm.level != "char":
        return [m.start() for m in words]
    out: list[int] = []
    for k, m in enumerate(words):
        if k:
            out.append(words[k - 1].end())  # a run of whitespace is one "_"
        out.extend(range(m.start(), m.end()))
    return out


def top_map(lm: LanguageModel, row: np.ndarray, k: int, chosen: int, chosen_lp: float) -> dict[str, float]:
    """The ``k`` most likely tokens of a distribution with their log-probabilities, and the chosen
    one (with its own log-probability, so a map always agrees with token_logprobs)."""
    out: dict[str, float] = {}
    if k > 0:
        best = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        for tid in best[np.argsort(-row[best], kind="stable")]:
            out[lm.vocab[int(tid)]] = float(row[tid])
    out[lm.vocab[chosen]] = chosen_lp
    return out


# ---------------------------------------------------------------------------- one choice
@dataclass(frozen=True)
class _Held:
    text: str  # what the token adds to the text (its space included)
    token: str
    logprob: float
    top: dict[str, float] | None
    start: int  # where ``text`` starts in the generated text

    @property
    def offset(self) -> int:
        """Where the token itself starts (after its space)."""
        return self.start + (1 if len(self.text) > 1 and self.text.startswith(" ") else 0)


@dataclass
class Choice:
    """The text of one choice as it grows, held back while a stop string could still begin in it."""

    index: int
    base: str  # what precedes the generated text: the prompt
    stop: tuple[str, ...]
    with_logprobs: bool
    generated: str = ""
    pending: list[_Held] = field(default_factory=list)
    finished: str | None = None
    count: int = 0  # generated tokens kept
    echo_offset: int = 0  # where the generated text starts in the choice's text
    searched: int = 0  # the generated text before this holds no stop string

    def add(self, text: str, token: str, logprob: float, top: dict[str, float] | None) -> None:
        self.pending.append(_Held(text, token, logprob, top, len(self.generated)))
        self.generated += text
        self.count += 1

    def flush(self, final: bool = False) -> Delta | None:
        """The tokens now safe to hand out (all of them when ``final``), cut at a stop string."""
        cut = self._stop_at()
        if cut is not None:
            self.finished = "stop"
            keep = [p for p in self.pending if p.start < cut]
            self.count -= len(self.pending) - len(keep)
            self.generated = self.generated[:cut]
            return self._delta(keep, end=cut)
        safe = len(self.generated) if final else len(self.generated) - self._held()
        keep = [p for p in self.pending if p.start + len(p.text) <= safe]
        return self._delta(keep, end=keep[-1].start + len(keep[-1].text) if keep else None)

    def finish(self, reason: str) -> Delta:
        """The last delta: every token still held, and the end (``reason``, unless a stop string came first)."""
        delta = self.flush(final=True)
        if self.finished is None:
            self.finished = reason
            if delta is None:
                delta = self._delta([], end=None)
                assert delta is not None
            delta.finish_reason = reason
        assert delta is not None
        return delta

    def _delta(self, keep: list[_Held], end: int | None) -> Delta | None:
        if not keep and self.finished is None:
            return None
        start = keep[0].start if keep else end or 0
        text = self.generated[start:end] if keep else ""
        del self.pending[: len(keep)]
        if self.finished is not None:
            self.pending.clear()
        lp: dict[str, list[Any]] | None = None
        if self.with_logprobs:
            lp = {"tokens": [p.token for p in keep], "token_logprobs": [p.logprob for p in keep],
                  "top_logprobs": [p.top for p in keep], "text_offset": [self.echo_offset + p.offset for p in keep]}
        return Delta(self.index, text, lp, self.finished)

    def _stop_at(self) -> int | None:
        """Where the first stop string starts, searching only text that could hold a new one."""
        if not self.stop:
            return None
        start = max(self.searched - max(len(s) for s in self.stop) + 1, 0)
        found = [i for s in self.stop if (i := self.generated.find(s, start)) >= 0]
        self.searched = len(self.generated)
        return min(found) if found else None

    def _held(self) -> int:
        """Characters at the end that could be the start of a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.generated.endswith(s[:k])), default=0)


# ---------------------------------------------------------------------------- the engine
def run(lm: LanguageModel, prompts: Sequence[Prompt], args: Sampling,
        cancelled: Callable[[], bool] | None = None) -> Iterator[Delta | Usage]:
    """Every choice's deltas, prompt by prompt (choice index = prompt index * n + sample), then
    the usage. Runs in a worker thread; ``cancelled`` is polled between onnxruntime calls."""
    completion = 0
    for p_index, prompt in enumerate(prompts):
        choices = [Choice(p_index * args.n + j, prompt.text, args.stop, args.logprobs is not None)
                   for j in range(args.n)]
        if args.echo:  # the prompt's own log-probabilities are returned: the scoring graph
            lp, ctx = lm.feed(lm.context(), prompt.ids, cancelled=cancelled)
            yield from _echo(lm, prompt, lp, ctx, choices, args, cancelled)
        else:  # only the state after it is needed: the advance graph, where the bundle has one
            ctx = lm.advance(lm.context(), prompt.ids, cancelled=cancelled)
        for c in choices:
            c.echo_offset = len(prompt.text) if args.echo else 0
        if args.max_tokens > 0:
            yield from _sample(lm, ctx, choices, args, cancelled)
        for c in choices:
            if c.finished is None:  # else its last delta has gone out
                yield c.finish("length")
            completion += c.count
    yield Usage(sum(len(p.ids) for p in prompts), completion)


def _echo(lm: LanguageModel, prompt: Prompt, lp: np.ndarray, ctx: Any, choices: list[Choice], args: Sampling,
          cancelled: Callable[[], bool] | None) -> Iterator[Delta]:
    """The prompt itself, as the first delta of each choice: its text and, when asked, the
    log-probabilities of its tokens (from the scoring graph, as ``rnnlm score``)."""
    logprobs: dict[str, list[Any]] | None = None
    if args.logprobs is not None:
        ids = prompt.ids
        if args.logprobs > 0:  # alternatives need each position's whole distribution: the step graph
            rows = lm.position_logprobs(lm.context(), ids, cancelled=cancelled)
            tops: list[dict[str, float] | None] = [top_map(lm, row, args.logprobs, tid, float(v))
                                                   for row, tid, v in zip(rows, ids, lp, strict=True)]
        else:
            tops = [{lm.vocab[tid]: float(v)} for tid, v in zip(ids, lp, strict=True)]
        logprobs = {"tokens": list(prompt.tokens), "token_logprobs": [float(v) for v in lp],
                    "top_logprobs": tops, "text_offset": list(prompt.offsets)}
    for c in choices:
        yield Delta(c.index, prompt.text, None if logprobs is None else {k: list(v) for k, v in logprobs.items()})


def _sample(lm: LanguageModel, ctx: Any, choices: list[Choice], args: Sampling,
            cancelled: Callable[[], bool] | None) -> Iterator[Delta]:
    steps = lm.sample_from(ctx, max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, num_samples=args.n, stop_at_eos=True, cancelled=cancelled)
    try:
        for ids, rows in steps:
            for c, tid in zip(choices, ids.tolist(), strict=True):
                if c.finished is not None:
                    continue
                if tid == lm.eos_id:  # the end of the text, not part of it
                    yield c.finish("stop")
                    continue
                row = rows[c.index % args.n]
                tok = lm.vocab[tid]
                top = top_map(lm, row, args.logprobs, tid, float(row[tid])) if args.logprobs is not None else None
                c.add(lm.tokenizer.piece(tok, c.generated or c.base), tok, float(row[tid]), top)
                if (delta := c.flush()) is not None:
                    yield delta
            if all(c.finished is not None for c in choices):
                return
    finally:
        steps.close()
