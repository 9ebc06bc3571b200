"""The advance graph (``advance.onnx``): reading a prompt without the vocabulary projection.

Its state after N tokens is checked against two independent paths through the same bundle (the
scoring graph's chunk driver, and the step graph one token at a time), at lengths around its
chunk and in batches of different lengths; generation must not change with it; a bundle without
it (exported before it existed) must keep working; a damaged one must be refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundles import ADVANCE_CHUNK, Built, read_manifest, rehash, write_manifest
from onnx import numpy_helper
from rnnlm.serve import LanguageModel
from rnnlm.serve.bundle import BundleError

C = ADVANCE_CHUNK
LENGTHS = (1, C - 1, C, C + 1, 3 * C + 5)
TOL = 1e-5


@pytest.fixture(scope="module")
def lm(lstm: Built) -> LanguageModel:
    return LanguageModel.load(lstm.bundle, device="cpu")


def old_bundle(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as exported before the advance graph: no file, no manifest entries."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    del m["graphs"]["advance"], m["files"]["advance.onnx"]
    write_manifest(dst, m)
    (dst / "advance.onnx").unlink()
    return dst


def stepped(lm: LanguageModel, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The state after ``ids`` (L,) read one at a time through the step graph."""
    state = lm.initial_state(1)
    for t in ids:
        _, state = lm.step_ids(state, np.array([t], np.int64))
    return state.arrays


def assert_states_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=TOL, rtol=0, err_msg=k)


def test_manifest_lists_the_advance_graph(lstm: Built) -> None:
    m = read_manifest(lstm.bundle)
    graph = m["graphs"]["advance"]
    assert graph["chunk"] == C and graph["file"] == "advance.onnx" and "advance.onnx" in m["files"]
    assert [t["name"] for t in graph["outputs"]] == [s["output"] for s in m["state"]]  # the state, nothing else
    assert [t["name"] for t in graph["inputs"]] == ["token_ids", "lengths", *(s["input"] for s in m["state"])]
    assert m["validation"]["advance"]["max_abs_state_diff"] <= m["validation"]["tolerance"]
    ops = {n.op_type for n in onnx.load(str(lstm.bundle / "advance.onnx")).graph.node}
    assert "LogSoftmax" not in ops and "LogSoftmax" in {n.op_type for n in onnx.load(str(lstm.bundle / "score.onnx")).graph.node}


@pytest.mark.parametrize("n", LENGTHS)
def test_state_equals_scoring_graph_and_step_graph(lm: LanguageModel, n: int) -> None:
    ids = np.random.default_rng(n).integers(0, len(lm.vocab), n).astype(np.int64)
    advanced = lm._advance_ids(ids[:, None], np.array([n])).arrays
    assert_states_close(advanced, lm._score_ids(ids[:, None], ids[:, None], np.array([n]))[1].arrays)
    assert_states_close(advanced, stepped(lm, ids))


def test_batch_of_different_lengths(lm: LanguageModel) -> None:
    lengths = np.array([3 * C + 5, 1, C + 1, C, C - 1])
    ids = np.random.default_rng(7).integers(0, len(lm.vocab), (int(lengths.max()), len(lengths))).astype(np.int64)
    state = lm._advance_ids(ids, lengths).arrays
    for b, n in enumerate(lengths):
        alone = stepped(lm, ids[:n, b])
        assert_states_close({k: v[b : b + 1] for k, v in state.items()}, alone)


def test_advance_continues_a_context_like_feed(lm: LanguageModel) -> None:
    """From a context that has read text (its ``last`` token not yet read), as a session holds it."""
    _, ctx = lm.score_context(lm.context(), "the stock market fell\nshares ")
    ids = [t.id for t in lm.prompt_tokens("rose in new year trading said analysts of the bank\n" * 8)]
    assert len(ids) >= C
    after = lm.advance(ctx, ids)
    _, want = lm.feed(ctx, ids)
    assert (after.last, after.tokens) == (want.last, want.tokens)
    assert_states_close(after.state.arrays, want.state.arrays)


def test_session_is_created_on_the_first_long_prompt(lstm: Built) -> None:
    lm = LanguageModel.load(lstm.bundle, device="cpu")
    assert "advance" not in lm._sessions  # not at load: cold start does not pay for it
    lm.advance(lm.context(), [lm.eos_id] * (C - 1))
    assert "advance" not in lm._sessions  # a short prompt goes through the scoring graph
    lm.advance(lm.context(), [lm.eos_id] * C)
    assert "advance" in lm._sessions


def advance_session_threads(bundle: Path) -> int:
    lm = LanguageModel.load(bundle, device="cpu", threads=2)
    lm.advance(lm.context(), [lm.eos_id] * C)
    return lm._sessions["advance"].get_session_options().intra_op_num_threads


@pytest.mark.parametrize(("per_step_form", "threads"), [(None, 2), ("fp32", 2), ("int8", 1), ("nbits4-b32-a4", 1)])
def test_advance_threads_follow_the_recurrent_products_form(lstm: Built, tmp_path: Path, per_step_form: str | None,
                                                            threads: int) -> None:
    """Float32 recurrent weights are read on every thread (they overflow one core's cache);
    quantized ones on one (bench/RESULTS.md, "Threads of the advance graph"). The decoder's form does
    not count: it is not in the advance graph."""
    bundle = shutil.copytree(lstm.bundle, tmp_path / "b")
    if per_step_form is not None:
        m = read_manifest(bundle)
        m["quantization"] = {"products": [
            {"graph": "score", "shape": [16, 40], "rows_per_call": 32, "chosen": "int8"},  # the decoder
            {"graph": "step", "shape": [16, 64], "rows_per_call": 1, "chosen": "int8"},
            {"graph": "score", "shape": [16, 64], "rows_per_call": 1, "chosen": per_step_form}]}
        write_manifest(bundle, m)
    assert advance_session_threads(bundle) == threads


def test_generation_is_the_same_with_and_without_it(lm: LanguageModel, lstm: Built, tmp_path: Path) -> None:
    old = LanguageModel.load(old_bundle(lstm.bundle, tmp_path / "old"), device="cpu")
    assert old.advance_chunk == 0
    prompt = "the company said profit rose in the quarter\n" * 10 + "analysts"
    assert len(lm.prompt_tokens(prompt)) > 3 * C
    for seed in (1, 2):
        kw = dict(max_new_tokens=20, temperature=1.0, seed=seed, num_samples=2, stop_at_eos=False)
        new = [c.tolist() for c in lm.generate_ids(prompt, **kw)]
        assert new == [c.tolist() for c in old.generate_ids(prompt, **kw)]
    assert "advance" not in old._sessions and "advance" in lm._sessions


def test_tampered_advance_graph_is_refused_by_hash(lstm: Built, tmp_path: Path) -> None:
    bad = shutil.copytree(lstm.bundle, tmp_path / "bad")
    data = bytearray((bad / "advance.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "advance.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"advance\.onnx: sha256"):
        LanguageModel.load(bad, device="cpu")


def test_foreign_advance_graph_with_matching_hash_is_refused_on_first_use(lstm: Built, tmp_path: Path) -> None:
    """Other weights, listed with their own sha256 (as a careless hand edit would): the check
    against the scoring graph's state refuses it when its session is created."""
    bad = shutil.copytree(lstm.bundle, tmp_path / "foreign")
    graph = onnx.load(str(bad / "advance.onnx"))
    for init in graph.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(graph, str(bad / "advance.onnx"))
    rehash(bad, "advance.onnx")
    lm = LanguageModel.load(bad, device="cpu")  # loads: the advance graph is not used yet
    with pytest.raises(BundleError, match="differs from the scoring graph"):
        lm.advance(lm.context(), [lm.eos_id] * C)
    assert lm.generate("the stock market", max_new_tokens=3, seed=0)  # short prompts are unaffected


def test_completion_without_echo_reads_its_prompt_through_it(lstm: Built, tmp_path: Path) -> None:
    """/v1/completions' engine: the same choices (text, generated tokens' log-probabilities to 1e-5)
    with and without the advance graph, and only the bundle that has it creates its session."""
    from rnnlm.serve.completions import Delta, Sampling, run, text_prompt

    new = LanguageModel.load(lstm.bundle, device="cpu")
    old = LanguageModel.load(old_bundle(lstm.bundle, tmp_path / "old"), device="cpu")
    args = Sampling(max_tokens=12, temperature=0.9, top_p=None, top_k=None, n=2, seed=3, stop=(), echo=False,
                    logprobs=0)

    def choices(lm: LanguageModel) -> list[Delta]:
        prompt = text_prompt(lm, "the bank said rates rose in the week and bonds fell\n" * 6 + "traders")
        assert len(prompt.ids) > 3 * C
        return [d for d in run(lm, [prompt], args) if isinstance(d, Delta)]

    a, b = choices(new), choices(old)
    assert [(d.index, d.text, d.finish_reason) for d in a] == [(d.index, d.text, d.finish_reason) for d in b]
    assert any(d.text for d in a)
    for x, y in zip(a, b, strict=True):
        assert (x.logprobs is None) == (y.logprobs is None)
        if x.logprobs is not None and y.logprobs is not None:
            assert x.logprobs["tokens"] == y.logprobs["tokens"]
            np.testing.assert_allclose(x.logprobs["token_logprobs"], y.logprobs["token_logprobs"], atol=TOL)
    assert "advance" in new._sessions and "advance" not in old._sessions
