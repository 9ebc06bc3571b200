"""The KenLM-style adapter: KenLM's own checks (per-word scores sum to the sentence score, stepwise
equals whole-sentence scoring), its units against the runtime's nats, and a decoder written
against `kenlm.Model` running unchanged on it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import rnnlm.serve.kenlm_compat as kenlm
from rnnlm.serve import LanguageModel

LN10 = math.log(10)
SENTENCES = ["the stock market fell", "shares of zorg rose", "the company said it was a new year", "prices"]


@pytest.fixture(scope="module")
def model(lstm_bundle: Path) -> kenlm.Model:
    return kenlm.Model(lstm_bundle, threads=1)


@pytest.fixture(scope="module")
def lm(lstm_bundle: Path) -> LanguageModel:
    return LanguageModel.load(lstm_bundle, threads=1)


def test_score_is_log10_of_the_runtime_nats(model: kenlm.Model, lm: LanguageModel) -> None:
    for s, r in zip(SENTENCES, lm.score_lines(SENTENCES), strict=True):
        assert model.score(s) == -r.nll / LN10  # exact: the same float64, divided by ln 10
        assert model.score(s, bos=True, eos=True) == model.score(s)
    assert model.scores(SENTENCES) == [model.score(s) for s in SENTENCES]


def test_full_scores_sum_to_score(model: kenlm.Model) -> None:
    for s in SENTENCES:
        full = list(model.full_scores(s))
        assert len(full) == len(s.split()) + 1  # every word, then </s>
        assert sum(p for p, _, _ in full) == pytest.approx(model.score(s), abs=1e-9)
        assert [n for _, n, _ in full] == list(range(2, len(full) + 2))
        assert [oov for _, _, oov in full] == [w not in model for w in s.split()] + [False]
    assert "zorg" not in model and "market" in model


def test_eos_false_drops_the_end_and_bos_false_is_the_sentence_start(model: kenlm.Model) -> None:
    s = SENTENCES[0]
    full = list(model.full_scores(s))
    assert model.score(s, eos=False) == pytest.approx(sum(p for p, _, _ in full[:-1]), abs=1e-6)
    assert len(list(model.full_scores(s, eos=False))) == len(s.split())
    assert model.score(s, bos=False) == model.score(s)  # no null context in a recurrent LM (documented)


def test_perplexity_is_kenlms_definition(model: kenlm.Model) -> None:
    for s in SENTENCES:
        assert model.perplexity(s) == pytest.approx(10 ** (-model.score(s) / (len(s.split()) + 1)), rel=1e-12)


def test_stepwise_state_api_equals_sentence_scoring(model: kenlm.Model) -> None:
    for s in SENTENCES:
        state, out = kenlm.State(), kenlm.State()
        model.BeginSentenceWrite(state)
        total = 0.0
        for w in [*s.split(), "</s>"]:
            total += model.BaseScore(state, w, out)
            state, out = out, state  # KenLM's idiom: swap, reuse
        assert total == pytest.approx(model.score(s), abs=1e-4)


def test_states_compare_by_history_and_cache_the_next_distribution(model: kenlm.Model, monkeypatch: Any) -> None:
    a, b, c, d = (kenlm.State() for _ in range(4))
    model.BeginSentenceWrite(a)
    model.NullContextWrite(b)
    assert a == b and hash(a) == hash(b)
    calls = []
    real = model.lm.step_ids
    monkeypatch.setattr(model.lm, "step_ids", lambda *args: calls.append(1) or real(*args))
    scores = {w: model.BaseScore(a, w, c) for w in ["the", "shares", "prices", "</s>"]}
    assert len(calls) == 1  # one step of the model for every word expanded from one state
    model.BaseScore(a, "the", c)
    model.BaseScore(b, "the", d)
    assert c == d and c != a and scores["the"] == model.BaseFullScore(a, "the", d).log_prob
    with pytest.raises(ValueError):
        model.BaseScore(kenlm.State(), "the", c)  # never written


def test_wrong_calls_fail_as_kenlms_do(model: kenlm.Model) -> None:
    with pytest.raises(TypeError):
        model.score(["the", "stock"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        model.BaseScore(kenlm.State(), "two words", kenlm.State())


def rerank_with_kenlm(lm_module: Any, model: Any, candidates: list[str], weight: float) -> str:
    """A tiny decoder written against KenLM's API only: extend each candidate word by word from
    a shared begin-of-sentence state, add the LM score, keep the best."""
    best, best_score = "", -math.inf
    for text in candidates:
        state, out = lm_module.State(), lm_module.State()
        model.BeginSentenceWrite(state)
        score = 0.0
        for w in [*text.split(), "</s>"]:
            score += weight * model.BaseScore(state, w, out)
            state, out = out, state
        score -= 0.1 * len(text.split())
        if score > best_score:
            best, best_score = text, score
    return best


def test_a_decoder_written_for_kenlm_switches_with_one_import(model: kenlm.Model) -> None:
    candidates = ["the stock market fell", "stock the fell market", "market"]
    picked = rerank_with_kenlm(kenlm, model, candidates, 1.0)
    by_score = max(candidates, key=lambda t: model.score(t) - 0.1 * len(t.split()))
    assert picked == by_score
