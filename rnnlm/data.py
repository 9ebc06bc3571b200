"""Corpora: Penn Treebank (found, or fetched once, and verified) or a user's own files, read by the
one tokenizer (:mod:`rnnlm.text`) into id streams and batches.

numpy and the standard library only, so that serving and tests never need torch.

PTB is read verbatim, as the papers read it: every line is ``line.split() + ["<eos>"]``, so one
``<eos>`` is counted per line. Word level reads ``ptb.{split}.txt`` (10,000 types, already
``<unk>``-ed); char level reads ``ptb.char.{split}.txt``, whose characters are space-separated
with ``_`` marking word boundaries. A user's own files need no checksums; the corpus records
each file's sha256, size, lines, tokens and OOVs, which the checkpoint keeps (``data.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_bytes
from rnnlm.text import TextError, TextSpec, open_input
from rnnlm.vocab import IdArray, Vocabulary

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
ARCHIVE_DIR = "simple-examples/data"  # members are ./simple-examples/data/<name>
DOWNLOAD_TIMEOUT_S = 60.0
ENV_VAR = "RNNLM_DATA_DIR"
MANIFEST = "SHA256SUMS"
SPLITS = ("train", "valid", "test")
LEVELS = ("word", "char")

# Canonical sha256 of the six files in Mikolov's simple-examples.tgz.
CHECKSUMS: dict[str, str] = {
    "ptb.char.test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
    "ptb.char.train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    "ptb.char.valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
}


def ptb_filenames(level: str | None = None) -> list[str]:
    """The files one level needs (``None``: both levels, all six files)."""
    if level is None:
        return [name for lv in LEVELS for name in ptb_filenames(lv)]
    if level not in LEVELS:
        raise RnnlmError(f"unknown level {level!r}: expected one of {', '.join(LEVELS)}")
    prefix = "ptb." if level == "word" else "ptb.char."
    return [f"{prefix}{split}.txt" for split in SPLITS]


# --------------------------------------------------------------------------- verification


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RnnlmError(f"{path} is not valid UTF-8 (bad byte at offset {e.start})") from None


def _read_text(path: Path) -> str:
    try:
        return _decode(path.read_bytes(), path)
    except FileNotFoundError:
        raise RnnlmError(f"{path} is missing") from None


def _read_manifest(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` file: ``<64 hex>  <name>`` (or ``*<name>``) per line."""
    table: dict[str, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().removeprefix("*")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise RnnlmError(f"{path}, line {lineno}: expected '<sha256 hex>  <file name>'")
        table[name] = digest.lower()
    return table


def verify_files(directory: str | Path, names: Iterable[str]) -> None:
    """Refuse any of ``names`` in ``directory`` that is missing, empty, corrupt or not UTF-8.

    Checksums come from the directory's own ``SHA256SUMS`` when it has one (custom or tiny
    corpora), falling back to the built-in canonical table; a name in neither is refused.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else {}
    for name in names:
        path = directory / name
        if not path.is_file():
            raise RnnlmError(f"{path} is missing")
        data = path.read_bytes()
        if not data:
            raise RnnlmError(f"{path} is empty")
        expected = manifest.get(name) or CHECKSUMS.get(name)
        if expected is None:
            raise RnnlmError(f"{path} has no known sha256 (not in {manifest_path} nor the built-in table)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise RnnlmError(
                f"{path} is corrupt or truncated: sha256 expected {expected}, got {actual} ({len(data)} bytes)"
            )
        _decode(data, path)


# --------------------------------------------------------------------------- locating


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rnnlm/ptb``, by default ``~/.cache/rnnlm/ptb``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: ignore relative
    return root / "rnnlm" / "ptb"


def _download(dest: Path) -> None:
    """Fetch the archive, verify the six files in memory, then write each atomically into ``dest``."""
    try:
        with urllib.request.urlopen(PTB_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            blob = response.read()
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            members = {posixpath.normpath(m.name): m for m in tar.getmembers() if m.isfile()}
            files: dict[str, bytes] = {}
            for name in ptb_filenames():
                member = members.get(f"{ARCHIVE_DIR}/{name}")
                extracted = tar.extractfile(member) if member is not None else None
                if extracted is None:
                    raise RnnlmError(f"the archive has no ./{ARCHIVE_DIR}/{name}")
                files[name] = extracted.read()  # read in memory: nothing extracted to disk
    except (OSError, tarfile.TarError, EOFError) as e:  # URLError and timeouts are OSErrors
        raise RnnlmError(f"{type(e).__name__}: {e}") from None
    for name, data in files.items():  # check all before writing any
        actual = hashlib.sha256(data).hexdigest()
        if actual != CHECKSUMS[name]:
            raise RnnlmError(f"downloaded {name} is corrupt: sha256 expected {CHECKSUMS[name]}, got {actual}")
    try:
        for name, data in files.items():
            atomic_write_bytes(dest / name, data)
    except OSError as e:
        raise RnnlmError(f"cannot write the cache {dest}: {e}") from None


def locate_ptb(
    data_dir: str | Path | None = None, *, level: str | None = None, download: bool = True
) -> Path:
    """Return a directory holding verified PTB files for ``level`` (``None``: all six).

    Sources, in order: ``data_dir`` (the CLI's ``--data-dir``), ``$RNNLM_DATA_DIR`` (empty
    counts as unset), the user cache (:func:`cache_dir`), then, if ``download``, a one-time
    download into the cache. A directory given explicitly must hold the files: it never falls
    through to the cache or a download.
    """
    names = ptb_filenames(level)
    env = os.environ.get(ENV_VAR) or None
    for given, source in ((data_dir, "--data-dir"), (env, f"{ENV_VAR} (environment variable)")):
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.is_dir():
            raise RnnlmError(f"{path} (from {source}) is not a directory")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise RnnlmError(f"{path} (from {source}) lacks {', '.join(missing)}")
        verify_files(path, names)
        return path

    cache = cache_dir()
    if all((cache / n).is_file() for n in names):
        verify_files(cache, names)
        return cache
    reason = "downloads disabled"
    if download:
        try:
            _download(cache)
            verify_files(cache, names)
            return cache
        except RnnlmError as e:
            reason = f"download of {PTB_URL} failed: {e.message}"
    raise RnnlmError(
        f"Penn Treebank not found in the cache {cache} and {reason}. Pass --data-dir DIR or set "
        f"{ENV_VAR}=DIR to a directory holding {', '.join(names)} (from simple-examples.tgz)."
    )


# --------------------------------------------------------------------------- corpus


def ptb_spec(level: str) -> TextSpec:
    """PTB as the papers read it: verbatim (it is already lower-cased, numbers already ``N``);
    the character files are already split into characters by spaces."""
    return TextSpec(level=level, char_input="spaced" if level == "char" else "text")


@dataclass(frozen=True)
class FileRecord:
    """What a model was trained or evaluated on: enough to recognise the file again."""

    path: str
    sha256: str
    bytes: int
    lines: int
    tokens: int  # <eos> included
    oov: int  # tokens outside the vocabulary, read as <unk>

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_tokens(path: str | Path, spec: TextSpec) -> tuple[list[str], FileRecord]:
    """The tokens of a text file under ``spec``, and its record (tokens known, oov not yet)."""
    path = Path(path)
    source, _ = open_input(path)  # the runtime's checks and messages: a directory, missing, unreadable
    with source:
        data = source.read()
    if not data.strip():
        raise TextError(f"{path} is empty")
    tokens = list(spec.stream_words(io.BytesIO(data), str(path)))
    if not tokens:
        raise TextError(f"{path} holds no tokens")
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    return tokens, FileRecord(str(path.resolve()), hashlib.sha256(data).hexdigest(), len(data), lines, len(tokens), 0)


def _encode(tokens: list[str], record: FileRecord, vocab: Vocabulary) -> tuple[IdArray, FileRecord]:
    return vocab.encode(tokens), dataclasses.replace(record, oov=sum(t not in vocab.stoi for t in tokens))


def encode_file(path: str | Path, spec: TextSpec, vocab: Vocabulary) -> tuple[IdArray, FileRecord]:
    """A text file's ids under ``spec`` and ``vocab``, and its record with the OOV count."""
    return _encode(*read_tokens(path, spec), vocab)


@dataclass(frozen=True)
class DataFiles:
    """A user's own corpus: any three files, anywhere (no checksums needed)."""

    train: Path
    valid: Path
    test: Path | None = None


@dataclass
class Corpus:
    """Id streams of train, valid and (when given) test; the vocabulary is built from train only."""

    level: str
    vocab: Vocabulary
    train: IdArray
    valid: IdArray
    test: IdArray
    spec: TextSpec = TextSpec()
    records: dict[str, FileRecord] = field(default_factory=dict)

    def split(self, name: str) -> IdArray:
        """The ids of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise RnnlmError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        array: IdArray = getattr(self, name)
        return array

    def describe(self) -> dict[str, Any]:
        """What ``data.json`` records beside a checkpoint: the text spec, the vocabulary, every file."""
        return {"text": self.spec.to_json(), "vocab_size": len(self.vocab),
                "files": {split: r.as_dict() for split, r in self.records.items()}}


def load_corpus(files: DataFiles, spec: TextSpec, *, vocab_size: int | None = None, min_count: int = 1) -> Corpus:
    """Read a corpus under ``spec``, build the vocabulary from train, encode every split.

    Refuses, with one line naming the file: an empty or binary file, text that is not UTF-8, and
    a valid or test file in which no word is in the vocabulary."""
    train_tokens, train_record = read_tokens(files.train, spec)
    vocab = Vocabulary.build(train_tokens, max_size=vocab_size, min_count=min_count)
    arrays, records = {}, {}
    arrays["train"], records["train"] = _encode(train_tokens, train_record, vocab)
    for split in ("valid", "test"):
        path = getattr(files, split)
        if path is None:
            arrays[split] = np.zeros(0, np.int64)
            continue
        arrays[split], records[split] = encode_file(path, spec, vocab)
        if not np.isin(arrays[split], [vocab.unk_id, vocab.eos_id], invert=True).any():
            raise TextError(f"{path}: none of its {records[split].tokens:,} tokens is a word of the vocabulary built "
                            f"from {files.train} (is it the right file, and the same language and normalization?)")
    return Corpus(spec.level, vocab, arrays["train"], arrays["valid"], arrays["test"], spec, records)


def load_ptb(data_dir: str | Path | None = None, *, level: str = "word", download: bool = True) -> Corpus:
    """Locate, verify and tokenise PTB at ``level`` ("word" or "char"); see :func:`locate_ptb`."""
    names = ptb_filenames(level)  # validates level before anything touches the disk or network
    directory = locate_ptb(data_dir, level=level, download=download)
    return load_corpus(DataFiles(*(directory / n for n in names)), ptb_spec(level))


def tokenize_file(path: str | Path, spec: TextSpec | None = None) -> list[str]:
    """Every token of a file under ``spec`` (default: verbatim words), ``<eos>`` ending each line."""
    return read_tokens(path, spec or TextSpec())[0]

# --------------------------------------------------------------------------- batching


def batchify(data: npt.NDArray[np.integer], batch_size: int) -> npt.NDArray[np.integer]:
    """Cut a 1-D id stream into ``batch_size`` parallel streams, one per column: shape (N, B).

    The tail that does not fill a whole row is dropped. With the stream ``a .. z`` and B = 4,
    N = 26 // 4 = 6 and ``y z`` are dropped::

        a b c d e f | g h i j k l | m n o p q r | s t u v w x | y z
        -----col 0- | -----col 1- | -----col 2- | -----col 3- | dropped

             B=0 1 2 3
        t=0 [ a g m s ]
          1 [ b h n t ]   row t is time step t; column b is a contiguous stretch of the
          2 [ c i o u ]   corpus, so the hidden state carried down a column follows the text.
          3 [ d j p v ]
          4 [ e k q w ]
          5 [ f l r x ]
    """
    data = np.asarray(data)
    if data.ndim != 1:
        raise RnnlmError(f"batchify needs a 1-D stream, got shape {data.shape}")
    if batch_size < 1:
        raise RnnlmError(f"batch size must be at least 1, got {batch_size}")
    if len(data) < 2 * batch_size:  # fewer than 2 rows leaves no (input, target) pair
        raise RnnlmError(f"a stream of {len(data)} tokens is too short for batch size {batch_size}")
    n = len(data) // batch_size
    return np.ascontiguousarray(data[: n * batch_size].reshape(batch_size, n).T)  # (N, B)


class BpttBatches:
    """Windows ``(x, y)`` of at most ``bptt`` steps over batchified data (N, B).

    ``y`` is ``x`` one time step later, so every row but the first is a target exactly once.
    The last window may be shorter. Arrays are views of ``data`` (contiguous rows).
    """

    def __init__(self, data: npt.NDArray[np.integer], bptt: int) -> None:
        if data.ndim != 2 or data.shape[0] < 2:
            raise RnnlmError(f"BpttBatches needs (N >= 2, B) data, got shape {data.shape}")
        if bptt < 1:
            raise RnnlmError(f"bptt must be at least 1, got {bptt}")
        self.data = data
        self.bptt = bptt

    def __len__(self) -> int:
        return -(-(self.data.shape[0] - 1) // self.bptt)  # ceil((N - 1) / bptt)

    def window(self, index: int) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]:
        """Window ``index``: x = rows [i, i + T), y = rows [i + 1, i + 1 + T), both (T, B)."""
        i = index * self.bptt
        t = min(self.bptt, self.data.shape[0] - 1 - i)
        return self.data[i : i + t], self.data[i + 1 : i + 1 + t]

    def windows(
        self, start: int = 0
    ) -> Iterator[tuple[int, npt.NDArray[np.integer], npt.NDArray[np.integer]]]:
        """``(index, x, y)`` from window ``start`` on, to resume mid-epoch (checked at the call)."""
        if not 0 <= start <= len(self):
            raise RnnlmError(f"window {start} is outside 0..{len(self)}")
        return ((k, *self.window(k)) for k in range(start, len(self)))

    def __iter__(self) -> Iterator[tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]]:
        return (self.window(k) for k in range(len(self)))
