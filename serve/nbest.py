"""N-best lists in the formats ASR and MT toolkits write, read one utterance at a time.

Every reader yields ``Utterance`` objects whose hypotheses carry a key (Kaldi's ``<uttid>-<n>``;
the other formats get one made the same way), the words as given, and the scores the format
itself holds, already turned into costs in nats (−ln P, lower is better):

| format | a line                                  | scores it holds                        |
|--------|-----------------------------------------|----------------------------------------|
| kaldi  | ``<uttid>-<n> w1 w2 ...``               | none (``--scores NAME=FILE`` add them) |
| srilm  | ``ascore lscore nwords w1 w2 ...``      | am = −ascore·ln 10, lm = −lscore·ln 10 |
| nemo   | ``text<TAB>score``, beam-size rows each | am = −score (a natural-log score)      |
| lines  | ``w1 w2 ...`` (``--group`` names utts)  | none                                   |

Memory holds one utterance (and one block of a score file) at a time, whatever the file size.
Bad input raises ``NbestError`` naming the file and line.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rnnlm.errors import RnnlmError
from rnnlm.text import lines_of, open_input

FORMATS = ("kaldi", "srilm", "nemo", "lines")
LN10 = math.log(10)
KALDI_KEY = re.compile(r"^(.+)-(\d+)$")

Lines = Iterator[tuple[int, str]]  # (line number from 1, text)


class NbestError(RnnlmError):
    """An n-best list, score file or companion file that cannot be read as its format says."""


@dataclass
class Hypothesis:
    key: str  # <uttid>-<n>
    words: list[str]  # as given (the tokenizer normalizes them when scoring)
    where: str  # "file:line", for error messages
    scores: dict[str, float] = field(default_factory=dict)  # costs in nats, by name (am, lm, ...)
    nwords: int | None = None  # the word count the format states (SRILM), else len(words)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def word_count(self) -> int:
        return len(self.words) if self.nwords is None else self.nwords


@dataclass
class Utterance:
    id: str
    hyps: list[Hypothesis]
    where: str  # where its first hypothesis was read


def numbered_lines(path: str) -> tuple[Lines, str]:
    """The lines of a file (or ``-``), numbered from 1; invalid UTF-8 and binary data are refused
    as they are met. The file stays open until the iterator is exhausted."""
    source, name = open_input(path)

    def gen() -> Lines:
        with source:
            held: tuple[int, str] | None = None  # one line late: the "" after a final newline is no line
            for numbered in enumerate(lines_of(source, name), 1):
                if held is not None:
                    yield held
                held = numbered
            if held is not None and held[1]:
                yield held

    return gen(), name


def peek_first(lines: Lines, name: str) -> tuple[str, Lines]:
    """The first non-blank line and the lines again (nothing consumed); refuses an empty file."""
    buffered: list[tuple[int, str]] = []
    for no, text in lines:
        buffered.append((no, text))
        if text.strip():
            return text, itertools.chain(buffered, lines)
    raise NbestError(f"{name} is empty: no hypotheses to rescore")


def detect_format(first: str) -> str:
    """Guess a format from the first non-blank line: NeMo rows have a tab and a numeric last
    field; SRILM rows start with two numbers and a count; a line naming an existing file is an
    SRILM list of files; ``<uttid>-<n>`` first is Kaldi; anything else is plain lines."""
    if "\t" in first and _is_float(first.rsplit("\t", 1)[1]):
        return "nemo"
    fields = first.split()
    if len(fields) >= 3 and _is_float(fields[0]) and _is_float(fields[1]) and fields[2].isdigit():
        return "srilm"
    if Path(first.strip()).is_file():
        return "srilm"
    if fields and KALDI_KEY.match(fields[0]):
        return "kaldi"
    return "lines"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise NbestError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise NbestError(f"{where}: {what} is {text}; scores must be finite")
    return value


class Grouper:
    """Collects hypotheses into utterances as they arrive; an utterance id that comes back after
    another one is refused, as the lists must be grouped for streaming."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[str] = set()
        self.keys: set[str] = set()  # of the current utterance
        self.current: Utterance | None = None

    def add(self, utt: str, hyp: Hypothesis) -> Utterance | None:
        """Add ``hyp`` to utterance ``utt``; returns the previous utterance when this one starts a new one."""
        done = None
        if self.current is None or self.current.id != utt:
            if utt in self.seen:
                raise NbestError(f"{hyp.where}: utterance {utt!r} appears again after other utterances; "
                                 "the hypotheses of an utterance must be on consecutive lines")
            self.seen.add(utt)
            self.keys.clear()
            done, self.current = self.current, Utterance(utt, [], hyp.where)
        if hyp.key in self.keys:
            raise NbestError(f"{hyp.where}: hypothesis key {hyp.key!r} appears twice")
        self.keys.add(hyp.key)
        self.current.hyps.append(hyp)
        return done

    def finish(self) -> Utterance | None:
        return self.current


def read_kaldi(lines: Lines, name: str) -> Iterator[Utterance]:
    """Kaldi n-best text: ``<uttid>-<n> w1 w2 ...``, grouped by the key before the last ``-``."""
    group = Grouper(name)
    for no, text in lines:
        fields = text.split()
        if not fields:
            continue
        m = KALDI_KEY.match(fields[0])
        if m is None:
            raise NbestError(f"{name}:{no}: expected '<uttid>-<n> words...', but the key {fields[0]!r} "
                             "does not end in -<number>")
        done = group.add(m.group(1), Hypothesis(fields[0], fields[1:], f"{name}:{no}"))
        if done is not None:
            yield done
    last = group.finish()
    if last is not None:
        yield last


def read_srilm_file(lines: Lines, name: str, utt: str) -> Utterance:
    """One SRILM n-best file (format 3): ``ascore lscore nwords w1 ...``, log10 scores."""
    hyps: list[Hypothesis] = []
    for no, text in lines:
        fields = text.split()
        if not fields:
            continue
        where = f"{name}:{no}"
        if len(fields) < 3 or not fields[2].isdigit():
            raise NbestError(f"{where}: expected 'ascore lscore nwords w1 w2 ...' (SRILM n-best format 3)")
        ascore, lscore = _number(fields[0], where, "ascore"), _number(fields[1], where, "lscore")
        hyps.append(Hypothesis(f"{utt}-{len(hyps) + 1}", fields[3:], where,
                               {"am": -ascore * LN10, "lm": -lscore * LN10}, int(fields[2])))
    if not hyps:
        raise NbestError(f"{name}: an utterance with 0 hypotheses")
    return Utterance(utt, hyps, f"{name}:1")


def srilm_utt_id(path: str) -> str:
    """The utterance id of an SRILM n-best file: its name without directories and extensions
    such as ``.gz`` or ``.nbest`` (the convention of SRILM's ``-nbest-files`` lists)."""
    return Path(path).name.split(".")[0] or Path(path).name


def read_srilm(lines: Lines, name: str) -> Iterator[Utterance]:
    """A single SRILM n-best file, or a list file naming one per utterance."""
    first, lines = peek_first(lines, name)
    if detect_format(first) == "srilm" and not Path(first.strip()).is_file():
        yield read_srilm_file(lines, name, srilm_utt_id(name))
        return
    base = Path(name).parent
    seen: set[str] = set()
    for no, text in lines:
        entry = text.strip()
        if not entry:
            continue
        path = entry if Path(entry).is_file() or not (base / entry).is_file() else str(base / entry)
        if not Path(path).is_file():
            raise NbestError(f"{name}:{no}: {entry}: no such n-best file")
        utt = srilm_utt_id(path)
        if utt in seen:
            raise NbestError(f"{name}:{no}: utterance {utt!r} is listed twice")
        seen.add(utt)
        sub, sub_name = numbered_lines(path)
        yield read_srilm_file(sub, sub_name, utt)


def read_nemo(lines: Lines, name: str, beam_size: int | None) -> Iterator[Utterance]:
    """NeMo's beam TSV: ``text<TAB>score`` rows, ``beam_size`` per utterance, in utterance order.
    Utterances are numbered from 0, as NeMo's rescorer indexes them."""
    if beam_size is None or beam_size < 1:
        raise NbestError("--format nemo needs --beam-size N (the rows per utterance), N >= 1")
    rows = (row for row in lines if row[1].strip())
    for index in itertools.count():
        block = list(itertools.islice(rows, beam_size))
        if not block:
            return
        if len(block) < beam_size:
            raise NbestError(f"{name}: the last utterance ({index}) has {len(block)} rows, not --beam-size {beam_size}")
        hyps: list[Hypothesis] = []
        for n, (no, text) in enumerate(block, 1):
            where = f"{name}:{no}"
            if "\t" not in text:
                raise NbestError(f"{where}: expected 'text<TAB>score' (NeMo beam TSV)")
            words, score = text.rsplit("\t", 1)
            hyps.append(Hypothesis(f"{index}-{n}", words.split(), where, {"am": -_number(score, where, "score")}))
        yield Utterance(str(index), hyps, hyps[0].where)


def read_lines(lines: Lines, name: str, group: str | None) -> Iterator[Utterance]:
    """One hypothesis per line; ``group`` names a file with the utterance id of each line (else
    every line is its own utterance, named by its line number). A blank line is an empty hypothesis."""
    grouper = Grouper(name)
    ids: Iterator[tuple[int, str]] | None = None
    gname = ""
    if group is not None:
        ids, gname = numbered_lines(group)
    for no, text in lines:
        utt = str(no)
        if ids is not None:
            g = next(ids, None)
            if g is None:
                raise NbestError(f"{gname} has {no - 1} lines, but {name} has more (line {no})")
            utt = g[1].strip()
            if not utt or len(utt.split()) != 1:
                raise NbestError(f"{gname}:{g[0]}: expected one utterance id, got {g[1]!r}")
        count = len(grouper.current.hyps) + 1 if grouper.current is not None and grouper.current.id == utt else 1
        done = grouper.add(utt, Hypothesis(f"{utt}-{count}", text.split(), f"{name}:{no}"))
        if done is not None:
            yield done
    if ids is not None and next(ids, None) is not None:
        raise NbestError(f"{gname} has more lines than {name}")
    last = grouper.finish()
    if last is not None:
        yield last


def read_nbest(path: str, fmt: str | None = None, *, beam_size: int | None = None,
               group: str | None = None) -> tuple[str, Iterator[Utterance]]:
    """The format (given or detected) and the utterances of an n-best file, streamed."""
    if fmt is not None and fmt not in FORMATS:
        raise NbestError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    lines, name = numbered_lines(path)
    first, lines = peek_first(lines, name)
    fmt = fmt or detect_format(first)
    readers = {"kaldi": lambda: read_kaldi(lines, name), "srilm": lambda: read_srilm(lines, name),
               "nemo": lambda: read_nemo(lines, name, beam_size), "lines": lambda: read_lines(lines, name, group)}
    return fmt, readers[fmt]()


class ScoreFile:
    """A Kaldi score file (``<key> <value>``, costs) read alongside the n-best list, one
    utterance's block at a time: the blocks must come in the n-best list's utterance order, the
    keys within a block in any order."""

    def __init__(self, label: str, path: str) -> None:
        self.label = label
        self.lines, self.name = numbered_lines(path)
        self.pending: tuple[int, str, str, float] | None = None  # (line, utt, key, value)
        self.any = False

    def _next(self) -> tuple[int, str, str, float] | None:
        for no, text in self.lines:
            fields = text.split()
            if not fields:
                continue
            where = f"{self.name}:{no}"
            if len(fields) != 2:
                raise NbestError(f"{where}: expected '<key> <value>' (Kaldi score file {self.label}=)")
            m = KALDI_KEY.match(fields[0])
            utt = m.group(1) if m else fields[0]
            self.any = True
            return no, utt, fields[0], _number(fields[1], where, "value")
        return None

    def take(self, utt: Utterance) -> None:
        """Read this utterance's block and put each value into its hypothesis' scores."""
        found: dict[str, float] = {}
        if self.pending is None:
            self.pending = self._next()
        while self.pending is not None and self.pending[1] == utt.id:
            found[self.pending[2]] = self.pending[3]
            self.pending = self._next()
        keys = [h.key for h in utt.hyps]
        missing = [k for k in keys if k not in found]
        extra = sorted(set(found) - set(keys))
        if missing or extra:
            raise NbestError(self._mismatch(utt, missing, extra))
        for h in utt.hyps:
            h.scores[self.label] = found[h.key]

    def _mismatch(self, utt: Utterance, missing: list[str], extra: list[str]) -> str:
        parts = []
        if missing:
            parts.append(f"no score for {_few(missing)}")
        if extra:
            parts.append(f"scores for keys not in the n-best list: {_few(extra)}")
        if missing and not extra and self.pending is not None:
            parts.append(f"line {self.pending[0]} has key {self.pending[2]!r}")
        return f"{self.label}={self.name}: utterance {utt.id!r}: " + "; ".join(parts)

    def finish(self) -> None:
        """Refuse keys left over once the n-best list has ended."""
        left = self.pending or self._next()
        if left is not None:
            raise NbestError(f"{self.label}={self.name}:{left[0]}: key {left[2]!r} is not in the n-best list")
        if not self.any:
            raise NbestError(f"{self.label}={self.name} is empty")


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def with_scores(utterances: Iterable[Utterance], files: list[ScoreFile]) -> Iterator[Utterance]:
    """The utterances with each score file's values added, matched by key."""
    for utt in utterances:
        for f in files:
            f.take(utt)
        yield utt
    for f in files:
        f.finish()


def read_table(path: str, what: str) -> dict[str, str]:
    """A Kaldi table ``<uttid> <rest of line>`` (``text``, ``utt2spk``) as a dict."""
    lines, name = numbered_lines(path)
    table: dict[str, str] = {}
    for no, text in lines:
        if not text.strip():
            continue
        key, *rest_ = text.split(maxsplit=1)
        rest = rest_[0] if rest_ else ""
        if key in table:
            raise NbestError(f"{name}:{no}: {what} has utterance {key!r} twice")
        table[key] = rest.strip()
    if not table:
        raise NbestError(f"{name} is empty: no {what}")
    return table
