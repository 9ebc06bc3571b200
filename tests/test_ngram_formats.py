"""`rnnlm score --format srilm|kenlm`: the layouts of SRILM's `ngram -ppl` and KenLM's `query`, whose
log10 numbers must be `rnnlm score --per-line --json`'s nats divided by ln 10, exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from rnnlm.serve import LanguageModel
from typer.testing import CliRunner

from rnnlm.cli import app

LN10 = math.log(10)
LINES = ["the stock market fell", "shares of zorg rose sharply", "the company said it was a new year for the bank",
         "prices rose"]  # "zorg" and "sharply" are out of the test vocabulary


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    f = tmp_path / "s.txt"
    f.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


def per_line(bundle: Path, f: Path) -> list[dict]:
    """`rnnlm score --per-line --per-token --json`: the reference numbers, in nats."""
    code, out, err = cli("score", str(f), "--model", str(bundle), "--per-line", "--per-token", "--json")
    assert code == 0, err
    return [r for r in map(json.loads, out.splitlines()) if not r.get("total")]


def in_vocab_nats(row: dict) -> float:
    """Σ ln p over a line's in-vocabulary tokens, summed as the runtime sums them (numpy, float64)."""
    import numpy as np

    return float(np.array([t["logprob"] for t in row["per_token"] if not t["oov"]], np.float64).sum())


# ------------------------------------------------------------------------------ SRILM


SUMMARY = re.compile(r"^file (?P<name>.+): (?P<s>\d+) sentences, (?P<w>\d+) words, (?P<o>\d+) OOVs\n"
                     r"(?P<z>\d+) zeroprobs, logprob= (?P<l>\S+) ppl= (?P<ppl>\S+) ppl1= (?P<ppl1>\S+)\n$")
SENTENCE = re.compile(r"^(\d+) sentences, (\d+) words, (\d+) OOVs\n(\d+) zeroprobs, logprob= (\S+) ppl= (\S+) ppl1= (\S+)$",
                      re.M)
WORD = re.compile(r"^\tp\( (\S+) \| (.+?)\) \t= (\[rnn\] (\S+) \[ (\S+) \]|\[OOV\] 0 \[ -inf \])$", re.M)


def test_srilm_summary_is_log10_of_the_nats_exactly(lstm_bundle: Path, text: Path) -> None:
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "srilm")
    assert code == 0, err
    m = SUMMARY.match(out)
    assert m is not None, out
    rows = per_line(lstm_bundle, text)
    words = sum(len(line.split()) for line in LINES)
    oov = sum(r["oov"] for r in rows)
    assert (int(m["s"]), int(m["w"]), int(m["o"]), int(m["z"])) == (4, words, 2, 0) and oov == 2
    total = 0.0
    for r in rows:
        total += in_vocab_nats(r)
    logprob = float(m["l"])
    assert logprob == total / LN10  # exact: the same float64 nats, divided by ln 10
    assert float(m["ppl"]) == pytest.approx(10 ** (-logprob / (words - oov + 4)), rel=1e-12)  # </s> counted
    assert float(m["ppl1"]) == pytest.approx(10 ** (-logprob / (words - oov)), rel=1e-12)  # </s> not counted
    assert m["name"] == str(text)


def test_srilm_debug_1_and_2_per_sentence_and_per_word(lstm_bundle: Path, text: Path) -> None:
    rows = per_line(lstm_bundle, text)
    code, one, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "srilm", "--debug", "1")
    assert code == 0, err
    stats = SENTENCE.findall(one)
    assert len(stats) == 4 and one.splitlines()[-2].startswith(f"file {text}: 4 sentences")  # then the summary
    for line, r, st in zip(LINES, rows, stats, strict=True):
        assert line + "\n" in one
        assert (int(st[0]), int(st[1]), int(st[2])) == (1, len(line.split()), r["oov"])
        assert float(st[4]) == in_vocab_nats(r) / LN10
    code, two, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "srilm", "--debug", "2")
    assert code == 0, err
    words = WORD.findall(two)
    tokens = [t for r in rows for t in r["per_token"]]
    assert len(words) == len(tokens) == sum(len(line.split()) + 1 for line in LINES)
    for (word, _context, _, prob, log10p), t in zip(words, tokens, strict=True):
        if t["oov"]:
            assert prob == "" and log10p == ""  # SRILM's [OOV] 0 [ -inf ]
        else:
            assert float(log10p) == t["logprob"] / LN10
            assert float(prob) == pytest.approx(math.exp(t["logprob"]), rel=1e-12)
        assert word == ("</s>" if t["token"] == "<eos>" else t["token"])
    assert words[0][1] == "<s> " and words[1][1] == "the ..."
    assert SENTENCE.findall(two) == stats


# ------------------------------------------------------------------------------ KenLM


def parse_kenlm(out: str) -> tuple[list[tuple[list[tuple[str, int, int, float]], float, int]], dict[str, str]]:
    lines, summary = [], {}
    for line in out.splitlines():
        if line.startswith("Total: ") or "\tTotal: " in line:
            *tokens, tail = line.split("\t")
            words = []
            for tok in tokens:
                wid, n, lp = tok.rsplit(" ", 2)
                word, _, i = wid.rpartition("=")
                words.append((word, int(i), int(n), float(lp)))
            t = re.fullmatch(r"Total: (\S+) OOV: (\d+)", tail)
            assert t is not None, tail
            lines.append((words, float(t[1]), int(t[2])))
        else:
            key, value = line.split(":\t")
            summary[key] = value
    return lines, summary


def test_kenlm_query_layout_and_exact_log10(lm: LanguageModel, lstm_bundle: Path, text: Path) -> None:
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "kenlm")
    assert code == 0, err
    lines, summary = parse_kenlm(out)
    rows = per_line(lstm_bundle, text)
    for (words, total, oov), r in zip(lines, rows, strict=True):
        assert total == -r["nll"] / LN10  # exact, OOVs' <unk> probability included as KenLM includes it
        assert oov == r["oov"]
        assert [w for w, *_ in words] == [t["token"] for t in r["per_token"][:-1]] + ["</s>"]
        for (_w, wid, n, lp), (i, t) in zip(words, enumerate(r["per_token"]), strict=True):
            assert lp == t["logprob"] / LN10
            assert wid == (0 if t["oov"] else lm.vocab.index(t["token"]) + 1)  # vocab.txt line; 0 is unknown
            assert n == i + 2  # <s> and every word before, plus this one
    tokens = sum(r["tokens"] for r in rows)
    oov = sum(r["oov"] for r in rows)
    total = sum(t for _, t, _ in lines)
    oov_only = sum(lp for words, _, _ in lines for _, wid, _, lp in words if wid == 0)
    assert summary["Tokens"] == str(tokens) and summary["OOVs"] == str(oov)
    assert float(summary["Perplexity including OOVs"]) == pytest.approx(10 ** (-total / tokens), rel=1e-12)
    assert float(summary["Perplexity excluding OOVs"]) == pytest.approx(10 ** (-(total - oov_only) / (tokens - oov)),
                                                                        rel=1e-12)


def test_no_eos_leaves_out_the_end_of_sentence(lm: LanguageModel, lstm_bundle: Path, text: Path) -> None:
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "kenlm", "--no-eos")
    assert code == 0, err
    lines, summary = parse_kenlm(out)
    assert all(words[-1][0] != "</s>" for words, _, _ in lines)
    assert summary["Tokens"] == str(sum(len(line.split()) for line in LINES))
    for (words, total, _), line in zip(lines, LINES, strict=True):
        with_eos = lm.score(line, per_token=True).per_token
        assert with_eos is not None  # the words' probabilities do not depend on whether </s> follows
        assert [lp for *_, lp in words] == pytest.approx([v / LN10 for _, v, _ in with_eos[:-1]], rel=1e-6)
        assert total == pytest.approx(sum(v for _, v, _ in with_eos[:-1]) / LN10, rel=1e-6)


def test_no_bos_continues_the_previous_line(lm: LanguageModel, lstm_bundle: Path, text: Path) -> None:
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "kenlm", "--no-bos")
    assert code == 0, err
    lines, _ = parse_kenlm(out)
    stream = lm.score("\n".join(LINES), per_token=True).per_token  # the file as one stream, <eos> between lines
    assert stream is not None
    assert [lp for words, _, _ in lines for *_, lp in words] == pytest.approx([v / LN10 for _, v, _ in stream], rel=1e-6)
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), "--format", "srilm", "--no-bos", "--no-eos")
    assert code == 0, err
    joined = lm.score(" ".join(LINES), per_token=True).per_token  # no </s> anywhere: one sentence of every word
    assert joined is not None
    m = SUMMARY.match(out)
    assert m is not None and int(m["s"]) == 4
    assert float(m["l"]) == pytest.approx(sum(v for _, v, o in joined[:-1] if not o) / LN10, rel=1e-6)
    assert float(m["ppl"]) == float(m["ppl1"])  # no end-of-sentence tags to count


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("args", "words"), [
    (("--format", "arpa"), ("--format",)),
    (("--format", "srilm", "--debug", "3"), ("--debug",)),
    (("--format", "kenlm", "--debug", "1"), ("--debug", "srilm")),
    (("--no-bos",), ("--no-bos",)),
    (("--format", "srilm", "--json"), ("--json",)),
    (("--format", "kenlm", "--per-token"), ("--per-token",)),
])
def test_refusals(args: tuple[str, ...], words: tuple[str, ...], lstm_bundle: Path, text: Path) -> None:
    code, out, err = cli("score", str(text), "--model", str(lstm_bundle), *args)
    assert code == 2 and out == "", (code, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and all(w in err for w in words), err


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"the market\n\xff\xfe fell\n"])
def test_empty_or_invalid_files_print_nothing(content: bytes, lstm_bundle: Path, tmp_path: Path) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    for fmt in ("srilm", "kenlm"):
        code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--format", fmt)
        assert code == 2 and out == "", (out, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_words_are_printed_as_written(lstm_bundle: Path, tmp_path: Path) -> None:
    f = tmp_path / "caps.txt"
    f.write_text("The Stock market FELL\n", encoding="utf-8")
    code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--format", "kenlm")
    assert code == 0, err
    lines, _ = parse_kenlm(out)
    assert [(w, wid) for w, wid, _, _ in lines[0][0]][:2] == [("The", 1), ("Stock", 2)]  # scored as "the", "stock"
    code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--format", "srilm", "--debug", "2")
    assert code == 0, err
    assert "\tp( Stock | The ...) \t= [rnn]" in out and "The Stock market FELL\n" in out
