"""Tests for rnnlm.cells and rnnlm.model: sequence == stepping, NumPy references, initialisation, gradients.

Every equation is checked against a computation that does not reuse the code under test: NumPy
float64 references of the ANCHORS equations (LSTM, RHN, HyperLSTM) and hand computations from the
cells' own weights. Dropout and layer norm are in test_regularizers.py, configs in test_config.py.
Sizes are tiny (hidden <= 16, vocab <= 50, T <= 12) so the file runs in seconds on one thread.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from cellkit import (
    ALL_RATES,
    CELL_LN,
    CELLS,
    IN,
    NH,
    NP_REFERENCE,
    NZ,
    STATE_CLASSES,
    B,
    H,
    T,
    V,
    assert_state_close,
    build_cell,
    model_cfg,
    n,
    np_ln,
    np_rhn,
    perturb_,
    random_state,
    sequence_dropouts,
    sig,
    step_all,
)
from torch import Tensor, nn

from rnnlm.cells import HyperLSTMCell, RHNCell, make_cell
from rnnlm.config import PRESETS
from rnnlm.model import LanguageModel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------- 1. sequence == stepping, forward == step


@pytest.mark.parametrize(("cell_name", "layer_norm"), CELL_LN)
def test_sequence_equals_stepping_eval(cell_name: str, layer_norm: bool) -> None:
    cell = build_cell(cell_name, layer_norm=layer_norm, **ALL_RATES).eval()
    xs, state = torch.randn(T, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
        ys_step, final_step = step_all(cell, xs, state)
    assert ys.shape == (T, B, H)
    assert type(final) is STATE_CLASSES[cell_name]
    torch.testing.assert_close(ys, ys_step, atol=1e-6, rtol=1e-5)
    assert_state_close(final, final_step, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ys[-1], final[0], atol=0, rtol=0)  # output is the state's h (or s)


@pytest.mark.parametrize(("cell_name", "layer_norm"), CELL_LN)
def test_sequence_equals_stepping_train_with_variational_masks(cell_name: str, layer_norm: bool) -> None:
    cell = build_cell(cell_name, layer_norm=layer_norm, dropout_recurrent=0.4, recurrent_dropout=0.0).train()
    cell.reset_dropout(B)
    masks = [d.mask.clone() for d in sequence_dropouts(cell)]
    assert masks and all((m == 0).any() for m in masks), "masks were not drawn by reset_dropout"
    xs, state = torch.randn(T, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
        ys_step, final_step = step_all(cell, xs, state)
    torch.testing.assert_close(ys, ys_step, atol=1e-6, rtol=1e-5)
    assert_state_close(final, final_step, atol=1e-6, rtol=1e-5)
    for d, m in zip(sequence_dropouts(cell), masks, strict=True):
        assert torch.equal(d.mask, m), "running the sequence changed a per-sequence mask"
    with torch.no_grad():  # the masks really act: the eval-mode output differs
        ys_eval, _ = cell.eval().sequence(xs, state)
    assert not torch.allclose(ys, ys_eval)


@pytest.mark.parametrize(("cell_name", "layer_norm"), CELL_LN)
def test_model_forward_equals_step_two_layers(cell_name: str, layer_norm: bool) -> None:
    model = LanguageModel(model_cfg(cell_name, num_layers=2, layer_norm=layer_norm, **ALL_RATES))
    perturb_(model, 0.2)
    model.eval()
    tokens = torch.randint(0, V, (T + 2, B))
    state = tuple(random_state(layer) for layer in model.layers)
    with torch.no_grad():
        logits, final = model(tokens, state)
        st, step_logits = state, []
        for tok in tokens:
            out, st = model.step(tok, st)
            step_logits.append(out)
    assert logits.shape == (T + 2, B, V)
    assert len(final) == 2
    torch.testing.assert_close(logits, torch.stack(step_logits), atol=1e-5, rtol=1e-5)
    for a, b in zip(final, st, strict=True):
        assert_state_close(a, b, atol=1e-5, rtol=1e-5)  # as the logits: HyperLSTM's c grows with forget bias 1


# ---------------------------------------------------------------- 6. NumPy references, all cells


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_rhn_matches_numpy_reference(depth: int, layer_norm: bool) -> None:
    cell = build_cell("rhn", layer_norm=layer_norm, rhn_depth=depth).eval()
    xs, state = torch.randn(6, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
    ys_ref, (s_ref,) = np_rhn(cell, n(xs), state)
    np.testing.assert_allclose(n(ys), ys_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(n(final.s), s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("cell_name", "layer_norm"), [p for p in CELL_LN if p.values[0] != "rhn"])
def test_lstm_and_hyperlstm_match_numpy_reference(cell_name: str, layer_norm: bool) -> None:
    cell = build_cell(cell_name, layer_norm=layer_norm).eval()
    xs, state = torch.randn(6, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
    ys_ref, final_ref = NP_REFERENCE[cell_name](cell, n(xs), state)
    np.testing.assert_allclose(n(ys), ys_ref, atol=1e-5, rtol=1e-5)
    for got, ref in zip(final, final_ref, strict=True):
        np.testing.assert_allclose(n(got), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ 7. HyperLSTM


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_hyperlstm_with_constant_z_is_a_scaled_lstm(layer_norm: bool) -> None:
    cell = build_cell("hypernets", layer_norm=layer_norm).eval()  # perturbed: the hyper net is live...
    with torch.no_grad():  # ...but z no longer depends on it
        for lin in (cell.z_h, cell.z_x, cell.z_b):
            lin.weight.zero_()
    Nz = NZ
    zh, zx = n(cell.z_h.bias), n(cell.z_x.bias)
    Dh, Dx, b0 = n(cell.d_h), n(cell.d_x), n(cell.bias)
    # Per gate k: d_h = W_hz z_h, d_x = W_xz z_x, b = W_bz * 0 + b_0; gates stacked i, g, f, o.
    d_h = np.concatenate([zh[k * Nz:(k + 1) * Nz] @ Dh[k] for k in range(4)])  # (4H,)
    d_x = np.concatenate([zx[k * Nz:(k + 1) * Nz] @ Dx[k] for k in range(4)])
    Wh = d_h[:, None] * n(cell.hidden_proj.weight)  # row-scaled weights of a plain LSTM
    Wx = d_x[:, None] * n(cell.input_proj.weight)
    bias = b0.reshape(-1)
    xs, state = torch.randn(6, B, IN), random_state(cell)
    with torch.no_grad():
        ys, final = cell.sequence(xs, state)
    h, c = n(state.h), n(state.c)
    ys_ref = []
    for x in n(xs):
        gates = np_ln(x @ Wx.T + h @ Wh.T + bias, cell.gate_norm)
        i, g, f, o = np.split(gates, 4, axis=-1)
        c = sig(f + 1.0) * c + sig(i) * np.tanh(g)  # supercell's forget_bias=1.0
        h = sig(o) * np.tanh(np_ln(c, cell.cell_norm))
        ys_ref.append(h)
    np.testing.assert_allclose(n(ys), np.stack(ys_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(n(final.c), c, atol=1e-5, rtol=1e-5)


def _assert_orthogonal_blocks(weight: Tensor, blocks: int) -> None:
    for chunk in weight.detach().double().chunk(blocks, dim=0):
        rows, cols = chunk.shape
        gram = chunk @ chunk.T if rows <= cols else chunk.T @ chunk
        torch.testing.assert_close(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5, rtol=0)


def test_hyperlstm_embeddings_are_its_three_maps_in_one_product() -> None:
    """The one product of ``_embeddings`` is [z_h; z_x; z_b] as each map gives it, and a copy whose
    maps torch swapped for dynamic int8 ones (what a PyTorch user tries first) still runs."""
    torch.manual_seed(0)
    cell = HyperLSTMCell(24, 16, hyper_size=16, hyper_embed=4)
    for m in (cell.z_h, cell.z_x, cell.z_b):
        nn.init.normal_(m.weight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(cell._embeddings(x), torch.cat([cell.z_h(x), cell.z_x(x), cell.z_b(x)], dim=-1))
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(cell, {nn.Linear}, dtype=torch.qint8)
    assert type(q.z_h) is not nn.Linear
    with torch.no_grad():
        for a, b in zip(q.scales(x), cell.scales(x), strict=True):
            torch.testing.assert_close(a, b, atol=0.05 * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_hyperlstm_paper_initialisation(layer_norm: bool) -> None:
    Hs, Nh, Nz, In = 16, 16, 4, 24
    cell = HyperLSTMCell(In, Hs, hyper_size=Nh, hyper_embed=Nz, layer_norm=layer_norm)
    for lin in (cell.z_h, cell.z_x):
        assert torch.equal(lin.weight, torch.zeros_like(lin.weight))
        assert torch.equal(lin.bias, torch.ones_like(lin.bias))
    assert cell.z_b.bias is None
    assert 0.005 < cell.z_b.weight.std().item() < 0.02 and cell.z_b.weight.abs().max().item() < 0.1
    for d in (cell.d_h, cell.d_x):
        assert d.shape == (4, Nz, Hs)
        torch.testing.assert_close(d, torch.full_like(d, 0.1 / Nz), atol=0, rtol=0)
    assert not cell.d_b.any() and not cell.bias.any()
    _assert_orthogonal_blocks(cell.hidden_proj.weight, 4)  # W_h: W W^T = I per gate block
    _assert_orthogonal_blocks(cell.input_proj.weight, 4)  # W_x
    _assert_orthogonal_blocks(cell.hyper.hidden_proj.weight, 4)  # hyper cell: orthogonal...
    _assert_orthogonal_blocks(cell.hyper.input_proj.weight, 4)
    assert not cell.hyper.input_proj.bias.any()  # ...with zero biases
    # With this init the main cell's effective scales are d = sum_z 1 * 0.1 / N_z = 0.1 for every row,
    # and its bias W_bz z_b + b_0 is zero (but for supercell's forget bias of 1, folded into f's units
    # where no layer norm comes between).
    d_h, d_x, b = cell.scales(torch.randn(2, Nh))
    torch.testing.assert_close(d_h, torch.full((2, 4 * Hs), 0.1))
    torch.testing.assert_close(d_x, torch.full((2, 4 * Hs), 0.1))
    forget = torch.zeros(4, Hs)
    forget[2] = 0.0 if layer_norm else 1.0  # gates i, g, f, o
    torch.testing.assert_close(b, forget.reshape(1, -1).expand(2, -1), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ 8. RHN


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_rhn_paper_initialisation(layer_norm: bool) -> None:
    paper = PRESETS["rhn-paper"].model
    cfg = dataclasses.replace(paper, vocab_size=V, emb_size=16, hidden_size=16, rhn_depth=3, layer_norm=layer_norm)
    cell = make_cell(cfg, 16)
    assert isinstance(cell, RHNCell) and cell.depth == 3
    scale = 0.04  # ANCHORS: weights uniform ±0.04, b_T = -2
    assert paper.init_scale == scale and paper.rhn_transform_bias == -2.0
    weights = [cell.input_proj.weight] + [layer.weight for layer in cell.recurrent]
    weights += [layer.bias[:16] for layer in cell.recurrent if layer.bias is not None]
    for w in weights:
        assert w.abs().max().item() <= scale
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    assert flat.abs().max().item() > 0.9 * scale and abs(flat.mean().item()) < 0.1 * scale  # spread, centred
    if not layer_norm:
        for layer in cell.recurrent:
            assert torch.equal(layer.bias[16:], torch.full((16,), -2.0))
    else:  # a bias before LN would be normalised away, so b_T must live in LN's bias
        assert all(layer.bias is None for layer in cell.recurrent)
        for norm in cell.norms:
            assert torch.equal(norm.bias[1], torch.full((16,), -2.0)) and not norm.bias[0].any()
            assert torch.equal(norm.gain, torch.ones_like(norm.gain))
        assert torch.equal(cell.input_norm.gain, torch.ones_like(cell.input_norm.gain))
        assert not cell.input_norm.bias.any()
    # Behaviour: at init the transform gate is about sigmoid(-2), so the cell mostly carries its state.
    cell.eval()
    with torch.no_grad():
        pre = cell.recurrent[0](torch.zeros(1, 16)) + cell.input_proj(torch.zeros(1, 16))
        if layer_norm:
            pre = cell.norms[0](pre)
    torch.testing.assert_close(torch.sigmoid(pre[:, 16:]), torch.full((1, 16), 1 / (1 + math.exp(2.0))))


# ------------------------------------------------------------------------------------ 9. gradients


@pytest.mark.parametrize("cell_name", CELLS)
def test_gradients_reach_every_parameter(cell_name: str) -> None:
    model = LanguageModel(model_cfg(cell_name, num_layers=2, layer_norm=True, **ALL_RATES))
    # Off the paper init: W_ĥh = W_ĥx = 0 and d_b = 0 block the hyper network's gradient at step 0.
    perturb_(model, 0.1)
    model.train()
    tokens = torch.randint(0, V, (T + 1, B))
    logits, _ = model(tokens[:-1], model.init_state(B))
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), tokens[1:].reshape(-1))
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert any("layers.1" in name for name in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}'s gradient is all zero"


def test_hyperlstm_hyper_cell_gets_no_dropout_of_its_own() -> None:
    """The authors' supercell: hyper_use_recurrent_dropout=False ("Not in Paper"); only the main cell drops."""
    cell = HyperLSTMCell(IN, H, hyper_size=NH, hyper_embed=NZ, dropout_recurrent=0.3, recurrent_dropout=0.3)
    assert cell.candidate_dropout.p == 0.3 and cell.state_dropout.p == 0.3
    assert cell.hyper.candidate_dropout.p == 0.0 and cell.hyper.state_dropout.p == 0.0
