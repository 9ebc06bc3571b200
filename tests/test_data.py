"""Tests for rnnlm.data: tiny synthetic corpora in tmp_path; the network is never touched."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from rnnlm import data
from rnnlm.data import BpttBatches, Vocabulary, batchify, load_ptb, locate_ptb, tokenize_file, verify_files
from rnnlm.errors import RnnlmError

# Read before the autouse fixture clears it, for the real-data test.
_REAL_ENV_DIR = os.environ.get(data.ENV_VAR)

TINY = {
    "ptb.train.txt": b" the cat sat \n the dog sat on the cat \n",
    "ptb.valid.txt": b" the bird sat \n",
    "ptb.test.txt": b" a dog \n",
    "ptb.char.train.txt": b"a b _ b a\nc a\n",
    "ptb.char.valid.txt": b"a z\n",
    "ptb.char.test.txt": b"b\n",
}


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def write_corpus(directory: Path, files: dict[str, bytes], manifest: bool = True) -> Path:
    """Write ``files`` into ``directory`` with (by default) a SHA256SUMS of their true checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (directory / name).write_bytes(blob)
    if manifest:
        lines = "".join(f"{sha(blob)}  {name}\n" for name, blob in files.items())
        (directory / data.MANIFEST).write_text(lines)
    return directory


def tgz(files: dict[str, bytes]) -> bytes:
    """An in-memory simple-examples.tgz holding ``files`` under ./simple-examples/data/."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"./simple-examples/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, float]]:
    """No env var, an empty private cache, and a urlopen that fails offline and records its calls."""
    calls: list[tuple[str, float]] = []

    def offline(url: str, timeout: float) -> io.BytesIO:
        calls.append((url, timeout))
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    return calls


# --------------------------------------------------------------------------- vocabulary


def test_vocab_orders_by_frequency_then_first_appearance() -> None:
    vocab = Vocabulary.build(["y", "x", "x", "y", "z", "w", "w", "w"])
    # w:3, then y and x tie at 2 (y seen first), z:1; the absent specials go at the end, in order.
    assert vocab.itos == ["w", "y", "x", "z", "<unk>", "<eos>"]
    assert vocab.stoi == {t: i for i, t in enumerate(vocab.itos)}
    assert (vocab.unk_id, vocab.eos_id, len(vocab)) == (4, 5, 6)


def test_vocab_ranks_specials_that_occur_like_any_token() -> None:
    vocab = Vocabulary.build(["a", "<eos>", "b", "<eos>", "a", "<eos>"])
    assert vocab.itos == ["<eos>", "a", "b", "<unk>"]
    assert "<eos>" in vocab and "c" not in vocab


def test_encode_maps_unknown_to_unk_and_decode_inverts() -> None:
    vocab = Vocabulary.build(["a", "b", "a", "<eos>"])
    ids = vocab.encode(["b", "never-seen", "a", "<eos>"])
    assert ids.dtype == np.int64
    assert ids.tolist() == [vocab.stoi["b"], vocab.unk_id, vocab.stoi["a"], vocab.eos_id]
    assert vocab.decode(ids) == ["b", "<unk>", "a", "<eos>"]
    with pytest.raises(RnnlmError, match="outside the vocabulary"):
        vocab.decode([-1])  # would silently wrap to the last token with plain indexing


def test_vocab_save_load_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.build(["é", "the", "the", "cat", "<unk>", "<eos>"])
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    assert path.read_text(encoding="utf-8").split("\n") == [*vocab.itos, ""]  # line number = id
    assert Vocabulary.load(path) == vocab
    assert Vocabulary.load(path) != Vocabulary.build(["the", "cat"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        ("<unk>\n<eos>\nthe\ncat\nthe\n", "line 5: duplicate token 'the' (first on line 3)"),
        ("<unk>\nthe\n", "no line holds the special token <eos>"),
        ("<unk>\n\n<eos>\n", "line 2: empty token"),
    ],
)
def test_vocab_load_refuses_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RnnlmError) as info:
        Vocabulary.load(path)
    assert str(path) in info.value.message and expected in info.value.message


# --------------------------------------------------------------------------- tokenising and loading


def test_tokenize_file_appends_eos_per_line(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b" a b \n\n c")  # an empty line still ends a sentence; no final newline
    assert tokenize_file(path) == ["a", "b", "<eos>", "<eos>", "c", "<eos>"]


def test_load_ptb_word_level_from_data_dir(tmp_path: Path) -> None:
    corpus = load_ptb(write_corpus(tmp_path / "ptb", TINY), level="word", download=False)
    vocab = corpus.vocab
    # train: the x3, cat x2, sat x2, <eos> x2, dog, on; ties by first appearance.
    assert vocab.itos == ["the", "cat", "sat", "<eos>", "dog", "on", "<unk>"]
    assert vocab.decode(corpus.train) == [
        "the",
        "cat",
        "sat",
        "<eos>",
        "the",
        "dog",
        "sat",
        "on",
        "the",
        "cat",
        "<eos>",
    ]
    assert vocab.decode(corpus.split("valid")) == ["the", "<unk>", "sat", "<eos>"]  # vocab from train only
    assert vocab.decode(corpus.test) == ["<unk>", "dog", "<eos>"]
    assert corpus.level == "word" and corpus.train.dtype == np.int64
    with pytest.raises(RnnlmError, match="unknown split"):
        corpus.split("dev")


def test_load_ptb_char_level(tmp_path: Path) -> None:
    corpus = load_ptb(write_corpus(tmp_path / "ptb", TINY), level="char", download=False)
    assert corpus.vocab.itos == ["a", "b", "<eos>", "_", "c", "<unk>"]
    assert corpus.vocab.decode(corpus.valid) == ["a", "<unk>", "<eos>"]
    with pytest.raises(RnnlmError, match="unknown level"):
        load_ptb(tmp_path / "ptb", level="byte")


def test_data_dir_env_var_is_used_and_flag_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = write_corpus(tmp_path / "env", TINY)
    flag_dir = write_corpus(tmp_path / "flag", {**TINY, "ptb.train.txt": TINY["ptb.train.txt"] + b"only-in-flag\n"})
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))
    assert locate_ptb(level="word") == env_dir
    assert locate_ptb(flag_dir, level="word") == flag_dir
    assert "only-in-flag" in load_ptb(flag_dir).vocab and "only-in-flag" not in load_ptb().vocab


# --------------------------------------------------------------------------- batching


def test_batchify_matches_hand_layout() -> None:
    stream = np.arange(26, dtype=np.int64)  # a..z as 0..25
    expected = np.array(
        [[0, 6, 12, 18], [1, 7, 13, 19], [2, 8, 14, 20], [3, 9, 15, 21], [4, 10, 16, 22], [5, 11, 17, 23]]
    )  # 26 // 4 = 6 rows; 24 and 25 dropped; column b is the stretch 6b .. 6b+5
    batched = batchify(stream, 4)
    assert batched.shape == (6, 4) and batched.dtype == np.int64
    np.testing.assert_array_equal(batched, expected)
    np.testing.assert_array_equal(batchify(stream, 1)[:, 0], stream)


def test_batchify_refuses_short_stream() -> None:
    batchify(np.arange(8), 4)  # exactly 2 rows is enough
    with pytest.raises(RnnlmError, match="too short"):
        batchify(np.arange(7), 4)


def test_bptt_covers_every_target_once_in_order() -> None:
    batched = batchify(np.arange(23, dtype=np.int64), 2)  # (11, 2)
    batches = BpttBatches(batched, bptt=3)
    pairs = list(batches)
    assert len(batches) == len(pairs) == 4  # 10 targets per column: 3 + 3 + 3 + 1
    assert [x.shape for x, _ in pairs] == [(3, 2), (3, 2), (3, 2), (1, 2)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in pairs]), batched[:-1])
    np.testing.assert_array_equal(np.concatenate([y for _, y in pairs]), batched[1:])
    for x, y in pairs[:-1]:
        np.testing.assert_array_equal(y[:-1], x[1:])  # y is x one step later


def test_bptt_windows_resume_matches_tail_of_full_pass() -> None:
    batches = BpttBatches(batchify(np.arange(100, dtype=np.int64), 3), bptt=5)  # (33, 3): 7 windows
    full = list(batches.windows())
    assert [i for i, _, _ in full] == list(range(7))
    for start in (0, 4, 6, 7):
        tail = list(batches.windows(start))
        assert [i for i, _, _ in tail] == list(range(start, 7))
        for (_, x, y), (_, xf, yf) in zip(tail, full[start:], strict=True):
            np.testing.assert_array_equal(x, xf)
            np.testing.assert_array_equal(y, yf)
    with pytest.raises(RnnlmError, match="outside"):
        batches.windows(8)  # refused at the call, not at the first next()


# --------------------------------------------------------------------------- verification


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_verify_refuses_corrupt_or_truncated_file(tmp_path: Path, damage: str) -> None:
    directory = write_corpus(tmp_path / "ptb", TINY)
    good = TINY["ptb.valid.txt"]
    bad = good.replace(b"bird", b"bard") if damage == "flip" else good[:-3]
    (directory / "ptb.valid.txt").write_bytes(bad)
    with pytest.raises(RnnlmError) as info:
        verify_files(directory, data.ptb_filenames("word"))
    message = info.value.message
    assert "ptb.valid.txt" in message and "corrupt or truncated" in message
    assert sha(good) in message and sha(bad) in message


def test_verify_falls_back_to_canonical_table(tmp_path: Path) -> None:
    directory = write_corpus(tmp_path / "ptb", TINY, manifest=False)
    with pytest.raises(RnnlmError) as info:
        verify_files(directory, ["ptb.train.txt"])
    assert data.CHECKSUMS["ptb.train.txt"] in info.value.message
    (directory / "notes.txt").write_text("hello\n")
    with pytest.raises(RnnlmError, match="notes.txt has no known sha256"):
        verify_files(directory, ["notes.txt"])


def test_verify_refuses_empty_file(tmp_path: Path) -> None:
    directory = write_corpus(tmp_path / "ptb", {**TINY, "ptb.test.txt": b""})
    with pytest.raises(RnnlmError, match=r"ptb\.test\.txt is empty"):
        verify_files(directory, data.ptb_filenames("word"))


def test_verify_refuses_invalid_utf8_naming_offset(tmp_path: Path) -> None:
    directory = write_corpus(tmp_path / "ptb", {**TINY, "ptb.test.txt": b" a \xff dog \n"})
    for attempt in (lambda: verify_files(directory, ["ptb.test.txt"]), lambda: load_ptb(directory)):
        with pytest.raises(RnnlmError) as info:
            attempt()
        assert "ptb.test.txt" in info.value.message and "offset 3" in info.value.message


# --------------------------------------------------------------------------- locating and downloading


def test_missing_data_dir_names_flag_and_does_not_download(tmp_path: Path, isolated: list) -> None:
    with pytest.raises(RnnlmError) as info:
        locate_ptb(tmp_path / "nope")
    assert str(tmp_path / "nope") in info.value.message and "--data-dir" in info.value.message
    assert isolated == []


def test_env_dir_lacking_files_names_variable_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: list
) -> None:
    files = {k: v for k, v in TINY.items() if k != "ptb.test.txt"}
    monkeypatch.setenv(data.ENV_VAR, str(write_corpus(tmp_path / "partial", files)))
    with pytest.raises(RnnlmError) as info:
        load_ptb()
    message = info.value.message
    assert "RNNLM_DATA_DIR" in message and "ptb.test.txt" in message and str(tmp_path / "partial") in message
    assert isolated == []  # an explicit dir never falls through to a download


@pytest.mark.parametrize("download", [True, False])
def test_offline_and_nothing_found_is_one_clear_error(isolated: list, download: bool) -> None:
    with pytest.raises(RnnlmError) as info:
        load_ptb(download=download)
    message = info.value.message
    assert info.value.code == 2 and "\n" not in message
    assert "--data-dir" in message and "RNNLM_DATA_DIR" in message
    assert len(isolated) == (1 if download else 0)
    if download:
        assert "network is unreachable" in message


def test_download_fills_cache_then_cache_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: list
) -> None:
    archive = tgz(TINY)
    served: list[tuple[str, float]] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        served.append((url, timeout))
        return io.BytesIO(archive)

    monkeypatch.setattr(data, "CHECKSUMS", {name: sha(blob) for name, blob in TINY.items()})
    monkeypatch.setattr(data, "PTB_URL", "http://example.invalid/simple-examples.tgz")
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)

    corpus = load_ptb(level="char")
    cache = tmp_path / "xdg-cache" / "rnnlm" / "ptb"
    assert data.cache_dir() == cache
    assert served == [("http://example.invalid/simple-examples.tgz", data.DOWNLOAD_TIMEOUT_S)]
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == TINY  # all six, no temp files left
    assert corpus.vocab.decode(corpus.test) == ["b", "<eos>"]

    assert locate_ptb(level="word") == cache
    assert len(served) == 1  # the second call is served from the cache


def test_corrupt_download_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "CHECKSUMS", {name: sha(blob) for name, blob in TINY.items()})
    archive = tgz({**TINY, "ptb.test.txt": b" a cat \n"})
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive))
    with pytest.raises(RnnlmError) as info:
        locate_ptb()
    assert "ptb.test.txt is corrupt" in info.value.message and "--data-dir" in info.value.message
    assert not (tmp_path / "xdg-cache" / "rnnlm" / "ptb").exists()


# --------------------------------------------------------------------------- the real corpus


def _real_ptb_dir() -> Path | None:
    candidates = [Path(_REAL_ENV_DIR)] if _REAL_ENV_DIR else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared/data/ptb")
    return next((c for c in candidates if c.is_dir()), None)


@pytest.mark.parametrize(
    ("level", "sizes", "types"),
    [("word", (929_589, 73_760, 82_430), 10_000), ("char", None, 51)],
)
def test_real_ptb_counts(level: str, sizes: tuple[int, int, int] | None, types: int) -> None:
    directory = _real_ptb_dir()
    if directory is None:
        pytest.skip(f"no real PTB: {data.ENV_VAR} unset and ../shared/data/ptb absent (tests never download)")
    corpus = load_ptb(directory, level=level, download=False)
    if sizes is not None:
        assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == sizes
    assert len(corpus.vocab) == types
    if level == "char":  # 49 characters + <eos> + <unk>, which never occurs in char train
        assert corpus.vocab.itos[-1] == "<unk>" and "_" in corpus.vocab
        # Independent count: every character plus one <eos> per line. ptb.char.train.txt ends with
        # "\n " (a last line holding one space, no newline), so it has 42,069 lines, not 42,068.
        text = (directory / "ptb.char.train.txt").read_text(encoding="utf-8")
        n_lines = len(text.splitlines())
        assert int((corpus.train == corpus.vocab.eos_id).sum()) == n_lines == 42_069
        assert len(corpus.train) == len(text.split()) + n_lines
