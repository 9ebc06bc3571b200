"""Text to tokens: the one tokenizer that training, evaluation, export and serving all use.

A model's :class:`TextSpec` is chosen when it is trained, stored in its ``config.json`` and in
every bundle's manifest, and applied identically wherever text meets the model:

- Lines end at ``\\n``; a ``\\r`` before it (CRLF) is dropped; a last line without a newline is a
  line; a UTF-8 byte-order mark at the start of a file is dropped.
- Word level: whitespace-separated tokens (spaces, tabs, any Unicode whitespace). Optionally
  lower-cased and numbers mapped to one token (PTB writes ``N``): a token of digits and the
  separators ``. , - / : +`` with at least one digit (``1,000`` ``3.5`` ``-2``; ``1980s`` stays).
  The specials ``<unk>`` ``<eos>`` and the number token itself are never changed.
- Character level, ``char_input="text"``: every character is a token and each run of whitespace
  between words is one ``_`` (Mikolov's convention). ``char_input="spaced"``: the file is already
  split into characters by spaces, as PTB's ``ptb.char.*.txt`` are.
- Every line ends in one ``<eos>``. A blank line is an empty sentence (``blank_lines="eos"``,
  one ``<eos>``) or ignored (``"skip"``).

torch-free: ``rnnlm.serve`` imports it.
"""

from __future__ import annotations

import codecs
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rnnlm.errors import RnnlmError
from rnnlm.vocab import EOS, UNK, Vocabulary

NUMBER = re.compile(r"^[+-]?[\d.,\-/:]*\d[\d.,\-/:]*$")
BOUNDARY = "_"  # a word boundary at character level
BOM = "\ufeff"
BLOCK = 1 << 20  # bytes read at a time: memory stays bounded however long a line is
MAX_LINE_CHARS = 1 << 20  # the longest line per-line scoring holds as one sentence
LEVELS = ("word", "char")
BLANK_RULES = ("eos", "skip")
CHAR_INPUTS = ("text", "spaced")


class TextError(RnnlmError):
    """Input text that cannot be read: empty, binary, not UTF-8, a line too long."""


@dataclass(frozen=True)
class TextSpec:
    """How one model turns text into tokens; see the module docstring."""

    level: str = "word"
    lowercase: bool = False
    numbers: str = ""  # "" keeps numbers as they are; "N" maps 1,000 and 3.5 to N (PTB)
    blank_lines: str = "eos"
    char_input: str = "text"

    def __post_init__(self) -> None:
        problems = []
        if self.level not in LEVELS:
            problems.append(f"level must be word or char, not {self.level!r}")
        if self.blank_lines not in BLANK_RULES:
            problems.append(f"blank_lines must be eos or skip, not {self.blank_lines!r}")
        if self.char_input not in CHAR_INPUTS:
            problems.append(f"char_input must be text or spaced, not {self.char_input!r}")
        if self.numbers and (self.numbers.split() != [self.numbers] or self.numbers in (UNK, EOS)):
            problems.append(f"numbers must be one token without whitespace (or empty), not {self.numbers!r}")
        if self.numbers and self.level == "char":
            problems.append("numbers maps whole words: it needs level word")
        if problems:
            raise RnnlmError("invalid text normalization: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "unk": UNK, "eos": EOS, "boundary": BOUNDARY if self.level == "char" else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TextSpec:
        """Read a manifest's ``text`` entry, also the first format's (lower-cased, digits to N, blank
        lines skipped: what the runtime did before the spec was recorded)."""
        if "blank_lines" not in data:
            return cls(level=data["level"], lowercase=bool(data.get("lowercase")), numbers=data.get("digits_to") or "",
                       blank_lines="skip")
        return cls(**{k: data[k] for k in ("level", "lowercase", "numbers", "blank_lines", "char_input")})

    def raw(self) -> TextSpec:
        """The same spec without lower-casing or number mapping (``--raw``)."""
        return TextSpec(self.level, False, "", self.blank_lines, self.char_input)

    # ------------------------------------------------------------------ one line
    def normalize(self, word: str) -> str:
        if word in (UNK, EOS) or word == self.numbers:
            return word
        if self.numbers and NUMBER.match(word):
            return self.numbers
        return word.lower() if self.lowercase else word

    def words(self, line: str) -> list[str]:
        """The tokens of one line (no newline inside), ``<eos>`` not included."""
        if self.level == "word" or self.char_input == "spaced":
            return [self.normalize(w) for w in line.split()]
        chars = BOUNDARY.join(line.split())
        return list(chars.lower() if self.lowercase else chars)

    def line_words(self, line: str, *, eos: bool = True) -> list[str]:
        """One line as a sentence: its tokens and ``<eos>``, or the blank-line rule's tokens."""
        words = self.words(line)
        if not eos or (not words and self.blank_lines == "skip"):
            return words
        return [*words, EOS]

    # ------------------------------------------------------------------ streams
    def text_words(self, text: str) -> Iterator[str]:
        """Every token of a text held in memory, exactly as :meth:`stream_words` reads a file."""
        check_text(text, "text")
        lines = text.removeprefix(BOM).split("\n")
        if lines[-1] == "":  # the final newline ends the last line; it does not start one
            lines.pop()
        for line in lines:
            yield from self.line_words(line.removesuffix("\r"))

    def stream_words(self, source: BinaryIO, name: str = "<input>") -> Iterator[str]:
        """Every token of a byte stream, a block at a time: bounded memory for any line length.

        A line longer than a block arrives in pieces cut at whitespace, so no word is split; at
        character level the boundary at the cut is kept."""
        started = False  # whether the current line has produced a token yet
        for piece, line_end in pieces(source, name):
            words = self.words(piece)
            if started and words and self.level == "char" and self.char_input == "text" and piece[:1].isspace():
                yield BOUNDARY
            yield from words
            started = started or bool(words)
            if line_end:
                if started or self.blank_lines == "eos":
                    yield EOS
                started = False


# --------------------------------------------------------------------------- tokens with ids


@dataclass(frozen=True)
class Token:
    text: str  # as scored (normalized)
    id: int
    oov: bool


class Tokenizer:
    """A :class:`TextSpec` and a vocabulary: text to ``Token`` s with ids, unknown ones as ``<unk>``."""

    def __init__(self, spec: TextSpec, vocab: Vocabulary) -> None:
        self.spec, self.vocab = spec, vocab
        self.level = spec.level
        self.unk, self.eos = UNK, EOS
        self.unk_id, self.eos_id = vocab.unk_id, vocab.eos_id
        self._eos_token = Token(EOS, self.eos_id, False)

    def token(self, text: str) -> Token:
        i = self.vocab.stoi.get(text)
        return Token(text, self.unk_id, True) if i is None else Token(text, i, False)

    def tokens(self, words: Iterable[str]) -> Iterator[Token]:
        return (self._eos_token if w == EOS else self.token(w) for w in words)

    def line_tokens(self, line: str, eos: bool = True) -> list[Token]:
        """One line as a sentence (``eos=False``: a prefix, such as a prompt)."""
        return list(self.tokens(self.spec.line_words(line, eos=eos)))

    def text_tokens(self, text: str) -> list[Token]:
        return list(self.tokens(self.spec.text_words(text)))

    def stream(self, source: BinaryIO, name: str = "<input>") -> Iterator[Token]:
        return self.tokens(self.spec.stream_words(source, name))

    def piece(self, token: str, before: str) -> str:
        """The text ``token`` adds after the text ``before``: ``<eos>`` a newline; at character level
        the character (``_`` a space); at word level the word, after a space unless it starts a line."""
        if token == EOS:
            return "\n"
        if self.level == "char":
            return " " if token == BOUNDARY else token
        return token if not before or before.endswith("\n") else " " + token

    def detokenize(self, tokens: Iterable[str]) -> str:
        """Tokens back to text, piece by piece (``piece``): what ``rnnlm generate`` prints."""
        out: list[str] = []
        for t in tokens:
            out.append(self.piece(t, out[-1] if out else ""))
        return "".join(out)


# --------------------------------------------------------------------------- reading text

SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str) -> str:
    """Refuse text that did not come from valid UTF-8: a NUL character (binary data) or a lone
    surrogate (what Python makes of undecodable bytes in argv, or JSON's ``"\\ud800"``). The CLI's
    prompt and every text the HTTP server receives pass through here; files are checked as they
    are decoded (``pieces``)."""
    nul = text.find("\0")
    if nul >= 0:
        raise TextError(f"{what}: binary data (a NUL character at offset {nul}); expected text")
    bad = SURROGATE.search(text)
    if bad:
        raise TextError(f"{what}: not valid Unicode (a lone surrogate at offset {bad.start()})")
    return text


def open_input(path: str | Path) -> tuple[BinaryIO, str]:
    """A file path or ``-`` for standard input, refused with one clear line if unreadable."""
    if str(path) == "-":
        return sys.stdin.buffer, "<stdin>"
    p = Path(path)
    if p.is_dir():
        raise TextError(f"{path} is a directory, not a text file")
    try:
        return open(p, "rb"), str(p)
    except FileNotFoundError:
        raise TextError(f"{path}: no such file") from None
    except PermissionError:
        raise TextError(f"{path}: permission denied") from None


def _cut(pending: str) -> int:
    """Where to cut a line that has grown past a piece: before its last run of ASCII whitespace,
    so that no word is split and the next piece starts at a boundary (0 when there is none: the
    caller keeps reading)."""
    i = max(pending.rfind(c) for c in " \t\r\v\f")
    while i > 0 and pending[i - 1] in " \t\r\v\f":
        i -= 1
    return max(i, 0)


def pieces(source: BinaryIO, name: str, max_piece: int | None = None, block: int | None = None
           ) -> Iterator[tuple[str, bool]]:
    """Decoded text as (line, True) for each complete line and (part, False) for parts of a line
    longer than ``max_piece`` characters, cut before whitespace (a single word longer than that
    is held whole). Drops a leading byte-order mark and the ``\\r`` of CRLF. Refuses NUL bytes
    (binary data) and invalid UTF-8, naming the byte offset."""
    max_piece, block = max_piece or BLOCK, block or BLOCK  # read at the call: tests shrink BLOCK
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, pending, first = 0, "", True
    while True:
        data = source.read(block)
        final = not data
        nul = data.find(b"\0")
        if nul >= 0:
            raise TextError(f"{name}: binary data (a NUL byte at offset {offset + nul}); expected UTF-8 text")
        buffered = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            text = decoder.decode(data, final=final)
        except UnicodeDecodeError as e:
            raise TextError(f"{name}: invalid UTF-8 at byte offset {offset - buffered + e.start}") from None
        offset += len(data)
        if first and text:
            text, first = text.removeprefix(BOM), False
        lines = (pending + text).split("\n")
        pending = lines.pop()
        for line in lines:
            yield line.removesuffix("\r"), True
        while len(pending) > max_piece and (cut := _cut(pending)):
            yield pending[:cut], False
            pending = pending[cut:]
        if final:
            if pending:
                yield pending.removesuffix("\r"), True
            return


def lines_of(source: BinaryIO, name: str, max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """Complete lines, for per-line scoring, where a line is one sentence: a line longer than
    ``max_chars`` characters is refused rather than held in memory."""
    for text, line_end in pieces(source, name, max_piece=max_chars):
        if not line_end or len(text) > max_chars:
            raise TextError(f"{name}: a line longer than {max_chars:,} characters; --per-line scores sentences "
                            "(score the file without --per-line to stream it)")
        yield text
