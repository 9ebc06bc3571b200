"""`rnnlm rescore`: n-best lists in Kaldi's, SRILM's, NeMo's and plain formats, checked against
`rnnlm score --per-line --json` of the same sentences, a hand computation of the combined score,
the one-stream score for carried context, and jiwer for the WER of the grid search."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import jiwer
import numpy as np
import pytest
from rnnlm.serve import LanguageModel
from rnnlm.serve.nbest import Hypothesis
from rnnlm.serve.rescore import Rescorer, Weights
from rnnlm.serve.tuning import word_errors
from typer.testing import CliRunner

from rnnlm.cli import app

LN10 = math.log(10)
# Two utterances of three and two hypotheses, lower-case words of the test vocabulary (and one OOV).
UTTS = {
    "utt1": ["the stock market fell", "the stock market rose", "stock the market fell zorg"],
    "utt2": ["shares of the bank rose", "shares rose"],
}
KEYS = [(u, n, text) for u, hyps in UTTS.items() for n, text in enumerate(hyps, 1)]


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def assert_one_error_line(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (code, out, err)
    assert out == "", out  # nothing half-written
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


def per_line_nll(bundle: Path, tmp_path: Path, sentences: list[str]) -> list[float]:
    """What `rnnlm score --per-line --json` says of each sentence: the reference for every cost."""
    f = tmp_path / "sentences.txt"
    f.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    code, out, err = cli("score", str(f), "--model", str(bundle), "--per-line", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    return [r["nll"] for r in rows if not r.get("total")]


def rescore_json(bundle: Path, *args: str) -> list[dict]:
    code, out, err = cli("rescore", *args, "--model", str(bundle), "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ------------------------------------------------------------------------------ input formats


def write_kaldi(tmp_path: Path) -> list[str]:
    (tmp_path / "nbest.txt").write_text("".join(f"{u}-{n} {t}\n" for u, n, t in KEYS), encoding="utf-8")
    return [str(tmp_path / "nbest.txt")]


def write_srilm_list(tmp_path: Path) -> list[str]:
    paths = []
    for u, hyps in UTTS.items():
        p = tmp_path / f"{u}.nbest"
        p.write_text("".join(f"-{10 + i}.5 -{3 + i}.25 {len(t.split())} {t}\n" for i, t in enumerate(hyps)), encoding="utf-8")
        paths.append(str(p))
    (tmp_path / "list.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
    return [str(tmp_path / "list.txt")]


def write_nemo(tmp_path: Path) -> list[str]:
    rows = [f"{t}\t-{i}.5\n" for hyps in UTTS.values() for i, t in enumerate((hyps + hyps)[:3])]
    (tmp_path / "beams.tsv").write_text("".join(rows), encoding="utf-8")
    return [str(tmp_path / "beams.tsv"), "--beam-size", "3"]


def write_lines(tmp_path: Path) -> list[str]:
    (tmp_path / "hyps.txt").write_text("".join(t + "\n" for _, _, t in KEYS), encoding="utf-8")
    (tmp_path / "group.txt").write_text("".join(u + "\n" for u, _, _ in KEYS), encoding="utf-8")
    return [str(tmp_path / "hyps.txt"), "--group", str(tmp_path / "group.txt")]


WRITERS = {"kaldi": write_kaldi, "srilm": write_srilm_list, "nemo": write_nemo, "lines": write_lines}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_gives_the_costs_of_score_per_line(fmt: str, lstm_bundle: Path, tmp_path: Path) -> None:
    args = WRITERS[fmt](tmp_path)
    detected = rescore_json(lstm_bundle, *args)
    explicit = rescore_json(lstm_bundle, *args, "--format", fmt)
    assert detected == explicit  # the format is detected from the first line
    hyps = [h for u in detected for h in u["hypotheses"]]
    expected = per_line_nll(lstm_bundle, tmp_path, [h["text"] for h in hyps])
    assert len(hyps) == len(expected) >= 5
    for h, nll in zip(hyps, expected, strict=True):
        assert h["lm_cost"] == pytest.approx(nll, rel=1e-6)
        assert h["tokens"] == len(h["text"].split()) + 1
    assert sum(h["oov"] for h in hyps) >= 1  # "zorg" is scored as <unk> and counted


def test_srilm_scores_become_costs_in_nats(lstm_bundle: Path, tmp_path: Path) -> None:
    rows = rescore_json(lstm_bundle, *write_srilm_list(tmp_path))
    assert [u["utt"] for u in rows] == ["utt1", "utt2"]
    first = rows[0]["hypotheses"][0]["scores"]
    assert first["am"] == 10.5 * LN10 and first["lm"] == 3.25 * LN10  # −(log10 score)·ln 10


def test_costs_file_is_kaldi_key_cost(lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    costs = tmp_path / "rnn.scores"
    code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), "--costs", str(costs))
    assert code == 0, err
    got = dict(line.split() for line in costs.read_text(encoding="utf-8").splitlines())
    expected = per_line_nll(lstm_bundle, tmp_path, [t for _, _, t in KEYS])
    assert list(got) == [f"{u}-{n}" for u, n, _ in KEYS]
    assert [float(v) for v in got.values()] == pytest.approx(expected, rel=1e-6)
    assert [line.split()[0] for line in out.splitlines()] == ["utt1", "utt2"]  # best per utterance on stdout


# ------------------------------------------------------------------------------ the combined score


def test_combined_score_equals_a_hand_computation(lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    am = {f"{u}-{n}": 7.0 + 1.5 * n for u, n, _ in KEYS}
    ngram = {f"{u}-{n}": 20.0 - 2.0 * n for u, n, _ in KEYS}
    (tmp_path / "am.scores").write_text("".join(f"{k} {v}\n" for k, v in am.items()), encoding="utf-8")
    within_utterances_reversed = sorted(ngram.items(), key=lambda kv: (kv[0].split("-")[0], -int(kv[0].split("-")[1])))
    (tmp_path / "lm.scores").write_text("".join(f"{k} {v}\n" for k, v in within_utterances_reversed), encoding="utf-8")
    rows = rescore_json(lstm_bundle, *args, "--scores", f"am={tmp_path / 'am.scores'}",
                        "--scores", f"lm={tmp_path / 'lm.scores'}", "--weight", "am=0.3", "--lm-weight", "0.7",
                        "--word-penalty", "0.5", "--interpolate", "0.25")
    rnn = dict(zip([f"{u}-{n}" for u, n, _ in KEYS], per_line_nll(lstm_bundle, tmp_path, [t for *_, t in KEYS]), strict=True))
    for u in rows:
        totals = {}
        for h in u["hypotheses"]:
            k = h["key"]
            hand = 0.3 * am[k] + 0.7 * (0.25 * rnn[k] + 0.75 * ngram[k]) + 0.5 * len(h["text"].split())
            assert h["total"] == pytest.approx(hand, rel=1e-6)
            totals[k] = hand
        assert u["best"] == min(totals, key=totals.__getitem__)


def test_weights_change_the_winner(lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    short = rescore_json(lstm_bundle, *args, "--word-penalty", "100")
    long_ = rescore_json(lstm_bundle, *args, "--word-penalty", "-100")
    assert short[1]["best"] == "utt2-2" and long_[1]["best"] == "utt2-1"


# ------------------------------------------------------------------------------ carried context


def stream_costs(lm: LanguageModel, previous: str, hyps: list[str]) -> list[float]:
    """−ln P of each hypothesis scored after ``previous`` in one stream (the second line's tokens)."""
    out = []
    for h in hyps:
        tokens = lm.score(previous + "\n" + h, per_token=True).per_token
        assert tokens is not None
        out.append(-sum(lp for _, lp, _ in tokens[len(previous.split()) + 1 :]))
    return out


def test_carry_over_always_equals_one_stream(lm: LanguageModel, lstm_bundle: Path, tmp_path: Path) -> None:
    rows = rescore_json(lstm_bundle, *write_kaldi(tmp_path), "--carry-over", "always")
    best1 = rows[0]["text"]
    expected = stream_costs(lm, best1, UTTS["utt2"])
    assert [h["lm_cost"] for h in rows[1]["hypotheses"]] == pytest.approx(expected, rel=1e-5)
    fresh = rescore_json(lstm_bundle, *write_kaldi(tmp_path))
    assert fresh[0] == rows[0]  # the first utterance has nothing to carry
    assert [h["lm_cost"] for h in fresh[1]["hypotheses"]] != pytest.approx(expected, rel=1e-5)


def test_carry_over_speaker_follows_utt2spk(lm: LanguageModel, lstm_bundle: Path, tmp_path: Path) -> None:
    lines = ["a1-1 the stock market fell", "a1-2 the market fell", "b1-1 shares of the bank rose",
             "a2-1 prices rose", "a2-2 prices of bonds rose"]
    (tmp_path / "nbest.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "utt2spk").write_text("a1 spkA\nb1 spkB\na2 spkA\n", encoding="utf-8")
    rows = rescore_json(lstm_bundle, str(tmp_path / "nbest.txt"), "--carry-over", "speaker",
                        "--utt2spk", str(tmp_path / "utt2spk"))
    assert [u["utt"] for u in rows] == ["a1", "b1", "a2"]
    expected = stream_costs(lm, rows[0]["text"], ["prices rose", "prices of bonds rose"])
    assert [h["lm_cost"] for h in rows[2]["hypotheses"]] == pytest.approx(expected, rel=1e-5)


def test_runtime_sequence_logprobs_from(lm: LanguageModel) -> None:
    seqs = [[t.id for t in lm.tokenizer.line_tokens(s)] for s in ["the stock market fell", "shares rose", "a"]]
    plain = lm.sequence_logprobs(seqs)
    same, finals = lm.sequence_logprobs_from(seqs, final_states=True)
    assert all(np.array_equal(a, b) for a, b in zip(plain, same, strict=True))
    assert finals is not None and finals.batch == 3
    # continuing from the state of row 0 equals the one-stream scores of "the stock market fell\nshares rose"
    cont, _ = lm.sequence_logprobs_from([seqs[1]], finals, [0])
    stream = lm.score("the stock market fell\nshares rose", per_token=True).per_token
    assert stream is not None
    np.testing.assert_allclose(cont[0], [lp for _, lp, _ in stream[5:]], rtol=1e-5)


# ------------------------------------------------------------------------------ tuning against references


def test_word_errors_agree_with_jiwer() -> None:
    rng = np.random.default_rng(0)
    words = ["a", "b", "c", "d"]
    for _ in range(200):
        ref = list(rng.choice(words, rng.integers(1, 9)))
        hyp = list(rng.choice(words, rng.integers(0, 9)))
        out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
        assert word_errors(ref, hyp) == out.substitutions + out.deletions + out.insertions


def test_grid_search_wer_agrees_with_jiwer(lm: LanguageModel, lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    am = {f"{u}-{n}": 3.0 * n for u, n, _ in KEYS}
    (tmp_path / "am.scores").write_text("".join(f"{k} {v}\n" for k, v in am.items()), encoding="utf-8")
    refs = {"utt1": "the stock market fell", "utt2": "shares of the bank rose"}
    (tmp_path / "ref.txt").write_text("".join(f"{u} {t}\n" for u, t in refs.items()), encoding="utf-8")
    code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), "--scores", f"am={tmp_path / 'am.scores'}",
                         "--ref", str(tmp_path / "ref.txt"), "--grid-lm-weight", "0,0.5,3", "--grid-word-penalty",
                         "-3:3:3", "--json")
    assert code == 0, err
    grid = json.loads(out)
    assert len(grid["grid"]) == 9 and grid["ref_words"] == 9
    for point in grid["grid"]:  # each point's WER, recomputed by picking with the API and scoring with jiwer
        weights = Weights(lm_weight=point["lm_weight"], word_penalty=point["word_penalty"])
        picked = rescore_api(lm, weights, am)
        wer = jiwer.wer([refs[u] for u in picked], [picked[u] for u in picked])
        assert point["wer"] == pytest.approx(wer, abs=1e-12), point
    assert grid["best"]["wer"] == min(p["wer"] for p in grid["grid"])
    code, text, err = cli("rescore", *args, "--model", str(lstm_bundle), "--scores", f"am={tmp_path / 'am.scores'}",
                          "--ref", str(tmp_path / "ref.txt"))
    assert code == 0 and text.splitlines()[-1].startswith("best: lm_weight=")


def rescore_api(lm: LanguageModel, weights: Weights, am: dict[str, float]) -> dict[str, str]:
    from rnnlm.serve.nbest import Utterance

    utts = [Utterance(u, [Hypothesis(f"{u}-{n}", t.split(), "test", {"am": am[f"{u}-{n}"]})
                          for n, t in enumerate(hyps, 1)], "test") for u, hyps in UTTS.items()]
    return {s.id: s.best_hyp.hyp.text for s in Rescorer(lm, weights).run(utts)}


# ------------------------------------------------------------------------------ bad input


def bad(tmp_path: Path, name: str, content: bytes | str) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def test_a_malformed_line_names_file_and_line(lstm_bundle: Path, tmp_path: Path) -> None:
    f = bad(tmp_path, "n.txt", "utt1-1 the stock\nutt1-2 the market\nutt1 no number\n")
    code, out, err = cli("rescore", f, "--model", str(lstm_bundle), "--format", "kaldi", "--costs", str(tmp_path / "c"))
    assert_one_error_line(code, out, err, f"{f}:3")
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == [Path(f)]  # no file, no temp left
    srilm = bad(tmp_path, "s.nbest", "-1 -2 2 a b\n-1 x 2 a b\n")
    code, out, err = cli("rescore", srilm, "--model", str(lstm_bundle))
    assert_one_error_line(code, out, err, f"{srilm}:2", "lscore")


def test_mismatched_score_keys_are_named(lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    keys = [f"{u}-{n}" for u, n, _ in KEYS]
    missing = bad(tmp_path, "am1", "".join(f"{k} 1\n" for k in keys if k != "utt1-2"))
    code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), "--scores", f"am={missing}")
    assert_one_error_line(code, out, err, "utt1-2", "am=")
    extra = bad(tmp_path, "am2", "".join(f"{k} 1\n" for k in keys) + "utt3-1 4\n")
    code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), "--scores", f"am={extra}")
    assert_one_error_line(code, out, err, "utt3-1")
    stray = bad(tmp_path, "am3", "".join(f"{k} 1\n" for k in keys).replace("utt2-2", "utt2-9"))
    code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), "--scores", f"am={stray}")
    assert_one_error_line(code, out, err, "utt2-2", "utt2-9")


@pytest.mark.parametrize(("content", "words"), [(b"", ("empty",)), (b"\n \n", ("empty",)),
                                                (b"utt1-1 caf\xe9 fell\n", ("UTF-8",)),
                                                (b"utt1-1 a\x00b\n", ("binary",))])
def test_empty_and_non_utf8_files(content: bytes, words: tuple[str, ...], lstm_bundle: Path, tmp_path: Path) -> None:
    f = bad(tmp_path, "n.txt", content)
    code, out, err = cli("rescore", f, "--model", str(lstm_bundle))
    assert_one_error_line(code, out, err, *words)


def test_an_utterance_with_no_hypotheses(lstm_bundle: Path, tmp_path: Path) -> None:
    one = bad(tmp_path, "utt1.nbest", "-1 -2 2 the market\n")
    empty = bad(tmp_path, "utt2.nbest", "")
    lst = bad(tmp_path, "list.txt", f"{one}\n{empty}\n")
    code, out, err = cli("rescore", lst, "--model", str(lstm_bundle), "--format", "srilm")
    assert_one_error_line(code, out, err, "0 hypotheses", "utt2.nbest")


@pytest.mark.parametrize("args", [("--lm-weight", "nan"), ("--word-penalty", "nan"), ("--interpolate", "nan"),
                                  ("--weight", "am=nan"), ("--interpolate", "1.5")])
def test_a_weight_that_is_nan(args: tuple[str, str], lstm_bundle: Path, tmp_path: Path) -> None:
    code, out, err = cli("rescore", *write_kaldi(tmp_path), "--model", str(lstm_bundle), *args)
    assert_one_error_line(code, out, err, args[0])


def test_other_refusals(lstm_bundle: Path, tmp_path: Path) -> None:
    args = write_kaldi(tmp_path)
    for extra, words in [(("--carry-over", "speaker"), ("--utt2spk",)), (("--carry-over", "sometimes"), ("never",)),
                         (("--format", "nemo"), ("--beam-size",)), (("--format", "xml"), ("--format",)),
                         (("--scores", "am"), ("NAME=VALUE",)), (("--scores", "am=/nonexistent"), ("/nonexistent",))]:
        code, out, err = cli("rescore", *args, "--model", str(lstm_bundle), *extra)
        assert_one_error_line(code, out, err, *words)
    regrouped = bad(tmp_path, "r.txt", "u1-1 a\nu2-1 b\nu1-2 c\n")
    code, out, err = cli("rescore", regrouped, "--model", str(lstm_bundle))
    assert_one_error_line(code, out, err, "u1", f"{regrouped}:3")


# ------------------------------------------------------------------------------ size and memory


def test_one_utterance_with_100000_hypotheses(lm: LanguageModel) -> None:
    from rnnlm.serve.nbest import Utterance

    words = ["the", "stock", "market", "fell", "rose", "shares"]
    hyps = [Hypothesis(f"big-{n}", [words[n % 6], words[(n // 6) % 6]], "test") for n in range(100_000)]
    tracemalloc.start()
    try:
        [scored] = list(Rescorer(lm, Weights(), batch_size=512).run([Utterance("big", hyps, "test")]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(scored.hyps) == 100_000 and all(s.tokens == 3 for s in scored.hyps[:10])
    assert scored.hyps[0].cost == pytest.approx(scored.hyps[36].cost, rel=1e-6)  # the same words, the same cost
    assert peak < 120e6, peak  # beyond the hypotheses themselves, only one batch of tokens and log-probs


def test_memory_stays_bounded_as_the_file_grows(lstm_bundle: Path, tmp_path: Path) -> None:
    def peak_for(n_utts: int) -> int:
        f = tmp_path / f"n{n_utts}.txt"
        f.write_text("".join(f"u{i}-{n} the stock market {w}\n" for i in range(n_utts)
                             for n, w in enumerate(["fell", "rose", "of", "to"], 1)), encoding="utf-8")
        tracemalloc.start()
        try:
            code, out, err = cli("rescore", str(f), "--model", str(lstm_bundle), "--costs", str(tmp_path / "c"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert code == 0, err
        assert len(out.splitlines()) == n_utts
        return peak

    small, large = peak_for(1500), peak_for(6000)
    assert large < 1.5 * small, (small, large)


# ------------------------------------------------------------------------------ torch-free, help


def test_rescore_and_the_ngram_formats_never_import_torch(lstm_bundle: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    nbest = write_kaldi(tmp_path)[0]
    text = tmp_path / "s.txt"
    text.write_text("the stock market fell\n", encoding="utf-8")
    code = (
        "import sys\n"
        "from rnnlm.cli import app\n"
        "for args in (['rescore', sys.argv[2]], ['score', sys.argv[3], '--format', 'kenlm']):\n"
        "    try:\n"
        "        app(args + ['--model', sys.argv[1], '--threads', '1'])\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "import rnnlm.serve.kenlm_compat as kenlm\n"
        "assert kenlm.Model(sys.argv[1], threads=1).score('the stock') < 0\n"
        "print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-FREE')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(lstm_bundle), nbest, str(text)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "TORCH-FREE", proc.stdout


def test_rescore_help_has_examples() -> None:
    code, out, _ = cli("rescore", "--help")
    assert code == 0 and "Examples" in out and "--carry-over" in out


def test_standard_input(lstm_bundle: Path, tmp_path: Path) -> None:
    text = "".join(f"{u}-{n} {t}\n" for u, n, t in KEYS)
    r = CliRunner().invoke(app, ["rescore", "-", "--model", str(lstm_bundle), "--json"], input=text)
    assert r.exit_code == 0, r.stderr
    from_file = rescore_json(lstm_bundle, *write_kaldi(tmp_path))
    assert [json.loads(line) for line in r.stdout.splitlines()] == from_file
