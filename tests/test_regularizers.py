"""Tests for the regularizers in rnnlm.cells and rnnlm.model: dropout of every kind, and layer norm.

Behaviour of the dropout masks is observed through forward hooks; the candidate-only recurrent
dropout and layer norm are checked against NumPy references and hand computations (cellkit.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellkit import (
    ALL_RATES,
    CELL_LN,
    CELLS,
    IN,
    NP_REFERENCE,
    B,
    H,
    T,
    V,
    build_cell,
    model_cfg,
    n,
    perturb_,
    random_state,
    sequence_dropouts,
)
from torch import Tensor, nn

from rnnlm.cells.base import GateLayerNorm
from rnnlm.model import LanguageModel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class FixedMask(nn.Module):
    """Stands in for a cell's candidate_dropout: multiplies by a known mask, counts its calls."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask
        self.calls = 0

    def forward(self, g: Tensor) -> Tensor:
        self.calls += 1
        return g * self.mask


# -------------------------------------------------------------------- 2. eval mode: no dropout


@pytest.mark.parametrize(("cell_name", "layer_norm"), CELL_LN)
def test_eval_is_deterministic_and_dropout_free(cell_name: str, layer_norm: bool) -> None:
    noisy = LanguageModel(model_cfg(cell_name, num_layers=2, layer_norm=layer_norm, **ALL_RATES))
    perturb_(noisy, 0.2)
    clean = LanguageModel(model_cfg(cell_name, num_layers=2, layer_norm=layer_norm))
    clean.load_state_dict(noisy.state_dict())
    tokens = torch.randint(0, V, (T, B))
    with torch.no_grad():
        noisy.eval()
        a, _ = noisy(tokens, noisy.init_state(B))
        b, _ = noisy(tokens, noisy.init_state(B))
        c, _ = clean.eval()(tokens, clean.init_state(B))
        d, _ = noisy.train()(tokens, noisy.init_state(B))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    assert not torch.allclose(a, d), "the dropout rates had no effect in training mode"


# ------------------------------------------------------------ 3. variational and word dropout


def test_input_dropout_mask_is_per_sequence_and_per_sample() -> None:
    model = LanguageModel(model_cfg("lstm", dropout_input=0.5)).train()
    seen: list[tuple[Tensor, Tensor]] = []
    model.input_dropout.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    tokens = torch.randint(0, V, (12, 4))
    model(tokens, model.init_state(4))
    (emb, out), mask = seen[0], model.input_dropout.mask
    assert mask is not None and mask.shape == (4, IN)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}  # keep 0.5, survivors scaled by 1 / 0.5
    torch.testing.assert_close(out, emb * mask.unsqueeze(0), atol=0, rtol=0)
    zeros = out == 0  # (T, B, E); embeddings are never exactly zero, so zeros come from the mask
    assert torch.equal(zeros, (mask == 0).unsqueeze(0).expand_as(zeros)), "zeroed units move between steps"
    assert (zeros.any(-1)).all(), "with p = 0.5 every sample should lose some units"
    assert len({tuple(row.tolist()) for row in mask}) > 1, "all samples share one mask"
    model(tokens, model.init_state(4))  # a new call draws a new mask
    assert not torch.equal(model.input_dropout.mask, mask)


def test_model_forward_resets_masks_once_per_call() -> None:
    model = LanguageModel(model_cfg("rhn", num_layers=2, **ALL_RATES)).train()
    calls = []
    original = model.reset_dropout
    model.reset_dropout = lambda batch, device=None: (calls.append(batch), original(batch, device))  # type: ignore[method-assign]
    model(torch.randint(0, V, (T, B)), model.init_state(B))
    assert calls == [B]
    model.eval()(torch.randint(0, V, (T, B)), model.init_state(B))
    assert calls == [B], "eval mode must not draw masks"


@pytest.mark.parametrize("cell_name", CELLS)
def test_recurrent_variational_mask_reused_at_every_step(cell_name: str) -> None:
    cell = build_cell(cell_name, dropout_recurrent=0.5, rhn_depth=3).train()
    cell.reset_dropout(4)
    drops = sequence_dropouts(cell)
    masks = [d.mask.clone() for d in drops]
    seen: dict[int, list[tuple[Tensor, Tensor]]] = {k: [] for k in range(len(drops))}
    for k, d in enumerate(drops):
        d.register_forward_hook(lambda m, args, out, k=k: seen[k].append((args[0], out)))
    cell.sequence(torch.randn(8, 4, IN), random_state(cell, 4))
    uses = 3 if cell_name == "rhn" else 1  # RHN: before each of its 3 micro-layers, as the RHN code's noise_h
    assert len(masks) == 1, "one recurrent mask per cell and sequence"
    for k, mask in enumerate(masks):
        assert len(seen[k]) == 8 * uses, "each recurrent mask is used at every step"
        assert len({tuple(row.tolist()) for row in mask}) > 1, "all samples share one mask"
        for inp, out in seen[k]:
            torch.testing.assert_close(out, inp * mask, atol=0, rtol=0)
            assert torch.equal(out == 0, (mask == 0) | (inp == 0)), "zeroed state units differ from the mask"


def test_word_dropout_drops_whole_types_per_sample() -> None:
    p, vocab = 0.5, 6
    model = LanguageModel(model_cfg("lstm", vocab_size=vocab, dropout_emb=p)).train()
    seen: list[tuple[Tensor, Tensor]] = []
    model.word_dropout.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    tokens = torch.randint(0, vocab, (12, 4))  # 12 tokens of 6 types: many repeats per sample
    model(tokens, model.init_state(4))
    (emb, out), mask = seen[0], model.word_dropout.mask
    assert mask is not None and mask.shape == (4, vocab)
    factor = out / emb  # (T, B, E); embeddings are never exactly zero
    torch.testing.assert_close(factor, factor[..., :1].expand_as(factor), atol=1e-6, rtol=1e-6)
    factor = factor[..., 0]  # (T, B): one factor per token, the whole row scaled
    dropped = kept = 0
    for b in range(4):
        for word in tokens[:, b].unique().tolist():
            at = tokens[:, b] == word
            f = factor[at, b]
            assert torch.allclose(f, f[0].expand_as(f)), f"id {word} of sample {b} gets different factors"
            expected = 0.0 if mask[b, word] == 0 else 1.0 / (1.0 - p)
            torch.testing.assert_close(f, torch.full_like(f, expected))
            if expected == 0.0:
                assert (out[at, b] == 0).all(), "a dropped type's embedding rows must be zero"
                dropped += 1
            else:
                kept += 1
    assert dropped and kept
    assert len({tuple(row.tolist()) for row in mask}) > 1, "the word mask must differ between samples"


# ------------------------------------------------------ 4. recurrent dropout: the candidate only


@pytest.mark.parametrize("mask_kind", ["random", "zeros"])
@pytest.mark.parametrize(("cell_name", "layer_norm"), CELL_LN)
def test_candidate_mask_hand_computation(cell_name: str, layer_norm: bool, mask_kind: str) -> None:
    cell = build_cell(cell_name, layer_norm=layer_norm).eval()
    mask = torch.zeros(B, H) if mask_kind == "zeros" else torch.bernoulli(torch.full((B, H), 0.5)) * 2.0
    fixed = FixedMask(mask)
    cell.candidate_dropout = fixed
    xs, state = torch.randn(3, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
    depth = cell.depth if cell_name == "rhn" else 1
    assert fixed.calls == 3 * depth
    ys_ref, final_ref = NP_REFERENCE[cell_name](cell, n(xs), state, n(mask))
    np.testing.assert_allclose(n(ys), ys_ref, atol=1e-5, rtol=1e-5)
    for got, ref in zip(final, final_ref, strict=True):
        np.testing.assert_allclose(n(got), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_lstm_zero_candidate_mask_keeps_memory(layer_norm: bool) -> None:
    cell = build_cell("lstm", layer_norm=layer_norm).eval()
    cell.candidate_dropout = FixedMask(torch.zeros(B, H))
    x, state = torch.randn(B, IN), random_state(cell)
    with torch.no_grad():
        _, new = cell(x, state)
        gates = cell.input_proj(x) + cell.hidden_proj(state.h)
        if layer_norm:
            gates = cell.gate_norm(gates)
        f = gates.chunk(4, dim=-1)[1]  # gate order i, f, g, o
    torch.testing.assert_close(new.c, torch.sigmoid(f) * state.c, atol=1e-7, rtol=1e-6)
    assert (new.c != 0).all() and (torch.sign(new.c) == torch.sign(state.c)).all(), "memory was erased"


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_rhn_zero_candidate_mask_only_carries(layer_norm: bool) -> None:
    cell = build_cell("rhn", layer_norm=layer_norm, rhn_depth=1).eval()
    cell.candidate_dropout = FixedMask(torch.zeros(B, H))
    x, state = torch.randn(B, IN), random_state(cell)
    with torch.no_grad():
        _, new = cell(x, state)
        if layer_norm:  # Ba et al.: the recurrent and the input terms normalized separately
            pre = cell.norms[0](cell.recurrent[0](state.s)) + cell.input_norm(cell.input_proj(x))
        else:
            pre = cell.recurrent[0](state.s) + cell.input_proj(x)
        t = torch.sigmoid(pre[:, H:])
    torch.testing.assert_close(new.s, state.s * (1.0 - t), atol=1e-7, rtol=1e-6)


def test_candidate_dropout_is_per_step_and_identity_in_eval() -> None:
    cell = build_cell("lstm", recurrent_dropout=0.5)
    drop = cell.candidate_dropout
    g = torch.ones(B, H)
    drop.train()
    a, b = drop(g), drop(g)
    assert set(a.unique().tolist()) <= {0.0, 2.0} and not torch.equal(a, b)
    drop.eval()
    assert torch.equal(drop(g), g)


# --------------------------------------------------------------------------------- 5. layer norm


@pytest.mark.parametrize("cell_name", CELLS)
def test_layer_norm_normalises_every_gate(cell_name: str) -> None:
    cell = build_cell(cell_name, layer_norm=True).eval()
    norms = [m for m in cell.modules() if isinstance(m, GateLayerNorm)]
    with torch.no_grad():
        for norm in norms:  # gains and biases away from 1 and 0, so "before the gain" is observable
            norm.gain.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1.0, 1.0)
    records: list[tuple[GateLayerNorm, Tensor, Tensor]] = []
    for norm in norms:
        norm.register_forward_hook(lambda m, args, out: records.append((m, args[0], out)))
    with torch.no_grad():
        cell.sequence(torch.randn(4, B, IN) * 2.0, random_state(cell))
    per_step = {"lstm": 2, "rhn": cell.depth if cell_name == "rhn" else 0, "hypernets": 4}[cell_name]
    once = 1 if cell_name == "rhn" else 0  # RHN normalizes the input term of all 4 steps in one call
    assert len(records) == 4 * per_step + once
    for m, inp, out in records:
        G, Hn = m.gain.shape
        x = inp.double().reshape(-1, G, Hn)
        normalized = (out.double().reshape(-1, G, Hn) - m.bias.double()) / m.gain.double()
        torch.testing.assert_close(normalized.float(), m.normalize(inp), atol=1e-5, rtol=1e-4)
        var_in = x.var(-1, unbiased=False)
        torch.testing.assert_close(normalized.mean(-1), torch.zeros_like(var_in), atol=1e-5, rtol=0)
        torch.testing.assert_close(normalized.var(-1, unbiased=False), var_in / (var_in + m.eps),
                                   atol=1e-4, rtol=1e-4)


def test_layer_norm_sees_the_real_lstm_pre_activation() -> None:
    cell = build_cell("lstm", layer_norm=True).eval()
    gate_in: list[Tensor] = []
    cell_in: list[Tensor] = []
    cell.gate_norm.register_forward_hook(lambda m, args, out: gate_in.append(args[0]))
    cell.cell_norm.register_forward_hook(lambda m, args, out: cell_in.append(args[0]))
    xs, state = torch.randn(4, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
    Wx, bx, Wh = cell.input_proj.weight, cell.input_proj.bias, cell.hidden_proj.weight
    h_prev = torch.cat([state.h.unsqueeze(0), ys[:-1]])  # h_{t-1} for each t
    for t in range(4):
        expected = xs[t] @ Wx.T + bx + h_prev[t] @ Wh.T
        torch.testing.assert_close(gate_in[t], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cell_in[-1], final.c, atol=0, rtol=0)  # LN_c reads c_t


def test_layer_norm_sees_the_real_rhn_pre_activation() -> None:
    cell = build_cell("rhn", layer_norm=True).eval()
    seen: list[Tensor] = []
    cell.norms[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    cell.input_norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x, state = torch.randn(B, IN), random_state(cell)
    with torch.no_grad():
        cell(x, state)
    # Ba et al.: the input term is normalized on its own, then the recurrent one (no bias before LN)
    torch.testing.assert_close(seen[0], x @ cell.input_proj.weight.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[1], state.s @ cell.recurrent[0].weight.T, atol=1e-5, rtol=1e-5)
    assert cell.recurrent[0].bias is None
