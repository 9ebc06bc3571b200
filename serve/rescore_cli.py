"""What ``rnnlm rescore`` does: read an n-best list, rescore it, write what was asked.

Nothing is half-written: standard output is spooled to a temporary file and copied out only
when the whole list has been rescored, and files are written atomically (temp file, rename).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from rnnlm.serve.nbest import NbestError, ScoreFile, read_nbest, read_table, with_scores
from rnnlm.serve.rescore import Rescorer, ScoredUtterance, Weights
from rnnlm.serve.tuning import Collector, best_point, grid_search, parse_range

from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_open


@dataclass
class RescoreOptions:
    """Everything ``rnnlm rescore`` takes besides the model (see ``rnnlm rescore --help``)."""

    nbest: str
    fmt: str | None = None
    scores: list[str] = field(default_factory=list)  # NAME=FILE
    weights: list[str] = field(default_factory=list)  # NAME=W
    lm_weight: float = 1.0
    word_penalty: float = 0.0
    interpolate: float | None = None
    ngram_score: str = "lm"
    beam_size: int | None = None
    group: str | None = None
    carry_over: str = "never"
    utt2spk: str | None = None
    ref: str | None = None
    grid_lm_weight: str = "0:2:0.1"
    grid_word_penalty: str = "-2:2:0.5"
    grid_interpolate: str = "0:1:0.1"
    costs: str | None = None
    totals: str | None = None
    best: str | None = None
    as_json: bool = False
    batch_size: int = 128


def pairs(values: list[str], what: str) -> dict[str, str]:
    """``NAME=VALUE`` options as a dict, refusing a malformed or repeated name."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise RnnlmError(f"{what} takes NAME=VALUE, got {v!r}")
        if name in out:
            raise RnnlmError(f"{what} {name} is given twice")
        out[name] = value
    return out


def weights_of(o: RescoreOptions) -> Weights:
    named = {}
    for name, text in pairs(o.weights, "--weight").items():
        try:
            named[name] = float(text)
        except ValueError:
            raise RnnlmError(f"--weight {name}={text}: not a number") from None
    return Weights(named, o.lm_weight, o.word_penalty, o.interpolate, o.ngram_score).check()


class Outputs:
    """Standard output spooled to a temporary file, plus the optional files, all committed at the end."""

    def __init__(self, stack: contextlib.ExitStack, paths: dict[str, str | None]) -> None:
        self.stdout: IO[str] = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
        self.files: dict[str, IO[str]] = {k: stack.enter_context(atomic_open(p, "w")) for k, p in paths.items() if p}

    def write(self, name: str, text: str) -> None:
        f = self.files.get(name)
        if f is not None:
            f.write(text)

    def commit_stdout(self) -> None:
        self.stdout.seek(0)
        shutil.copyfileobj(self.stdout, sys.stdout)
        sys.stdout.flush()


def utterance_json(u: ScoredUtterance) -> str:
    return json.dumps({"utt": u.id, "best": u.best_hyp.hyp.key, "text": u.best_hyp.hyp.text, "hypotheses": [
        {"key": s.hyp.key, "text": s.hyp.text, "words": s.hyp.word_count, "tokens": s.tokens, "oov": s.oov,
         "lm_cost": s.cost, "scores": s.hyp.scores, "total": s.total} for s in u.hyps]})


def write_utterance(out: Outputs, u: ScoredUtterance, *, as_json: bool, tuning: bool) -> None:
    best_line = f"{u.id} {u.best_hyp.hyp.text}".rstrip() + "\n"
    out.write("costs", "".join(f"{s.hyp.key} {s.cost!r}\n" for s in u.hyps))
    out.write("totals", "".join(f"{s.hyp.key} {s.total!r}\n" for s in u.hyps))
    out.write("best", best_line)
    if not tuning:
        out.stdout.write(utterance_json(u) + "\n" if as_json else best_line)


def write_grid(out: IO[str], c: Collector, o: RescoreOptions, weights: Weights) -> None:
    lambdas = parse_range(o.grid_interpolate, "--grid-interpolate") if weights.interpolate is not None else None
    points = grid_search(c, parse_range(o.grid_lm_weight, "--grid-lm-weight"),
                         parse_range(o.grid_word_penalty, "--grid-word-penalty"), lambdas)
    best = best_point(points)
    if o.as_json:
        out.write(json.dumps({"ref_words": c.ref_words, "grid": [asdict(p) for p in points], "best": asdict(best)}) + "\n")
        return
    lam = lambdas is not None
    out.write("# lm_weight word_penalty" + (" lambda" if lam else "") + " wer errors/ref_words\n")
    for p in points:
        out.write(f"{p.lm_weight:g} {p.word_penalty:g}" + (f" {p.interpolate:g}" if lam else "")
                  + f" {p.wer:.6f} {p.errors}/{c.ref_words}\n")
    out.write(f"best: lm_weight={best.lm_weight:g} word_penalty={best.word_penalty:g}"
              + (f" interpolate={best.interpolate:g}" if lam else "") + f" wer={best.wer:.6f}\n")


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn

    return Progress(SpinnerColumn(), TextColumn("rescoring"), TextColumn("{task.completed:,} hypotheses"),
                    transient=True, console=Console(stderr=True))


def rescore_stream(rescorer: Rescorer, o: RescoreOptions, out: Outputs, collector: Collector | None,
                   progress: Callable[[int], None] | None) -> tuple[int, int]:
    """Read, rescore and write every utterance; returns (utterances, hypotheses)."""
    fmt, utterances = read_nbest(o.nbest, o.fmt, beam_size=o.beam_size, group=o.group)
    files = [ScoreFile(label, path) for label, path in pairs(o.scores, "--scores").items()]
    n_utt = n_hyp = 0
    for u in rescorer.run(with_scores(utterances, files), progress):
        n_utt, n_hyp = n_utt + 1, n_hyp + len(u.hyps)
        if collector is not None:
            collector.add(u)
        write_utterance(out, u, as_json=o.as_json, tuning=collector is not None)
    return n_utt, n_hyp


def check_paths(o: RescoreOptions) -> None:
    """Refuse unreadable inputs and clashing outputs before the model loads."""
    from rnnlm.text import open_input

    for path in [o.nbest, o.group, o.utt2spk, o.ref, *pairs(o.scores, "--scores").values()]:
        if path is not None and path != "-":
            open_input(path)[0].close()
    outs = [p for p in (o.costs, o.totals, o.best) if p]
    if len(set(outs)) != len(outs):
        raise RnnlmError("--costs, --totals and --best must name different files")
    if o.nbest == "-" and any(p == "-" for p in [o.group, o.utt2spk, o.ref, *pairs(o.scores, "--scores").values()]):
        raise RnnlmError("only one input can be standard input (-)")


def rescore_command(o: RescoreOptions, load_model: Callable[[], Any]) -> None:
    """``rnnlm rescore``: the whole command, its checks first, the model loaded only when they pass."""
    weights = weights_of(o)
    check_paths(o)
    utt2spk = read_table(o.utt2spk, "utt2spk") if o.utt2spk else None
    if utt2spk is not None and any(len(s.split()) != 1 for s in utt2spk.values()):
        raise NbestError(f"{o.utt2spk}: every line must be '<uttid> <speaker>'")
    refs = read_table(o.ref, "reference transcripts") if o.ref else None
    if o.carry_over == "speaker" and utt2spk is None:
        raise RnnlmError("--carry-over speaker needs --utt2spk FILE")
    rescorer = Rescorer(load_model(), weights, carry=o.carry_over, utt2spk=utt2spk, batch_size=o.batch_size)
    collector = Collector(refs, weights) if refs is not None else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out = Outputs(stack, {"costs": o.costs, "totals": o.totals, "best": o.best})
        with _progress_bar(sys.stderr.isatty()) as bar:
            task = bar.add_task("", total=None) if bar is not None else None
            advance = (lambda n: bar.advance(task, n)) if bar is not None else None
            n_utt, n_hyp = rescore_stream(rescorer, o, out, collector, advance)
        if collector is not None:
            collector.check()
            write_grid(out.stdout, collector, o, weights)
        out.commit_stdout()
    seconds = time.perf_counter() - t0
    print(f"rescored {n_hyp:,} hypotheses of {n_utt:,} utterances in {seconds:.1f} s "
          f"({n_hyp / max(seconds, 1e-9):,.0f} hypotheses/s)", file=sys.stderr, flush=True)

