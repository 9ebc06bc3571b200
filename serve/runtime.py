"""The runtime: scoring and generation on onnxruntime sessions, one per graph, created once.

Units: natural-log probabilities; nll is their negated sum in nats; ppl = exp(nll / tokens);
bpc = nll / (tokens · ln 2) for character models. Every line ends in ``<eos>``, which is a token
(one per line, as PTB papers count), and the first token is predicted from ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rnnlm.serve import chunks, portable
from rnnlm.serve.bundle import Bundle, BundleError
from rnnlm.serve.devices import CPU as CPU
from rnnlm.serve.devices import CUDA as CUDA
from rnnlm.serve.devices import cuda_unavailable as cuda_unavailable
from rnnlm.serve.devices import device_note
from rnnlm.serve.devices import gpu_present as gpu_present
from rnnlm.serve.devices import providers_for as providers_for
from rnnlm.serve.graphs import (
    BoundStepper,
    advance_threads,
    check_io,
    fixed_steps,
    intra_threads,
    session_options,
)
from rnnlm.serve.portable import STATE_FORMAT as STATE_FORMAT
from rnnlm.serve.values import Cancelled as Cancelled
from rnnlm.serve.values import Context as Context
from rnnlm.serve.values import ScoreResult as ScoreResult
from rnnlm.serve.values import State as State
from rnnlm.serve.values import StateError as StateError

from rnnlm.errors import RnnlmError
from rnnlm.text import Token, Tokenizer, check_text

MAX_NEW_TOKENS = 10_000  # the cap on one generate call
# Positions (steps x columns) a scoring call holds at least, in chunks, where the graph's step axis is
# dynamic: a narrow batch (one stream: `rnnlm score FILE`, a session's text) gets calls of more than one
# chunk, so that the decoder product runs on more rows at once. Measured at batch 1, two threads, PTB
# test, 256 positions against 32 (bench/RESULTS.md, "Goals, session 7"): 1.08-1.23x the tokens/s for
# every bundle, the same log-probabilities; 512 was no faster.
CALL_CHUNKS = 8


class LanguageModel:
    """A bundle loaded into onnxruntime. Build it with ``LanguageModel.load(path)``."""

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, raw: bool = False,
                 eager: bool = True) -> None:
        self.bundle = bundle
        m = bundle.manifest
        spec = bundle.text_spec()
        self.level = spec.level
        vocabulary = bundle.read_vocab()
        self.vocab = vocabulary.itos
        self.tokenizer = Tokenizer(spec.raw() if raw else spec, vocabulary)
        self.eos_id = self.tokenizer.eos_id
        self.chunk = bundle.chunk
        # The advance graph (bundles exported since it exists): its session is created on the first
        # prompt of at least one advance chunk, never at load, so cold start does not pay for it.
        self.advance_chunk = bundle.advance_chunk
        self.states = m["state"]
        self.threads = intra_threads(threads)
        self._options = session_options(self.threads)
        self.advance_threads = advance_threads(m, self.threads)
        self.providers = providers_for(device)
        self._sessions: dict[str, ort.InferenceSession] = {}
        # On CUDA, generation keeps the recurrent state on the device between steps (IOBinding);
        # only the token ids go in and the log-probabilities come out.
        self.bind_state = "CUDAExecutionProvider" in self.providers
        self.session("score")  # refuse a broken bundle at load time, whichever graph it is;
        self.device_note = device_note(device, self.providers, self.device == "cuda")
        if eager:  # the step graph is checked when first used unless asked for now
            self.session("step")

    @property
    def device(self) -> str:
        sess = next(iter(self._sessions.values()))
        return "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"

    def session(self, key: str) -> ort.InferenceSession:
        """The onnxruntime session of graph ``key`` ("step", "score" or "advance"), created and checked once:
        its inputs and outputs against the manifest, then the manifest's probe."""
        if key not in self._sessions:
            path = self.bundle.file(key)
            data = self.bundle.verified_bytes(path.name)  # the bytes that were hashed are the bytes that run
            try:
                opts = self._options if key != "advance" else session_options(self.advance_threads)
                sess = ort.InferenceSession(data, opts, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
            check_io(path, self.bundle.manifest["graphs"][key], sess)
            self._check_vocab(key, sess)
            self._sessions[key] = sess
            try:
                self._check_probe(key)
            except BaseException:
                del self._sessions[key]
                raise
        return self._sessions[key]

    @classmethod
    def load(cls, path: str | Path | None = None, *, device: str = "auto", threads: int | None = None,
             raw: bool = False, eager: bool = True) -> LanguageModel:
        """Load and verify a bundle: a bundle directory, a model directory holding ``onnx/``, or
        (None) the newest bundle under ./models. ``raw`` takes text tokens as they are.
        ``eager=False`` defers the step graph's session to its first use (scoring needs only the
        scoring graph, and starts faster). Every file's sha256 is checked before this returns; the
        files a session does not wait for are hashed on other threads while it is created."""
        lm = cls(Bundle.open(path, verify_hashes="background"), device=device, threads=threads, raw=raw, eager=eager)
        lm.bundle.verify_files()
        return lm

    # ------------------------------------------------------------------ checks on load
    def _check_vocab(self, key: str, sess: ort.InferenceSession) -> None:
        """The vocabulary's size against what the model predicts: the step graph's logits, or (the
        scoring graph returns only targets) the manifest's statement of them."""
        if key == "step":
            logits_dim = sess.get_outputs()[0].shape[-1]
            where = ""
        else:
            logits_dim = self.bundle.manifest["graphs"]["step"]["outputs"][0]["shape"][-1]
            where = " (manifest)"
        if logits_dim != len(self.vocab):
            raise BundleError(f"{self.bundle.path / 'vocab.txt'}: {len(self.vocab)} tokens, but the model predicts "
                              f"{logits_dim}{where}")

    def _run_chunks(self, key: str, C: int, inputs: np.ndarray, targets: np.ndarray | None, lengths: np.ndarray,
                    state: State | None, cancelled: Callable[[], bool] | None) -> tuple[np.ndarray | None, State]:
        """Graph ``key`` ("score" or "advance") over (L, B) inputs, ``C`` steps per call at most
        (``chunks.run_chunks``): target log-probabilities (None without targets) and the final state."""
        arrays = dict((state or self.initial_state(inputs.shape[1])).arrays)
        out, arrays = chunks.run_chunks(self.session(key), self.states, C, fixed_steps(self.bundle.manifest["graphs"][key]),
                                        inputs, targets, lengths, arrays, cancelled)
        return out, State(arrays)

    def _check_probe(self, key: str) -> None:
        """Rerun the manifest's probe through graph ``key``; refuse outputs that differ."""
        probe = self.bundle.manifest["probe"]
        if not probe["tokens"]:  # a bundle the exporter is still staging: its probe is computed through this runtime
            return
        seq = np.array(probe["tokens"], np.int64)
        if key == "advance":
            self._check_advance(seq[:-1], probe["tolerance"])
            return
        if key == "score":
            picked = self._score_ids(seq[:-1][:, None], seq[1:][:, None], np.array([len(seq) - 1]))[0][:, 0]
            diff = float(np.abs(picked - np.array(probe["target_logprobs"])).max())
        else:
            state = self.initial_state()
            for t in seq[:-1]:
                logprobs, state = self.step_ids(state, np.array([t]))
            diff = float(np.abs(logprobs[0, :16] - np.array(probe["last_step_logprobs_head"])).max())
        if diff > probe["tolerance"]:
            raise BundleError(f"{self.bundle.file(key)}: the probe's outputs differ from the manifest's by {diff:.2e} "
                              f"(> {probe['tolerance']:g}) on {self.device}")

    def _check_advance(self, seq: np.ndarray, tolerance: float) -> None:
        """The advance graph must reach the scoring graph's state after the probe's tokens."""
        lengths = np.array([len(seq)])
        want = self._score_ids(seq[:, None], seq[:, None], lengths)[1].arrays
        got = self._advance_ids(seq[:, None], lengths).arrays
        diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        if diff > tolerance:
            raise BundleError(f"{self.bundle.file('advance')}: its state after the probe differs from the scoring "
                              f"graph's by {diff:.2e} (> {tolerance:g}) on {self.device}")

    # ------------------------------------------------------------------ state API
    def initial_state(self, batch: int = 1) -> State:
        """A fresh state: what a sequence starts from (the model then reads ``<eos>`` as a start)."""
        return State({s["input"]: np.zeros((batch, s["size"]), np.float32) for s in self.states})

    def step_ids(self, state: State, token_ids: np.ndarray) -> tuple[np.ndarray, State]:
        """Feed one token id per sequence: log-probabilities (batch, vocab) of the next token."""
        logprobs, *new = self.session("step").run(None, {"token_ids": np.asarray(token_ids, np.int64), **state.arrays})
        return logprobs, State({s["input"]: v for s, v in zip(self.states, new, strict=True)})

    def step(self, state: State, token: str) -> tuple[np.ndarray, State]:
        """Feed one token (as the tokenizer would write it; unknown -> ``<unk>``) to a batch-1 state.

        Right: ``lp, s = lm.step(lm.initial_state(), "<eos>")``, then ``lp[0, lm.id("the")]``.
        Wrong: ``lm.step(s, "the stock")`` (one token, not text)."""
        return self.step_ids(state, np.array([self.id(token)] * state.batch, np.int64))

    def id(self, token: str) -> int:
        return self.tokenizer.token(token).id

    # ------------------------------------------------------------------ scoring
    def _score_ids(self, inputs: np.ndarray, targets: np.ndarray, lengths: np.ndarray,
                   state: State | None = None, cancelled: Callable[[], bool] | None = None) -> tuple[np.ndarray, State]:
        """(L, B) inputs/targets, per-column lengths -> target log-probabilities (L, B) and final state,
        through the scoring graph (``chunks.run_chunks``)."""
        picked, state = self._run_chunks("score", self.score_steps(inputs.shape[1]), inputs, targets, lengths, state,
                                         cancelled)
        assert picked is not None
        return picked, state

    def score_steps(self, columns: int) -> int:
        """Steps per scoring call for a batch of ``columns`` sequences: the bundle's chunk, or as many as
        make CALL_CHUNKS chunks' positions where the graph takes any number of steps."""
        if fixed_steps(self.bundle.manifest["graphs"]["score"]):
            return self.chunk
        return max(self.chunk, CALL_CHUNKS * self.chunk // max(columns, 1))

    def _advance_ids(self, inputs: np.ndarray, lengths: np.ndarray, state: State | None = None,
                     cancelled: Callable[[], bool] | None = None) -> State:
        """(L, B) inputs, per-column lengths -> the state after them, through the advance graph
        (the recurrence without the vocabulary projection). The bundle must have one."""
        return self._run_chunks("advance", self.advance_chunk, inputs, None, lengths, state, cancelled)[1]

    def score_tokens(self, tokens: Iterable[Token], *, per_token: bool = False, block: int = 4096,
                     progress: Callable[[int], None] | None = None,
                     on_block: Callable[[list[Token], np.ndarray], None] | None = None) -> ScoreResult:
        """Score a token stream as one text (state carried), ``block`` tokens at a time, so memory
        stays bounded; ``on_block`` receives each block's tokens and log-probabilities."""
        state, prev = self.initial_state(1), self.eos_id
        total = ScoreResult(0, 0, 0.0, 0.0, self.level)
        per_token_parts: list[list[tuple[str, float, bool]]] = []
        buf: list[Token] = []

        def flush() -> None:
            nonlocal state, prev, total
            ids = np.fromiter((t.id for t in buf), np.int64, len(buf))
            inputs = np.concatenate([[prev], ids[:-1]])
            picked, state = self._score_ids(inputs[:, None], ids[:, None], np.array([len(ids)]), state)
            lp = picked[:, 0].astype(np.float64)
            part = self.result_of(buf, lp, per_token=per_token)
            total = total.plus(part)
            if part.per_token is not None:
                per_token_parts.append(part.per_token)
            if on_block is not None:
                on_block(buf, lp)
            prev = int(ids[-1])
            if progress:
                progress(len(buf))
            buf.clear()

        for tok in tokens:
            buf.append(tok)
            if len(buf) >= block:
                flush()
        if buf:
            flush()
        if per_token:
            total.per_token = [entry for part in per_token_parts for entry in part]
        return total

    def score(self, text: str, *, per_token: bool = False) -> ScoreResult:
        """Score text as one stream: every line ends in ``<eos>`` (counted), the state carries across lines.

        Right: ``lm.score("the stock market fell\\nshares rose")`` -> 6 + 1 + 2 + 1 = ... tokens.
        For independent sentences (KenLM's sentence scores), use ``score_lines``."""
        return self.score_tokens(self.tokenizer.text_tokens(text), per_token=per_token)

    def token_logprobs(self, text: str) -> list[tuple[str, float, bool]]:
        """(token as scored, natural-log probability, out of vocabulary) for every token of ``text``;
        they sum to ``-score(text).nll``."""
        result = self.score(text, per_token=True)
        assert result.per_token is not None
        return result.per_token

    def score_lines(self, lines: Iterable[str], *, batch_size: int = 64, per_token: bool = False,
                    progress: Callable[[int], None] | None = None) -> list[ScoreResult]:
        """Each line as its own sentence (fresh state, predicted from ``<eos>``, ending in ``<eos>``),
        many lines per onnxruntime call. Blank lines get an empty result (0 tokens)."""
        tokenized = [self.tokenizer.line_tokens(line) for line in lines]
        return self.score_sequences(tokenized, batch_size=batch_size, per_token=per_token, progress=progress)

    def score_sequences(self, sequences: Sequence[Sequence[Token]], *, batch_size: int = 64, per_token: bool = False,
                        progress: Callable[[int], None] | None = None,
                        cancelled: Callable[[], bool] | None = None) -> list[ScoreResult]:
        """Score independent token sequences, each from a fresh state and predicted from ``<eos>``,
        up to ``batch_size`` of them per onnxruntime call. ``cancelled`` is polled between calls;
        when it returns True the work stops with ``Cancelled``."""
        logprobs = self.sequence_logprobs([[t.id for t in seq] for seq in sequences], batch_size=batch_size,
                                          progress=progress, cancelled=cancelled)
        return [self.result_of(seq, lp, per_token=per_token) for seq, lp in zip(sequences, logprobs, strict=True)]

    def result_of(self, tokens: Sequence[Token], logprobs: np.ndarray, *, per_token: bool = False) -> ScoreResult:
        """A ScoreResult from tokens and their log-probabilities."""
        lp = np.asarray(logprobs, np.float64)
        oov = np.fromiter((t.oov for t in tokens), bool, len(tokens))
        return ScoreResult(len(tokens), int(oov.sum()), -float(lp.sum()), -float(lp[~oov].sum()), self.level,
                           [(t.text, float(v), t.oov) for t, v in zip(tokens, lp, strict=True)] if per_token else None)

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 64,
                          progress: Callable[[int], None] | None = None,
                          cancelled: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """Log-probabilities (float32, one per token) of each id sequence, scored independently.

        Sequences are sorted by length and batched, ``batch_size`` columns per call; a long
        sequence costs the others nothing past their own end (``_score_ids`` drops ended columns)."""
        return self.sequence_logprobs_from(sequences, batch_size=batch_size, progress=progress, cancelled=cancelled)[0]

    def sequence_logprobs_from(self, sequences: Sequence[Sequence[int]], start: State | None = None,
                               rows: Sequence[int] | np.ndarray | None = None, *, batch_size: int = 64,
                               final_states: bool = False, progress: Callable[[int], None] | None = None,
                               cancelled: Callable[[], bool] | None = None) -> tuple[list[np.ndarray], State | None]:
        """``sequence_logprobs`` from given states, and optionally the state each sequence ends in.

        Sequence i starts from row ``rows[i]`` of ``start`` (row 0 when ``rows`` is None; the fresh
        state when ``start`` is None) and, as in ``sequence_logprobs``, reads ``<eos>`` first. With
        ``final_states``, also returns one state row per sequence: the state after reading all of it
        but its last token (which is predicted, not read). For a sequence that ends in ``<eos>``, that
        is exactly where the next sentence starts, so context carries across sentences:

            lp, st = lm.sequence_logprobs_from([prev + [eos]], final_states=True)
            lp2, _ = lm.sequence_logprobs_from([cur + [eos]], st)   # == scoring "prev <eos> cur <eos>"

        Sequences are sorted by length and batched ``batch_size`` columns per call, as in
        ``sequence_logprobs``."""
        if batch_size < 1:
            raise RnnlmError(f"batch size must be >= 1, got {batch_size}")
        n = len(sequences)
        base = start if start is not None else self.initial_state(1)
        row_of = np.zeros(n, np.int64) if rows is None else np.asarray(rows, np.int64)
        if len(row_of) != n or (n and (row_of.min() < 0 or row_of.max() >= base.batch)):
            raise RnnlmError(f"rows must give one row of the start state (batch {base.batch}) per sequence")
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * n
        finals = {s["input"]: np.zeros((n, s["size"]), np.float32) for s in self.states} if final_states else None
        order = sorted(range(n), key=lambda i: len(sequences[i]))
        for begin in range(0, n, batch_size):
            idx = order[begin : begin + batch_size]
            inputs, targets, lengths = chunks.padded(sequences, idx, self.eos_id)
            first = State({k: v[row_of[idx]] for k, v in base.arrays.items()})
            picked, state = self._score_ids(inputs, targets, lengths, first, cancelled=cancelled)
            for b, i in enumerate(idx):
                out[i] = picked[: lengths[b], b].copy()
            if finals is not None:
                for k, v in state.arrays.items():
                    finals[k][idx] = v
            if progress:
                progress(len(idx))
        return out, (State(finals) if finals is not None else None)

    # ------------------------------------------------------------------ contexts (sessions)
    def context(self) -> Context:
        """A context that has read nothing: its first token is predicted from ``<eos>``."""
        return Context(self.initial_state(1), self.eos_id, 0)

    def prompt_tokens(self, text: str, *, mid_line: bool = False) -> list[Token]:
        """Tokens of text that continues a context: every line that ends in "\n" ends in
        ``<eos>`` (as ``text_tokens`` ends each line), the last line only where it ends in "\n"
        (text cut at a space and sent in two pieces reads as the whole). ``mid_line``: the context
        has read part of a line, which a newline before any word of ``text`` ends."""
        check_text(text, "text")
        first, newline, rest = text.partition("\n")
        if mid_line and newline and not self.tokenizer.line_tokens(first.rstrip("\r"), eos=False):
            return [Token(self.tokenizer.eos, self.eos_id, False), *self.prompt_tokens(rest)]
        head, newline, tail = text.rpartition("\n")
        tokens = self.tokenizer.text_tokens(head) if newline else []
        return tokens + self.tokenizer.line_tokens(tail.rstrip("\r"), eos=False)

    def feed(self, ctx: Context, ids: Sequence[int], *,
             cancelled: Callable[[], bool] | None = None) -> tuple[np.ndarray, Context]:
        """Read ``ids`` after ``ctx`` through the scoring graph, a chunk of positions per call:
        the log-probability of each id (float64) and the context after them. ``ctx`` is unchanged."""
        if not len(ids):
            return np.zeros(0, np.float64), ctx.fork()
        arr = np.asarray(ids, np.int64)
        inputs = np.concatenate([[ctx.last], arr[:-1]])  # (L,): each id is predicted from the one before
        picked, state = self._score_ids(inputs[:, None], arr[:, None], np.array([len(arr)]), ctx.state, cancelled)
        return picked[:, 0].astype(np.float64), Context(state, int(arr[-1]), ctx.tokens + len(arr))

    def advance(self, ctx: Context, ids: Sequence[int], *, cancelled: Callable[[], bool] | None = None) -> Context:
        """Read ``ids`` after ``ctx`` when their log-probabilities are not wanted (a prompt): the
        context after them, as ``feed`` gives it; ``ctx`` is unchanged. A prompt of at least one
        advance chunk goes through the advance graph (no vocabulary projection: several times
        faster); a shorter one, or any with a bundle exported without that graph, through ``feed``.
        The choice depends on the length alone, so a request's answer does not depend on others."""
        if not self.advance_chunk or len(ids) < self.advance_chunk:
            return self.feed(ctx, ids, cancelled=cancelled)[1]
        arr = np.asarray(ids, np.int64)
        inputs = np.concatenate([[ctx.last], arr[:-1]])  # each id is read after the one before
        state = self._advance_ids(inputs[:, None], np.array([len(arr)]), ctx.state, cancelled)
        return Context(state, int(arr[-1]), ctx.tokens + len(arr))

    def score_context(self, ctx: Context, text: str, *, per_token: bool = False,
                      cancelled: Callable[[], bool] | None = None) -> tuple[ScoreResult, Context]:
        """Score ``text`` as the continuation of ``ctx`` (``prompt_tokens``): its result and the
        context after it. Scoring a document in pieces this way equals ``score`` of the whole.

        Right: ``r1, c = lm.score_context(lm.context(), "the stock ")``, then
        ``r2, c = lm.score_context(c, "market fell\n")`` -> r1.nll + r2.nll == lm.score("the stock market fell").nll."""
        tokens = self.prompt_tokens(text, mid_line=ctx.last != self.eos_id)
        lp, after = self.feed(ctx, [t.id for t in tokens], cancelled=cancelled)
        return self.result_of(tokens, lp, per_token=per_token), after

    def next_logprobs(self, ctx: Context, num_samples: int = 1) -> tuple[np.ndarray, State]:
        """The distribution of the token after ``ctx`` (num_samples, vocab), and the state that has
        read everything: what sampling starts from."""
        return self.step_ids(ctx.state.repeat(num_samples), np.full(num_samples, ctx.last, np.int64))

    def position_logprobs(self, ctx: Context, ids: Sequence[int], *,
                          cancelled: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
        """The full distribution (vocab,) each of ``ids`` was predicted from, one step-graph call per
        id (for top-k alternatives; ``feed`` gives the ids' own log-probabilities far faster)."""
        state, prev = ctx.state, ctx.last
        for tid in ids:
            if cancelled is not None and cancelled():
                raise Cancelled("the request was cancelled")
            logprobs, state = self.step_ids(state, np.array([prev], np.int64))
            yield logprobs[0]
            prev = int(tid)

    @property
    def bundle_sha256(self) -> str:
        """The sha256 of the bundle's manifest, which holds the sha256 of every file: its identity."""
        if "_bundle_sha256" not in self.__dict__:
            from rnnlm.fsutil import sha256

            self.__dict__["_bundle_sha256"] = sha256(self.bundle.path / "manifest.json")
        return str(self.__dict__["_bundle_sha256"])

    def export_context(self, ctx: Context) -> dict[str, Any]:
        """A context as JSON-ready data that ``import_context`` takes back, here or in another process
        with the same bundle (the format: ``rnnlm.serve.portable``)."""
        return portable.export_context(ctx, self.bundle_sha256, self.states)

    def import_context(self, exported: Any) -> Context:
        """The context ``export_context`` wrote; ``StateError`` with the reason when it comes from
        another bundle, has other shapes, was altered or truncated, or holds a value that is not finite."""
        return portable.import_context(exported, self.bundle_sha256, self.states, len(self.vocab))

    # ------------------------------------------------------------------ generation
    def generate_ids(self, prompt: str, *, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
                     stop_at_eos: bool = True, cancelled: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
        """Yield the next token id of each sample, (num_samples,), one step at a time.

        The prompt (``prompt_tokens``: a line that ends in "\n" ends in ``<eos>``) is read by
        ``advance`` (the advance graph for a long prompt, else the scoring graph, a chunk at a time),
        then sampling runs on the step graph. ``cancelled`` is
        polled between calls, the prompt's included; True stops with ``Cancelled``."""
        self.check_generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            num_samples=num_samples, seed=seed)
        ctx = self.advance(self.context(), [t.id for t in self.prompt_tokens(prompt)], cancelled=cancelled)
        for ids, _ in self.sample_from(ctx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, num_samples=num_samples, stop_at_eos=stop_at_eos,
                                       cancelled=cancelled):
            yield ids

    def sample_from(self, ctx: Context, *, max_new_tokens: int = 50, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    num_samples: int = 1, stop_at_eos: bool = True,
                    cancelled: Callable[[], bool] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sample continuations of ``ctx`` (left unchanged): yields each step's token ids
        (num_samples,) with the log-probabilities (num_samples, vocab) they were drawn from.
        A sample that ended at ``<eos>`` keeps yielding ``<eos>`` until all have ended."""
        from rnnlm.serve.sampling import sample_steps

        def check() -> None:
            if cancelled is not None and cancelled():
                raise Cancelled("the request was cancelled")

        check()
        logprobs, state = self.next_logprobs(ctx, num_samples)
        if self.bind_state:
            step = BoundStepper(self.session("step"), self.states, state).step
        else:
            def step(ids: np.ndarray) -> np.ndarray:
                nonlocal state
                out, state = self.step_ids(state, ids)
                return out
        yield from sample_steps(logprobs, step, np.random.default_rng(seed), eos_id=self.eos_id,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                stop_at_eos=stop_at_eos, check=check)

    def check_generate(self, prompt: str, *, max_new_tokens: int = 50, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
                       seed: int | None = None, **_: Any) -> None:
        """Refuse bad generation arguments with one ``RnnlmError``: what ``generate`` checks first,
        and what the HTTP server checks before it queues a request."""
        from rnnlm.serve.sampling import check_sampling

        check_text(prompt, "prompt")
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       vocab_size=len(self.vocab), num_samples=num_samples, cap=MAX_NEW_TOKENS, seed=seed)

    def generate(self, prompt: str = "", *, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, num_samples: int = 1,
                 stop_at_eos: bool = True) -> list[str]:
        """Continue ``prompt``; returns the generated text of each sample (the prompt not included).

        temperature 0 is greedy (argmax); ``seed`` makes sampling repeatable."""
        columns = list(self.generate_ids(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed, num_samples=num_samples, stop_at_eos=stop_at_eos))
        return [self.detokenize(ids) for ids in self.sample_ids(columns, num_samples, stop_at_eos=stop_at_eos)]

    def sample_ids(self, columns: Sequence[np.ndarray], num_samples: int, *, stop_at_eos: bool = True) -> list[list[int]]:
        """The token ids of each sample from ``generate_ids``' columns, cut before ``<eos>`` when stopping there."""
        from rnnlm.serve.sampling import cut_samples

        return cut_samples(columns, num_samples, self.eos_id if stop_at_eos else None)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.detokenize(self.vocab[i] for i in ids)
