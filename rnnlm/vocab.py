"""The vocabulary: a bijection between tokens and ids, built from training text, read and written
as ``vocab.txt`` (one token per line, the line number from 0 is its id).

One reader with one set of checks: checkpoints, bundles and the runtime all load through
:meth:`Vocabulary.load`. numpy and the standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_text

UNK, EOS = "<unk>", "<eos>"
SPECIALS = (UNK, EOS)
MIN_SIZE = 3  # <unk>, <eos> and at least one word

IdArray = npt.NDArray[np.int64]


class VocabError(RnnlmError):
    """A vocabulary file or request that cannot be used."""


def _index(tokens: list[str], source: str, unit: str) -> dict[str, int]:
    """token -> id of ``tokens``, refused at the first empty token, token with whitespace inside, or
    duplicate, named by ``unit``: "line" (vocab.txt's, from 1) or "id" (from 0); then without a
    special token. One pass over the tokens where they are good, as at every bundle load."""
    stoi = {token: i for i, token in enumerate(tokens)}
    if len(stoi) != len(tokens) or not all(token.split() == [token] for token in tokens):
        first = 1 if unit == "line" else 0
        seen: dict[str, int] = {}
        for i, token in enumerate(tokens, start=first):
            if token.split() != [token]:  # one line of vocab.txt per token: no whitespace inside
                raise VocabError(f"{source}, {unit} {i}: empty token or whitespace in {token!r}")
            if token in seen:
                raise VocabError(f"{source}, {unit} {i}: duplicate token {token!r} (first on {unit} {seen[token]})")
            seen[token] = i
    for special in SPECIALS:
        if special not in stoi:
            raise VocabError(f"{source}: no {unit} holds the special token {special}")
    return stoi


class Vocabulary:
    """A bijection between tokens and ids; the id of ``itos[i]`` is ``i``."""

    def __init__(self, itos: Sequence[str], *, source: str = "vocabulary", unit: str = "id") -> None:
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = _index(self.itos, source, unit)

    @classmethod
    def build(cls, tokens: Iterable[str], *, max_size: int | None = None, min_count: int = 1) -> Vocabulary:
        """Ids by frequency, most frequent first, ties by first appearance (deterministic).

        ``max_size`` keeps the most frequent tokens so that the vocabulary, ``<unk>`` and ``<eos>``
        included, has at most that many; ``min_count`` drops tokens seen fewer times. Dropped tokens
        become ``<unk>``, which is then ranked by its new count like any token; specials that never
        occur go at the end. With neither limit, every token is kept (PTB's 10,000 stay as they are).
        """
        if max_size is not None and max_size < MIN_SIZE:
            raise VocabError(f"--vocab-size must be at least {MIN_SIZE} (<unk>, <eos> and one word), got {max_size}")
        if min_count < 1:
            raise VocabError(f"--min-count must be at least 1, got {min_count}")
        counts = Counter(tokens)  # insertion-ordered; sorted() is stable, so ties keep first appearance
        ranked = [t for t in sorted(counts, key=lambda t: -counts[t]) if t not in SPECIALS and counts[t] >= min_count]
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIALS)]
        if not ranked:
            raise VocabError(f"no token occurs at least {min_count} time(s) in the training text")
        kept = set(ranked) | set(SPECIALS)
        final: dict[str, int] = {}  # counts of the text with dropped tokens read as <unk>
        first: dict[str, int] = {}  # first appearance in that text
        for position, (token, count) in enumerate(counts.items()):  # in order of first appearance
            mapped = token if token in kept else UNK
            final[mapped] = final.get(mapped, 0) + count
            first.setdefault(mapped, position)
        itos = sorted(final, key=lambda t: (-final[t], first[t]))
        itos += [s for s in SPECIALS if s not in final]
        return cls(itos)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read ``vocab.txt``: one token per line, the line number (from 0) is its id."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VocabError(f"{path} is missing") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise VocabError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from None
        if not text:
            raise VocabError(f"{path} is empty")
        return cls(text.removesuffix("\n").split("\n"), source=str(path), unit="line")

    def save(self, path: str | Path) -> None:
        """Write ``vocab.txt`` atomically (UTF-8, one token per line)."""
        atomic_write_text(path, "".join(f"{t}\n" for t in self.itos))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside: not hashable

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens: {' '.join(self.itos[:5])} ...)"

    @property
    def unk_id(self) -> int:
        return self.stoi[UNK]

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    def encode(self, tokens: Sequence[str]) -> IdArray:
        """Ids of ``tokens`` as int64; unknown tokens map to ``unk_id``."""
        get, unk = self.stoi.get, self.unk_id
        return np.fromiter((get(t, unk) for t in tokens), dtype=np.int64, count=len(tokens))

    def decode(self, ids: Iterable[int] | npt.NDArray[np.integer]) -> list[str]:
        """Tokens of ``ids``; an id outside ``[0, len)`` is refused (no negative wrap-around)."""
        out = []
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if not 0 <= i < len(self.itos):
                raise VocabError(f"id {i} is outside the vocabulary of {len(self.itos)} tokens")
            out.append(self.itos[i])
        return out
