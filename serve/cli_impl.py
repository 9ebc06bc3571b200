"""What ``rnnlm score`` and ``rnnlm generate`` do, kept out of the CLI module so it stays thin.
Results go to stdout (text, or JSON lines with --json); notes and progress go to stderr."""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rnnlm.serve.bundle import find_bundle
from rnnlm.serve.runtime import LanguageModel, ScoreResult

from rnnlm.text import TextError, Token, check_text, lines_of, open_input

OOV_MARK = "\t<oov>"
GROUP_LINES = 8192  # lines read and scored together by --per-line


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(model: Path | None, *, device: str, threads: int | None, raw: bool = False) -> LanguageModel:
    path = find_bundle(model)
    if model is None:
        note(f"using model {path} (the newest bundle under ./models; pass --model to choose)")
    lm = LanguageModel.load(path, device=device, threads=threads, raw=raw, eager=False)
    if lm.device_note:
        note(lm.device_note)
    return lm


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def summary_text(r: ScoreResult) -> str:
    text = (f"tokens {r.tokens:,}  oov {r.oov:,}  nll {r.nll:.3f} nats  ppl {_fmt(r.ppl)}  "
            f"ppl excluding oov {_fmt(r.ppl_in_vocab)}")
    return text + (f"  bpc {r.bpc:.4f}" if r.level == "char" else "")


def _progress(name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    return Progress(SpinnerColumn(), TextColumn(f"scoring {name}"), TextColumn("{task.completed:,} tokens"),
                    transient=True, console=Console(stderr=True))


def _emit_line(out: Any, i: int, r: ScoreResult, total: ScoreResult, *, as_json: bool, per_token: bool) -> ScoreResult:
    """Write one line's result; return the running total with it added."""
    total = total.plus(r)
    if r.tokens == 0:  # a blank line, where the model skips them
        return total
    if as_json:
        row: dict[str, Any] = {"line": i, **r.as_dict()}
        if per_token and r.per_token is not None:
            row["per_token"] = [{"token": t, "logprob": lp, "oov": o} for t, lp, o in r.per_token]
        out.write(json.dumps(row) + "\n")
    else:
        out.write(f"line {i}: {summary_text(r)}\n")
        if per_token and r.per_token is not None:
            out.write("".join(f"  {t}\t{lp:.4f}{OOV_MARK if o else ''}\n" for t, lp, o in r.per_token))
    return total


class WordCounter:
    """Passes tokens through, counting those that are not ``<eos>``: a file of blank lines has
    ``<eos>`` tokens but nothing to score."""

    def __init__(self, tokens: Iterable[Token], eos_id: int) -> None:
        self.tokens, self.eos_id, self.words = tokens, eos_id, 0

    def __iter__(self) -> Iterator[Token]:
        for t in self.tokens:
            self.words += t.id != self.eos_id
            yield t


def score_command(file: str, *, model: Path | None, per_line: bool, per_token: bool, raw: bool, batch_size: int,
                  device: str, threads: int | None, as_json: bool, fmt: str = "text", debug: int = 0,
                  bos: bool = True, eos: bool = True) -> None:
    from rnnlm.serve.ngram_formats import check_options, ngram_score_command

    if batch_size < 1:
        raise TextError(f"--batch-size must be >= 1, got {batch_size}")
    check_options(fmt, debug=debug, bos=bos, eos=eos, per_line=per_line, per_token=per_token, as_json=as_json)
    source, name = open_input(file)  # refuse a missing file before loading the model
    lm = load(model, device=device, threads=threads, raw=raw)
    if fmt != "text":  # SRILM's or KenLM's layout
        with source:
            ngram_score_command(lm, source, name, fmt_name=fmt, debug=debug, bos=bos, eos=eos, batch_size=batch_size)
        return
    out = sys.stdout
    with source:
        if per_line:
            total, words = ScoreResult(0, 0, 0.0, 0.0, lm.level), False
            numbered = enumerate(lines_of(source, name), 1)
            # Groups of lines stream through (bounded memory); within a group, score_lines batches
            # lines of similar length together.
            for group in iter(lambda: list(itertools.islice(numbered, GROUP_LINES)), []):
                words = words or any(line.strip() for _, line in group)
                results = lm.score_lines([line for _, line in group], batch_size=batch_size, per_token=per_token)
                for (i, _), r in zip(group, results, strict=True):
                    total = _emit_line(out, i, r, total, as_json=as_json, per_token=per_token)
            if not words:
                raise TextError(f"{name} is empty or only whitespace: nothing to score")
        else:
            def on_block(tokens: list[Token], lp: np.ndarray) -> None:
                if as_json:
                    out.write("".join(json.dumps({"token": t.text, "logprob": float(v), "oov": t.oov}) + "\n"
                                      for t, v in zip(tokens, lp, strict=True)))
                else:
                    out.write("".join(f"{t.text}\t{v:.4f}{OOV_MARK if t.oov else ''}\n" for t, v in zip(tokens, lp, strict=True)))

            counter = WordCounter(lm.tokenizer.stream(source, name), lm.eos_id)
            bar = _progress(name, sys.stderr.isatty() and not per_token)
            if bar is not None:
                with bar:
                    task = bar.add_task("", total=None)
                    total = lm.score_tokens(counter, progress=lambda n: bar.advance(task, n),
                                            on_block=on_block if per_token else None)
            else:
                total = lm.score_tokens(counter, on_block=on_block if per_token else None)
            if counter.words == 0:
                raise TextError(f"{name} is empty or only whitespace: nothing to score")
    if total.oov:
        note(f"{total.oov:,} of {total.tokens:,} tokens are out of the model's vocabulary (scored as <unk>)")
    if as_json:
        out.write(json.dumps({"total": True, "model": str(lm.bundle.path), **total.as_dict()}) + "\n")
    else:
        out.write(summary_text(total) + "\n")


def generate_command(prompt: str, *, model: Path | None, max_tokens: int, temperature: float, top_k: int | None,
                     top_p: float | None, seed: int | None, num_samples: int, stop: bool, raw: bool, device: str,
                     threads: int | None, as_json: bool) -> None:
    check_text(prompt, "--prompt")  # before the model loads: bad input costs nothing
    lm = load(model, device=device, threads=threads, raw=raw)
    kwargs = dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  num_samples=num_samples, stop_at_eos=stop)
    lm.check_generate(prompt, **kwargs)  # every setting checked before anything is printed
    prompt_tokens = lm.tokenizer.line_tokens(prompt, eos=False)
    unknown = sum(t.oov for t in prompt_tokens)
    if unknown:
        note(f"{unknown} of {len(prompt_tokens)} prompt tokens are out of the vocabulary (read as <unk>)")
    if as_json or num_samples > 1:
        samples = lm.generate(prompt, **kwargs)
        if as_json:
            sys.stdout.write(json.dumps({"prompt": prompt, "samples": samples, "seed": seed}) + "\n")
        else:
            sys.stdout.write("".join(f"{prompt} {s}".strip() + "\n" for s in samples))
        return
    # One sample: stream each token as it is produced, each piece as the tokenizer joins it to the text before.
    sys.stdout.write(prompt)
    before = prompt
    for ids in lm.generate_ids(prompt, **kwargs):
        tid = int(ids[0])
        if stop and tid == lm.eos_id:
            break
        before = lm.tokenizer.piece(lm.vocab[tid], before)
        sys.stdout.write(before)
        sys.stdout.flush()
    sys.stdout.write("\n")
