"""A user's own corpus: one tokenizer from training to serving.

The fidelity check trains every cell at word and character level on text with capitals, numbers,
blank lines, CRLF, tabs, non-ASCII and no final newline, exports it, and requires that
``rnnlm eval --split test`` (PyTorch, the checkpoint's tokenizer) and ``rnnlm score test.txt``
(onnxruntime, the manifest's tokenizer) agree on the token count, the OOV count and the perplexity.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rnnlm.text as text_mod
from rnnlm.cli import app
from rnnlm.data import DataFiles, load_corpus, tokenize_file
from rnnlm.text import BOUNDARY, EOS, TextSpec, Tokenizer, lines_of, pieces
from rnnlm.vocab import Vocabulary

runner = CliRunner()

TRAIN = (
    "The Stock Market fell 1,000 points as prices rose 3.5 %\r\n"
    "\n"
    "Café owners in Zürich said the market was calm 😀\r\n"
    "中文 text\tand tabs\tin the same line\n"
    "THE stock market ROSE 12 points in 2024\n"
    "   \n"
    "investors said the company would report profit of 1.5 billion\n"
) * 6 + "the market closed at 3,000 without a newline"
VALID = "The market fell 7 points\n\nprices rose in Zürich 😀\r\nthe café was closed\n"
TEST = "\ufeffThe Stock market rose 2.5 %\n\nunseen words Ωmega appear here 中文\r\nthe market\tfell\nlast line é"

TINY_MODEL = ["--set", "emb_size=16", "--set", "hidden_size=16", "--set", "hyper_size=8", "--set", "hyper_embed=2",
              "--set", "rhn_depth=2", "--set", "num_layers=1", "--set", "batch_size=2", "--set", "bptt=8"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def write_corpus(root: Path) -> DataFiles:
    root.mkdir(parents=True, exist_ok=True)
    files = DataFiles(root / "mine.train", root / "held-out.txt", root / "test.txt")
    for path, text in zip((files.train, files.valid, files.test), (TRAIN, VALID, TEST), strict=True):
        assert path is not None
        path.write_bytes(text.encode("utf-8"))
    return files


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the fidelity check


@pytest.mark.parametrize("level", ["word", "char"])
@pytest.mark.parametrize("cell", ["lstm", "rhn", "hypernets"])
def test_eval_and_the_exported_bundle_agree_on_an_own_corpus(tmp_path: Path, cell: str, level: str) -> None:
    files = write_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    normalization = ["--lowercase", "--numbers", "N"] if level == "word" else []
    code, _, err = invoke("train", "--cell", cell, "--level", level, "--train", str(files.train), "--valid",
                          str(files.valid), "--test", str(files.test), "--out", str(out), "--max-steps", "3",
                          "--device", "cpu", "--no-tensorboard", *normalization, *TINY_MODEL)
    assert code == 0, err
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["files"]["test"]["sha256"] and recorded["files"]["train"]["lines"] == TRAIN.count("\n") + 1

    code, out_eval, err = invoke("eval", str(out), "--split", "test", "--json", "--device", "cpu")
    assert code == 0, err
    evaluated = json.loads(out_eval)
    empty = tmp_path / "no-ptb"
    empty.mkdir()
    code, _, err = invoke("export", str(out), "--out", str(tmp_path / "bundle"), "--chunk", "8", "--data-dir", str(empty))
    assert code == 0, err
    code, out_score, err = invoke("score", str(files.test), "--model", str(tmp_path / "bundle"), "--json",
                                  "--device", "cpu")
    assert code == 0, err
    scored = last_json(out_score)

    assert (scored["tokens"], scored["oov"]) == (evaluated["tokens"], evaluated["oov"])
    assert scored["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-6)
    # The counts are the tokenizer's, independently: every line (the blank one too) ends in <eos>.
    spec = TextSpec(level=level, lowercase=level == "word", numbers="N" if level == "word" else "")
    tokens = list(spec.text_words(TEST))
    assert evaluated["tokens"] == len(tokens) and tokens.count(EOS) == 5
    assert evaluated["oov"] > 0 and "\ufeff" not in "".join(tokens)
    assert (out / "data.json").is_file() and json.loads((tmp_path / "bundle" / "manifest.json").read_text())["text"][
        "level"] == level


# ------------------------------------------------------------------------------ the tokenizer


def test_word_spec_normalizes_as_recorded() -> None:
    spec = TextSpec(lowercase=True, numbers="N")
    assert spec.line_words("The 1,000 3.5 -2 N 1980s <unk> Zürich") == ["the", "N", "N", "N", "N", "1980s", "<unk>",
                                                                     "zürich", EOS]
    assert TextSpec().line_words("The 1,000") == ["The", "1,000", EOS]  # verbatim by default (PTB)
    assert TextSpec().line_words("  \t ") == [EOS] and TextSpec(blank_lines="skip").line_words(" ") == []


def test_char_spec_marks_word_boundaries_once() -> None:
    spec = TextSpec(level="char", lowercase=True)
    assert spec.line_words(" Ab  c\tD ") == ["a", "b", BOUNDARY, "c", BOUNDARY, "d", EOS]
    assert TextSpec(level="char", char_input="spaced").line_words("a b _ c") == ["a", "b", "_", "c", EOS]


def test_training_and_serving_read_a_file_the_same_way(tmp_path: Path) -> None:
    """BOM, CRLF, blank lines, whitespace-only lines, no final newline: training's reader and the
    runtime's stream and in-memory readers give the same tokens."""
    path = tmp_path / "t.txt"
    path.write_bytes(TEST.encode("utf-8"))
    for spec in (TextSpec(lowercase=True, numbers="N"), TextSpec(level="char"), TextSpec(blank_lines="skip")):
        from_training = tokenize_file(path, spec)
        tok = Tokenizer(spec, Vocabulary.build(from_training))
        streamed = [t.text for t in tok.stream(io.BytesIO(path.read_bytes()), "t")]
        in_memory = [t.text for t in tok.text_tokens(TEST)]
        assert from_training == streamed == in_memory
        assert from_training[0] in ("the", "The", "T")  # the byte-order mark is not part of the first word


@pytest.mark.parametrize("block", [4, 7, 16])
def test_long_lines_are_cut_between_words_at_both_levels(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_mod, "BLOCK", block)  # read at the call: the cutting path really runs
    for line in ("x " + "y" * 60, "ab cd ef gh ij kl mn op qr st " * 3, "one two\tthree  four five six seven " * 2):
        data = (line + "\nnext line\n").encode()
        parts = list(pieces(io.BytesIO(data), "t"))
        assert any(not end for _, end in parts), "the line was never cut"
        rebuilt, current = [], ""
        for piece, end in parts:
            if current:  # a cut falls before whitespace: no word is split
                assert piece[:1].isspace(), (current, piece)
            current += piece
            if end:
                rebuilt, current = [*rebuilt, current], ""
        assert rebuilt == [line, "next line"]
        for spec in (TextSpec(), TextSpec(level="char")):
            streamed = list(spec.stream_words(io.BytesIO(data), "t"))
            assert streamed == list(spec.text_words(data.decode())), (spec.level, line)


def test_per_line_refuses_a_line_one_character_over_the_limit() -> None:
    limit = 20
    for line in ("a" * (limit + 1), "ab " * 7, "x" * limit):
        data = (line + "\nok\n").encode()
        if len(line) > limit:
            with pytest.raises(text_mod.TextError, match="longer than 20"):
                list(lines_of(io.BytesIO(data), "t", max_chars=limit))
        else:
            assert list(lines_of(io.BytesIO(data), "t", max_chars=limit)) == [line, "ok"]


def test_cli_per_line_refuses_two_million_characters(tmp_path: Path, lstm_bundle: Path) -> None:
    f = tmp_path / "long.txt"
    f.write_text("the market " * 200_000 + "\n", encoding="utf-8")  # 2,200,000 characters, two blocks' worth
    code, _, err = invoke("score", str(f), "--per-line", "--model", str(lstm_bundle), "--device", "cpu")
    assert code == 2 and "longer than 1,048,576" in err


# ------------------------------------------------------------------------------ the vocabulary


def test_vocab_size_and_min_count_keep_the_most_frequent_deterministically() -> None:
    tokens = ["b", "a", "a", "c", "b", "d", EOS, "e", EOS]
    assert Vocabulary.build(tokens).itos == ["b", "a", EOS, "c", "d", "e", "<unk>"]
    # Ties (c, d, e once each) are broken by first appearance; dropped tokens become <unk>.
    assert Vocabulary.build(tokens, max_size=5).itos == ["b", "a", "<unk>", EOS, "c"]
    assert Vocabulary.build(tokens, min_count=2).itos == ["<unk>", "b", "a", EOS]
    with pytest.raises(text_mod.RnnlmError, match="at least 3"):
        Vocabulary.build(tokens, max_size=1)


def test_oov_counts_are_recorded(tmp_path: Path) -> None:
    files = write_corpus(tmp_path)
    corpus = load_corpus(files, TextSpec(lowercase=True, numbers="N"), vocab_size=12)
    assert len(corpus.vocab) == 12
    for split in ("train", "valid", "test"):
        tokens = tokenize_file(getattr(files, split), corpus.spec)
        record = corpus.records[split]
        assert record.tokens == len(tokens) == len(corpus.split(split))
        assert record.oov == sum(t not in corpus.vocab for t in tokens) > 0


def test_training_summary_and_metrics_count_oovs(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c")
    code, _, err = invoke("train", "--train", str(files.train), "--valid", str(files.valid), "--out",
                          str(tmp_path / "m"), "--max-steps", "2", "--vocab-size", "20", "--device", "cpu",
                          "--no-tensorboard", *TINY_MODEL)
    assert code == 0, err
    data = json.loads((tmp_path / "m" / "data.json").read_text())
    metrics = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["valid_oov"] == data["files"]["valid"]["oov"] > 0 and data["vocab_size"] == 20
    assert f"valid {data['files']['valid']['tokens']:,} tokens ({data['files']['valid']['oov']:,} OOV)" in err


def test_eval_file_uses_the_model_tokenizer(tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "c")
    invoke("train", "--train", str(files.train), "--valid", str(files.valid), "--out", str(tmp_path / "m"),
           "--max-steps", "2", "--lowercase", "--device", "cpu", "--no-tensorboard", *TINY_MODEL)
    upper, lower = tmp_path / "upper.txt", tmp_path / "lower.txt"
    upper.write_text("THE MARKET FELL\n", encoding="utf-8")
    lower.write_text("the market fell\n", encoding="utf-8")
    results = [json.loads(invoke("eval", str(tmp_path / "m"), "--file", str(f), "--json", "--device", "cpu")[1])
               for f in (upper, lower)]
    assert results[0]["oov"] == results[1]["oov"] == 0 and results[0]["nll"] == results[1]["nll"]
    assert math.isfinite(results[0]["ppl"])
    # A split the checkpoint was not trained with is refused with a clear line.
    code, _, err = invoke("eval", str(tmp_path / "m"), "--split", "test", "--device", "cpu")
    assert code == 2 and "without a test file" in err


# ------------------------------------------------------------------------------ bad input


def bad_inputs(root: Path) -> dict[str, tuple[list[str], str]]:
    files = write_corpus(root / "c")
    empty, binary, foreign = root / "empty.txt", root / "binary.bin", root / "foreign.txt"
    empty.write_bytes(b"")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    foreign.write_text("qqq zzz\nxxx\n", encoding="utf-8")
    return {
        "empty train": (["--train", str(empty), "--valid", str(files.valid)], "is empty"),
        "binary train": (["--train", str(binary), "--valid", str(files.valid)], "binary data"),
        "valid without a known word": (["--train", str(files.train), "--valid", str(foreign)], "none of its"),
        "vocab size 1": (["--train", str(files.train), "--valid", str(files.valid), "--vocab-size", "1"], "at least 3"),
        "missing train": (["--train", str(root / "nope.txt"), "--valid", str(files.valid)], "no such file"),
        "valid without train": (["--valid", str(files.valid)], "go with --train"),
    }


@pytest.mark.parametrize("case", ["empty train", "binary train", "valid without a known word", "vocab size 1",
                                  "missing train", "valid without train"])
def test_bad_corpus_gets_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    args, words = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, err = invoke("train", *args, "--out", str(out), "--device", "cpu", *TINY_MODEL)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert not out.exists()
