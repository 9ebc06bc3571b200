"""Text to token ids, as the model's training data was tokenized, with bounded memory.

Word level (PTB conventions): whitespace tokens, lower-cased, numbers to ``N`` (a token made of
digits and the separators ``. , - / :`` with at least one digit, e.g. ``1,000`` ``3.5``; PTB keeps ``1980s``),
unknown words to ``<unk>``, and ``<eos>`` at the end of each line. ``raw=True`` takes the tokens
as they are. Character level: every character is a token, a space is ``_``, ``<eos>`` ends a line.
Blank lines are skipped. Out-of-vocabulary tokens are counted, never dropped.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rnnlm.errors import RnnlmError

NUMBER = re.compile(r"^[+-]?[\d.,\-/:]*\d[\d.,\-/:]*$")
BLOCK = 1 << 20  # bytes read at a time: memory stays bounded however long a line is


class TextError(RnnlmError):
    """Input text that cannot be scored: empty, binary, not UTF-8."""


@dataclass(frozen=True)
class Token:
    text: str  # as scored (normalized)
    id: int
    oov: bool


class Tokenizer:
    def __init__(self, itos: list[str], *, level: str, unk: str = "<unk>", eos: str = "<eos>", raw: bool = False) -> None:
        self.itos, self.level, self.raw = itos, level, raw
        self.stoi = {t: i for i, t in enumerate(itos)}
        self.unk, self.eos = unk, eos
        self.unk_id, self.eos_id = self.stoi[unk], self.stoi[eos]

    def normalize(self, word: str) -> str:
        if self.raw or word in (self.unk, self.eos):
            return word
        if word == "N" or NUMBER.match(word):
            return "N"
        return word.lower()

    def token(self, text: str) -> Token:
        i = self.stoi.get(text)
        return Token(text, self.unk_id, True) if i is None else Token(text, i, False)

    def line_tokens(self, line: str, eos: bool = True) -> list[Token]:
        """The tokens of one line of text (no newline inside)."""
        if self.level == "char":
            chars = [("_" if c.isspace() else c) for c in " ".join(line.split())]
            out = [self.token(c if self.raw else c.lower()) for c in chars]
        else:
            out = [self.token(self.normalize(w)) for w in line.split()]
        if eos and out:
            out.append(Token(self.eos, self.eos_id, False))
        return out

    def text_tokens(self, text: str) -> list[Token]:
        """Lines end at "\n" only (a trailing "\r" is dropped), exactly as ``stream`` reads a file."""
        check_text(text, "text")
        return [t for line in text.split("\n") for t in self.line_tokens(line.rstrip("\r"))]

    def stream(self, source: BinaryIO, name: str = "<input>") -> Iterator[Token]:
        """Tokens of a byte stream, read a block at a time: bounded memory for any line length."""
        for text, line_end in pieces(source, name):
            if line_end:
                yield from self.line_tokens(text)
            else:  # part of a very long line, cut at whitespace where there is any
                yield from self.line_tokens(text, eos=False)


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


def open_input(path: str) -> tuple[BinaryIO, str]:
    """A file path or ``-`` for standard input, refused with one clear line if unreadable."""
    import sys

    if path == "-":
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


def pieces(source: BinaryIO, name: str, max_piece: int = BLOCK) -> Iterator[tuple[str, bool]]:
    """Decoded text as (line, True) for each complete line and (part, False) for parts of a line
    longer than ``max_piece`` characters. Refuses NUL bytes (binary data) and invalid UTF-8,
    naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, pending = 0, ""
    while True:
        block = source.read(BLOCK)
        final = not block
        nul = block.find(b"\0")
        if nul >= 0:
            raise TextError(f"{name}: binary data (a NUL byte at offset {offset + nul}); expected UTF-8 text")
        buffered = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as e:
            raise TextError(f"{name}: invalid UTF-8 at byte offset {offset - buffered + e.start}") from None
        offset += len(block)
        lines = (pending + text).split("\n")
        pending = "" if final else lines.pop()
        for line in lines:
            yield line.rstrip("\r"), True
        if len(pending) > max_piece:
            cut = max(pending.rfind(" "), pending.rfind("\t"), len(pending) // 2)
            yield pending[:cut], False
            pending = pending[cut:]
        if final:
            break


def lines_of(source: BinaryIO, name: str, max_chars: int = 1 << 20) -> Iterator[str]:
    """Complete lines, for per-line scoring, where a line is one sentence: longer than
    ``max_chars`` characters is refused rather than held in memory."""
    for text, line_end in pieces(source, name, max_piece=max_chars):
        if not line_end:
            raise TextError(f"{name}: a line longer than {max_chars:,} characters; --per-line scores sentences "
                            "(score the file without --per-line to stream it)")
        yield text
