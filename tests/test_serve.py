"""Tests for rnnlm.serve: the torch-free runtime, its CLI, and its text normalization.

References are computed here, independently of the scoring code: log-probabilities by stepping
the step graph one token at a time and summing in numpy, greedy paths by ``np.argmax``, byte
offsets by locating the bad byte in the test's own data. Bundles are built once per session
(``conftest.py``); a test that damages one works on a copy.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundles import CHUNK, STREAM_TEXT, TOKENS, WORDS, read_manifest, rehash, write_manifest
from rnnlm.serve import BundleError, LanguageModel
from rnnlm.serve.runtime import CALL_CHUNKS
from typer.testing import CliRunner

import rnnlm.text as text_mod
from rnnlm.cli import app
from rnnlm.errors import RnnlmError

EOS = "<eos>"

LINES = [
    "the stock market fell",
    "Shares of the company rose 3.5 percent in the quarter",  # capitals and a number
    "investors said the new year was a new year for bonds and prices and rates and sales at the bank",
    "traders",
    "the zebra market rose 1,000 points",  # "zebra" and "points" are out of the vocabulary
    " ".join(WORDS[:3 * CHUNK + 4]),  # longer than three chunks
]


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


def step_reference(lm: LanguageModel, ids: list[int]) -> np.ndarray:
    """Log-probability of each id, predicted from <eos> then the ids before it, by stepping one
    token at a time through the step graph; float64."""
    state, prev, out = lm.initial_state(1), lm.eos_id, []
    for i in ids:
        lp, state = lm.step_ids(state, np.array([prev]))
        out.append(float(lp[0, i]))
        prev = i
    return np.array(out, np.float64)


def greedy_reference(lm: LanguageModel, prompt: list[str], n: int) -> list[int]:
    state = lm.initial_state(1)
    lp, state = lm.step_ids(state, np.array([lm.eos_id]))
    for w in prompt:
        lp, state = lm.step_ids(state, np.array([TOKENS.index(w)]))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(lp[0])))
        lp, state = lm.step_ids(state, np.array([out[-1]]))
    return out


# --------------------------------------------------------------------------- 6. no torch at runtime


def test_runtime_never_imports_torch(lstm_bundle: Path) -> None:
    code = (
        "import sys\n"
        "from rnnlm.serve import LanguageModel\n"
        "lm = LanguageModel.load(sys.argv[1], threads=1)\n"
        "r = lm.score('the stock market fell')\n"
        "g = lm.generate('the stock', max_new_tokens=5, seed=1, stop_at_eos=False)\n"
        "assert r.tokens == 5 and len(g[0].split()) >= 1\n"
        "print('TORCH-LOADED' if 'torch' in sys.modules else 'TORCH-FREE', r.tokens)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(lstm_bundle)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["TORCH-FREE", "5"], proc.stdout


# ------------------------------------------------------------------------------------- 7. scoring


def test_token_logprobs_sum_to_score_and_match_stepping(lm: LanguageModel) -> None:
    text = "\n".join(LINES) + "\n"
    per_token = lm.token_logprobs(text)
    result = lm.score(text)
    assert sum(lp for _, lp, _ in per_token) == pytest.approx(-result.nll, abs=1e-9)

    # An independent count and sum: the tokens as PTB writes them, stepped one at a time.
    words = [w.lower() for line in LINES for w in [*line.split(), EOS]]
    words = ["N" if w in ("3.5", "1,000") else w for w in words]
    assert [t for t, _, _ in per_token] == words
    oov = [w not in TOKENS for w in words]
    assert [o for _, _, o in per_token] == oov and sum(oov) == 2
    ids = [TOKENS.index(w) if w in TOKENS else TOKENS.index("<unk>") for w in words]
    ref = step_reference(lm, ids)
    np.testing.assert_allclose([lp for _, lp, _ in per_token], ref, atol=1e-5)
    n, n_oov = len(words), sum(oov)
    assert (result.tokens, result.oov) == (n, n_oov)
    assert result.nll == pytest.approx(-ref.sum(), abs=1e-4)
    assert result.nll_in_vocab == pytest.approx(-ref[~np.array(oov)].sum(), abs=1e-4)
    assert result.ppl == pytest.approx(math.exp(-ref.sum() / n), rel=1e-5)
    assert result.ppl_in_vocab == pytest.approx(math.exp(-ref[~np.array(oov)].sum() / (n - n_oov)), rel=1e-5)
    assert result.as_dict()["ppl"] == result.ppl and "bpc" not in result.as_dict()


@pytest.mark.parametrize("n_words", [CHUNK - 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1])
def test_scoring_graph_equals_stepping_around_the_chunk(lm: LanguageModel, n_words: int) -> None:
    words = [WORDS[(7 * i) % len(WORDS)] for i in range(n_words)]  # n_words + 1 tokens with <eos>
    per_token = lm.token_logprobs(" ".join(words))
    ref = step_reference(lm, [TOKENS.index(w) for w in [*words, EOS]])
    np.testing.assert_allclose([lp for _, lp, _ in per_token], ref, atol=1e-5)


def test_state_carries_across_lines_and_blocks(lm: LanguageModel) -> None:
    text = "\n".join(LINES)
    tokens = lm.tokenizer.text_tokens(text)
    whole = lm.score_tokens(tokens)
    for block in (1, 5, CHUNK, CHUNK + 3):  # blocks that end inside and at the edge of chunks
        r = lm.score_tokens(tokens, block=block)
        assert (r.tokens, r.oov) == (whole.tokens, whole.oov)
        assert r.nll == pytest.approx(whole.nll, abs=1e-4), block
    # A text is one stream: its NLL is not the sum of its lines scored alone (the state carries).
    alone = sum(lm.score(line).nll for line in LINES)
    assert abs(alone - whole.nll) > 1e-3


def test_a_batch_of_mixed_lengths_equals_each_column_alone(lm: LanguageModel) -> None:
    """Columns that end early leave later chunk calls: their log-probabilities and final states
    must be what each column gives scored alone, however long the others are."""
    rng = np.random.default_rng(3)
    lengths = np.array([3, 3 * CHUNK + 2, CHUNK, 0, CHUNK + 1, 2 * CHUNK], np.int64)
    L = int(lengths.max())
    inputs = rng.integers(0, len(TOKENS), (L, len(lengths)))
    targets = rng.integers(0, len(TOKENS), (L, len(lengths)))
    picked, state = lm._score_ids(inputs, targets, lengths)
    for b, n in enumerate(lengths):
        alone, alone_state = lm._score_ids(inputs[:n, b : b + 1], targets[:n, b : b + 1], lengths[b : b + 1])
        np.testing.assert_allclose(picked[:n, b], alone[:n, 0], atol=1e-5)
        for key, value in state.arrays.items():
            np.testing.assert_allclose(value[b], alone_state.arrays[key][0], atol=1e-5)
        if n == 0:  # a column with nothing to score keeps the state it came with
            assert all(np.all(v[b] == 0) for v in state.arrays.values())


def recorded_steps(lm: LanguageModel) -> list[int]:
    """Patch ``lm``'s scoring session to record the steps (rows of token_ids) of every call."""
    sess, steps = lm.session("score"), []
    run = sess.run

    def recording(names, feed, *rest):  # type: ignore[no-untyped-def]
        steps.append(feed["token_ids"].shape[0])
        return run(names, feed, *rest)

    sess.run = recording  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic-steps", "fixed-steps"])
def test_calls_run_only_the_steps_that_hold_tokens(lstm_bundle: Path, tmp_path: Path, fixed: bool) -> None:
    """The scoring graph's step axis is dynamic: a call gets as many steps as its longest column
    needs, not the whole chunk, and a narrow batch up to CALL_CHUNKS chunks' positions a call. A manifest that states the axis as the integer chunk (a bundle exported before) gets
    padded calls of exactly that length, with the same results."""
    bundle = shutil.copytree(lstm_bundle, tmp_path / "b")
    if fixed:
        m = read_manifest(bundle)
        for t in m["graphs"]["score"]["inputs"][:2] + m["graphs"]["score"]["outputs"][:1]:
            t["shape"][0] = CHUNK
        write_manifest(bundle, m)
    lm = LanguageModel.load(bundle, threads=1)
    steps = recorded_steps(lm)
    long = CALL_CHUNKS * CHUNK + 3  # one column: CALL_CHUNKS chunks a call, then 3 steps
    seqs = [[5, 6, 7], [8, 9], [4 + i % 30 for i in range(long)]]
    got = lm.sequence_logprobs(seqs, batch_size=2)
    if fixed:  # [5 6 7]+[8 9] padded to a chunk; then the long one a chunk at a time
        assert steps == [CHUNK] * (1 + CALL_CHUNKS + 1)
    else:  # [5 6 7]+[8 9]: 3 steps; then the long one alone
        assert steps == [3, CALL_CHUNKS * CHUNK, 3]
    assert lm.score_steps(1) == (CHUNK if fixed else CALL_CHUNKS * CHUNK) and lm.score_steps(64) == CHUNK
    for ids, lp in zip(seqs, got, strict=True):
        np.testing.assert_allclose(lp, step_reference(lm, ids), atol=1e-5)


def test_a_graph_whose_dynamic_axis_is_fixed_is_refused(lstm_bundle: Path, tmp_path: Path) -> None:
    """The runtime feeds a dynamic axis any size: a graph that fixes it, under a manifest that says
    it is dynamic, is refused at load, not at the first short call."""
    import onnx

    bundle = shutil.copytree(lstm_bundle, tmp_path / "b")
    model = onnx.load(str(bundle / "score.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = CHUNK
    onnx.save(model, str(bundle / "score.onnx"))
    rehash(bundle, "score.onnx")
    with pytest.raises(BundleError, match=f"token_ids has axis 0 fixed at {CHUNK}, the manifest says it is dynamic"):
        LanguageModel.load(bundle, threads=1)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_lines_equals_each_line_alone(lm: LanguageModel, batch_size: int) -> None:
    lines = [*LINES[:3], "", *LINES[3:], "   ", LINES[1]]
    results = lm.score_lines(lines, batch_size=batch_size, per_token=True)
    assert len(results) == len(lines)
    for line, r in zip(lines, results, strict=True):
        alone = lm.score(line + "\n", per_token=True)  # a blank line is an empty sentence: <eos> alone
        if not line.strip():
            assert r.tokens == 1 and r.per_token is not None and r.per_token[0][0] == EOS
        assert (r.tokens, r.oov) == (alone.tokens, alone.oov)
        assert r.nll == pytest.approx(alone.nll, abs=1e-4), line
        assert r.nll_in_vocab == pytest.approx(alone.nll_in_vocab, abs=1e-4), line
        assert r.per_token is not None and alone.per_token is not None
        np.testing.assert_allclose([v for _, v, _ in r.per_token], [v for _, v, _ in alone.per_token], atol=1e-5)


# ----------------------------------------------------------------------------------- 8. generation


def test_generation_is_repeatable_and_seeded(lm: LanguageModel) -> None:
    kw = dict(max_new_tokens=15, temperature=1.0, stop_at_eos=False)
    assert lm.generate("the stock market", seed=7, **kw) == lm.generate("the stock market", seed=7, **kw)
    samples = {lm.generate("the stock market", seed=s, **kw)[0] for s in range(5)}
    assert len(samples) > 1
    three = lm.generate("the stock", seed=3, num_samples=3, max_new_tokens=10)
    assert len(three) == 3 and all(isinstance(s, str) for s in three)
    for s in three:
        assert set(s.split()) <= set(TOKENS) - {EOS}  # stopped at <eos>: it is not in the text


def test_greedy_paths_are_the_argmax(lm: LanguageModel) -> None:
    prompt, n = ["the", "stock", "market"], 25
    ref = greedy_reference(lm, prompt, n)
    # A temperature so small that dividing by it overflows is the greedy limit too, not NaN sampling.
    for kw in ({"temperature": 0.0}, {"top_k": 1, "seed": 11}, {"top_p": 1e-9, "seed": 12}, {"temperature": 5e-324, "seed": 13}):
        ids = [int(c[0]) for c in lm.generate_ids(" ".join(prompt), max_new_tokens=n, stop_at_eos=False, **kw)]
        assert ids == ref, kw
    text = lm.generate("The Stock market", temperature=0, max_new_tokens=n)[0]  # stops at <eos>
    upto = ref[: ref.index(lm.eos_id)] if lm.eos_id in ref else ref
    assert text == " ".join(TOKENS[i] for i in upto)
    # Greedy with several samples: all equal, and each equals the single greedy path.
    cols = list(lm.generate_ids("the stock market", max_new_tokens=n, temperature=0, num_samples=3, stop_at_eos=False))
    assert all(list(c) == [r] * 3 for c, r in zip(cols, ref, strict=True))


@pytest.mark.parametrize("bad", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")}, {"top_k": 0},
    {"top_k": len(TOKENS) + 1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("nan")}, {"max_new_tokens": 0},
    {"max_new_tokens": 10_001}, {"num_samples": 0},
])
def test_generate_refuses_bad_settings(lm: LanguageModel, bad: dict) -> None:
    with pytest.raises(RnnlmError):
        lm.generate("the stock", **bad)


# ------------------------------------------------------------------------------------------ 10. CLI


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


def assert_one_error_line(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_cli_score_json_matches_the_api(lm: LanguageModel, lstm_bundle: Path, tmp_path: Path) -> None:
    f = tmp_path / "text.txt"
    f.write_text("\n".join(LINES[:2]) + "\n\n" + "\n".join(LINES[2:]) + "\n", encoding="utf-8")
    code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--json")
    assert code == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert {"tokens", "oov", "nll", "ppl"} <= set(last)
    api = lm.score(f.read_text(encoding="utf-8"))
    # Every line ends in <eos>, the blank one too (an empty sentence).
    assert (last["tokens"], last["oov"]) == (api.tokens, api.oov) == (sum(len(x.split()) + 1 for x in LINES) + 1, 2)
    assert last["nll"] == pytest.approx(api.nll, abs=1e-4) and last["ppl"] == pytest.approx(api.ppl, rel=1e-5)
    assert "2 of" in err and "out of the model's vocabulary" in err

    code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--per-line", "--json", "--batch-size", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    file_lines = f.read_text(encoding="utf-8").splitlines()
    expected = lm.score_lines(file_lines)
    per_line = [r for r in rows if "line" in r]
    assert [r["line"] for r in per_line] == [i + 1 for i in range(len(file_lines))]  # the blank line too
    for r in per_line:
        e = expected[r["line"] - 1]
        assert (r["tokens"], r["oov"]) == (e.tokens, e.oov)
        assert r["nll"] == pytest.approx(e.nll, abs=1e-4) and r["ppl"] == pytest.approx(e.ppl, rel=1e-5)
    assert rows[-1]["total"] is True and rows[-1]["tokens"] == sum(r["tokens"] for r in per_line)


def _bad_utf8(tmp_path: Path) -> tuple[Path, int]:
    prefix = "the stock café market\nfell €5 ".encode()
    f = tmp_path / "bad.txt"
    f.write_bytes(prefix + b"\xff rose\n")
    return f, len(prefix)


def _file(name: str, data: bytes):  # type: ignore[no-untyped-def]
    def make(p: Path) -> Path:
        (p / name).write_bytes(data)
        return p / name

    return make


BAD_FILES = {
    "missing": (lambda p: p / "nope.txt", ["nope.txt", "no such file"]),
    "directory": (lambda p: p, ["is a directory"]),
    "empty": (_file("e.txt", b""), ["empty"]),
    "whitespace": (_file("w.txt", b" \n\t\n  \r\n"), ["empty or only whitespace"]),
    "binary": (_file("b.bin", b"the stock\n\x00\x01\x02"), ["binary data", "a NUL byte at offset 10"]),
}


@pytest.mark.parametrize("per_line", [False, True], ids=["stream", "per-line"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_cli_score_refuses_bad_files(lstm_bundle: Path, tmp_path: Path, case: str, per_line: bool) -> None:
    make, words = BAD_FILES[case]
    path = make(tmp_path)
    code, out, err = cli("score", str(path), "--model", str(lstm_bundle), *(["--per-line"] if per_line else []))
    assert_one_error_line(code, err, *words)


@pytest.mark.parametrize("block", [None, 1, 7, 8], ids=["1MiB", "1", "7", "8"])
def test_cli_score_names_the_offset_of_invalid_utf8(lstm_bundle: Path, tmp_path: Path, block: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if block is not None:
        monkeypatch.setattr(text_mod, "BLOCK", block)
    f, offset = _bad_utf8(tmp_path)
    assert f.read_bytes()[offset] == 0xFF and f.read_bytes()[:offset].decode() == "the stock café market\nfell €5 "
    code, _, err = cli("score", str(f), "--model", str(lstm_bundle))
    assert_one_error_line(code, err, f"invalid UTF-8 at byte offset {offset}")
    # A character cut off by the end of the file: the offset of its first byte.
    f.write_bytes("the stock €".encode()[:-1])
    code, _, err = cli("score", str(f), "--model", str(lstm_bundle), "--per-line")
    assert_one_error_line(code, err, f"invalid UTF-8 at byte offset {len('the stock ')}")


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--temperature", "-1", ["temperature"]), ("--temperature", "nan", ["temperature"]),
    ("--top-k", "0", ["top-k"]), ("--top-k", str(len(TOKENS) + 1), ["top-k", str(len(TOKENS))]),
    ("--top-p", "0", ["top-p"]), ("--top-p", "1.5", ["top-p"]),
    ("--max-tokens", "0", ["max-tokens"]), ("--max-tokens", "10001", ["max-tokens", "10,000"]),
])
def test_cli_generate_refuses_bad_settings(lstm_bundle: Path, option: str, value: str, words: list[str]) -> None:
    code, out, err = cli("generate", "--model", str(lstm_bundle), "--prompt", "the stock", option, value)
    assert_one_error_line(code, err, *words)
    assert out == ""  # nothing printed before the settings are checked, not even the prompt


def test_cli_generate_is_repeatable_and_accepts_unknown_prompts(lstm_bundle: Path) -> None:
    args = ("generate", "--model", str(lstm_bundle), "--prompt", "the stock market", "--seed", "7", "--max-tokens", "12",
            "--no-stop")
    first, second = cli(*args), cli(*args)
    assert first[0] == 0 and first == second
    assert first[1].startswith("the stock market ") and len(first[1].split()) > 3

    code, out, err = cli("generate", "--model", str(lstm_bundle), "--prompt", "zyzzyva quixotic", "--seed", "1",
                         "--max-tokens", "5")
    assert code == 0, err
    assert out.startswith("zyzzyva quixotic")
    assert "2 of 2 prompt tokens are out of the vocabulary" in err

    code, out, err = cli("generate", "--model", str(lstm_bundle), "--prompt", "the", "--num-samples", "3", "--json",
                         "--seed", "2", "--max-tokens", "4")
    assert code == 0, err
    assert len(json.loads(out)["samples"]) == 3


# ------------------------------------------------------------------------- 11. the CLI and the API, devices


def test_file_scores_the_same_through_the_cli_and_the_api(lm: LanguageModel, lstm_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_mod, "BLOCK", 7)
    f = tmp_path / "t.txt"
    f.write_bytes(STREAM_TEXT.encode("utf-8"))
    code, out, err = cli("score", str(f), "--model", str(lstm_bundle), "--json")
    assert code == 0, err
    total = json.loads(out.strip().splitlines()[-1])
    api = lm.score(STREAM_TEXT)
    assert (total["tokens"], total["oov"]) == (api.tokens, api.oov)
    assert total["nll"] == pytest.approx(api.nll, abs=1e-4)


def test_iobinding_generation_equals_the_plain_path(lstm_bundle: Path) -> None:
    """The CUDA path (state kept in OrtValues between steps) runs on CPU too: it must give the same text."""
    lm = LanguageModel.load(lstm_bundle, device="cpu", threads=1)
    plain = lm.generate("the stock", max_new_tokens=25, temperature=1.0, seed=3, num_samples=2, stop_at_eos=False)
    lm.bind_state = True
    bound = lm.generate("the stock", max_new_tokens=25, temperature=1.0, seed=3, num_samples=2, stop_at_eos=False)
    assert bound == plain and len(plain) == 2


@pytest.mark.skipif(__import__("rnnlm.serve.devices", fromlist=["x"]).cuda_unavailable() is None,
                    reason="this machine can run CUDA: the refusal is for machines that cannot")
@pytest.mark.parametrize("command", ["score", "generate"])
def test_cli_device_cuda_without_a_gpu_is_one_line_and_exit_2(lstm_bundle: Path, tmp_path: Path, command: str) -> None:
    f = tmp_path / "t.txt"
    f.write_text("the stock market fell\n", encoding="utf-8")
    args = [str(f)] if command == "score" else ["--prompt", "the", "--max-tokens", "2"]
    code, out, err = cli(command, *args, "--model", str(lstm_bundle), "--device", "cuda")
    assert_one_error_line(code, err, "--device cuda")
    assert out == ""
    code, out, err = cli(command, *args, "--model", str(lstm_bundle), "--device", "auto")
    assert code == 0 and err == ""  # auto runs on the CPU without a word where there is no GPU at all
