"""Tests for rnnlm.config: parameter counts of the presets, and the errors a bad config raises."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from cellkit import H, V, model_cfg

from rnnlm.config import PRESETS, ModelConfig, TrainConfig, apply_overrides, resolve
from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------ 10. parameter counts


def _count(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        return LanguageModel(cfg).num_parameters()


def test_parameter_counts_match_papers() -> None:
    rhn = _count(PRESETS["rhn-paper"].model)
    assert 23.0e6 <= rhn <= 24.0e6, rhn
    hyper = _count(PRESETS["hypernets-char-paper"].model)
    assert abs(hyper - 4.91e6) <= 0.05 * 4.91e6, hyper
    cfg_ln = PRESETS["hypernets-char-paper-ln"].model
    hyper_ln = _count(cfg_ln)
    assert abs(hyper_ln - 4.92e6) <= 0.05 * 4.92e6, hyper_ln
    # Gain + bias for each of the 4 gates and for the cell, in the main LSTM and in the hyper LSTM.
    ln_params = cfg_ln.num_layers * 2 * (4 + 1) * (cfg_ln.hidden_size + cfg_ln.hyper_size)
    assert dataclasses.replace(cfg_ln, layer_norm=False) == PRESETS["hypernets-char-paper"].model
    assert hyper_ln - hyper == ln_params


def test_tied_weights_counted_once() -> None:
    tied = LanguageModel(model_cfg("lstm", emb_size=H, tie_weights=True))
    untied = LanguageModel(model_cfg("lstm", emb_size=H, tie_weights=False))
    assert tied.decoder.weight is tied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == V * H


# ---------------------------------------------------------------------------------- 11. config errors


def test_unknown_cell_is_refused() -> None:
    with pytest.raises(RnnlmError, match="unknown cell 'gru'"):
        ModelConfig(cell="gru")
    with pytest.raises(RnnlmError, match="unknown cell 'gru'"):
        resolve("gru", None)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(RnnlmError, match="unknown preset 'rhn-huge'"):
        resolve(None, "rhn-huge")
    with pytest.raises(RnnlmError, match="rhn-small.*lstm"):
        resolve("lstm", "rhn-small")


def test_set_unknown_key_is_refused() -> None:
    p = PRESETS["lstm-small"]
    with pytest.raises(RnnlmError, match="unknown key 'hiden_size'"):
        apply_overrides(p.model, p.train, ["hiden_size=8"])
    with pytest.raises(RnnlmError, match="key=value"):
        apply_overrides(p.model, p.train, ["hidden_size"])


@pytest.mark.parametrize(("item", "words"), [
    ("hidden_size=big", ("hidden_size", "big", "int")),
    ("dropout_input=lots", ("dropout_input", "lots", "float")),
    ("tie_weights=maybe", ("tie_weights", "maybe", "true or false")),
    ("batch_size=1.5", ("batch_size", "1.5", "int")),
])
def test_set_bad_value_type_is_refused(item: str, words: tuple[str, ...]) -> None:
    p = PRESETS["lstm-small"]
    with pytest.raises(RnnlmError) as err:
        apply_overrides(p.model, p.train, [item])
    for word in words:
        assert word in str(err.value)


def test_set_values_are_parsed_and_validated() -> None:
    p = PRESETS["lstm-small"]
    model, train = apply_overrides(p.model, p.train, ["hidden_size=300", "emb_size=300", "lr=0.5",
                                                      "tie_weights=false"])
    assert (model.hidden_size, model.emb_size, train.lr, model.tie_weights) == (300, 300, 0.5, False)
    with pytest.raises(RnnlmError, match="dropout_input"):
        apply_overrides(p.model, p.train, ["dropout_input=1.5"])


def test_tie_weights_needs_equal_sizes() -> None:
    with pytest.raises(RnnlmError, match="tie_weights.*emb_size == hidden_size"):
        ModelConfig(emb_size=8, hidden_size=16, tie_weights=True)
    p = PRESETS["lstm-small"]
    with pytest.raises(RnnlmError, match="tie_weights"):
        apply_overrides(p.model, p.train, ["hidden_size=300"])  # the preset is tied with emb 256
    assert isinstance(TrainConfig(), TrainConfig)


def test_config_json_roundtrip() -> None:
    cfg = PRESETS["rhn-paper"].model
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(RnnlmError, match="unknown keys: colour"):
        ModelConfig.from_dict({**json.loads(cfg.to_json()), "colour": "red"})


def test_config_json_bad_value_type_is_refused() -> None:
    data = json.loads(PRESETS["rhn-paper"].model.to_json())
    with pytest.raises(RnnlmError, match="hidden_size"):
        ModelConfig.from_dict({**data, "hidden_size": "830"})


def test_learning_rate_schedule_is_the_reference_codes() -> None:
    """Epoch i counts from 0. ptb_word_lm: lr * 0.8 ** max(i + 1 - max_epoch, 0) (rnnlm divides by
    1 / 0.8); the RHN code: lr / lr_decay ** max(i - max_epoch + 1, 0); both hold lr for max_epoch
    epochs. decay_start 0 holds it for one epoch, like 1."""
    from rnnlm.train import learning_rate

    tf = TrainConfig(optimizer="sgd", lr=1.0, lr_decay=1.25, decay_start=6)
    rhn = PRESETS["rhn-paper"].train
    for i in range(40):
        assert learning_rate(tf, i) == pytest.approx(1.0 * 0.8 ** max(i + 1 - 6, 0), rel=1e-12)
        assert learning_rate(rhn, i) == pytest.approx(0.2 / 1.02 ** max(i - 20 + 1, 0), rel=1e-12)
    assert [learning_rate(TrainConfig(lr=1.0, lr_decay=2.0, decay_start=d), 1) for d in (0, 1, 2)] == [0.5, 0.5, 1.0]


def test_loss_convention_is_a_checked_train_key() -> None:
    assert TrainConfig().loss == "token_mean"
    with pytest.raises(RnnlmError, match="loss must be one of token_mean, time_sum"):
        TrainConfig(loss="sum")
    _, t = apply_overrides(ModelConfig(), TrainConfig(), ["loss=time_sum"])
    assert t.loss == "time_sum"
