"""Tests for rnnlm.cells, rnnlm.model and rnnlm.config: tiny random models, independent references.

Every equation is checked against a computation that does not reuse the code under test: NumPy
float64 references of the ANCHORS equations (LSTM, RHN, HyperLSTM), hand computations from the
cells' own weights, and behaviour of the dropout masks observed through forward hooks.
Sizes are tiny (hidden <= 16, vocab <= 50, T <= 12) so the file runs in seconds on one thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rnnlm.cells import HyperLSTMCell, HyperState, LSTMCell, LSTMState, RHNCell, RHNState, make_cell
from rnnlm.cells.base import GateLayerNorm, SequenceDropout
from rnnlm.config import PRESETS, ModelConfig, TrainConfig, apply_overrides, resolve
from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel

torch.set_num_threads(1)

CELLS = ("lstm", "rhn", "hypernets")
CELL_LN = [pytest.param(c, ln, id=f"{c}-{'ln' if ln else 'plain'}") for c in CELLS for ln in (False, True)]
CELL_CLASSES = {"lstm": LSTMCell, "rhn": RHNCell, "hypernets": HyperLSTMCell}
STATE_CLASSES = {"lstm": LSTMState, "rhn": RHNState, "hypernets": HyperState}

V, IN, H, NH, NZ, B, T = 20, 10, 12, 6, 3, 3, 5  # vocab, input, hidden, hyper units, N_z, batch, steps
ALL_RATES = dict(dropout_emb=0.3, dropout_input=0.4, dropout_recurrent=0.3, dropout_output=0.4,
                 recurrent_dropout=0.3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------- helpers


def model_cfg(cell: str, **kw: Any) -> ModelConfig:
    base: dict[str, Any] = dict(cell=cell, vocab_size=V, emb_size=IN, hidden_size=H, tie_weights=False,
                                rhn_depth=2, hyper_size=NH, hyper_embed=NZ)
    base.update(kw)
    return ModelConfig(**base)


def build_cell(cell: str, *, perturb: bool = True, **kw: Any) -> nn.Module:
    """A tiny cell from a ModelConfig. ``perturb`` moves every weight off its initialisation:
    the HyperLSTM's paper init (W_ĥh = W_ĥx = 0, d_b = 0) would otherwise hide the hyper network."""
    cfg = model_cfg(cell, **kw)
    module = make_cell(cfg, cfg.emb_size)
    if perturb:
        perturb_(module)
    return module


def perturb_(module: nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def random_state(cell: nn.Module, batch: int = B) -> Any:
    state = cell.init_state(batch)
    return type(state)(*(torch.randn_like(t) * 0.5 for t in state))


def step_all(cell: nn.Module, xs: Tensor, state: Any) -> tuple[Tensor, Any]:
    ys = []
    for x in xs:
        y, state = cell(x, state)
        ys.append(y)
    return torch.stack(ys), state


def assert_state_close(a: Any, b: Any, **tol: Any) -> None:
    assert type(a) is type(b)
    for name, ta, tb in zip(a._fields, a, b, strict=True):
        torch.testing.assert_close(ta, tb, msg=lambda m, name=name: f"state field {name}: {m}", **tol)


def n(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_ln(x: np.ndarray, norm: GateLayerNorm | None) -> np.ndarray:
    """Layer norm per gate over its units, with that gate's gain and bias: x (B, G*H)."""
    if norm is None:
        return x
    g, b = n(norm.gain), n(norm.bias)  # (G, H)
    xg = x.reshape(x.shape[0], *g.shape)
    mu = xg.mean(-1, keepdims=True)
    var = ((xg - mu) ** 2).mean(-1, keepdims=True)
    return (((xg - mu) / np.sqrt(var + norm.eps)) * g + b).reshape(x.shape)


def np_lstm_step(cell: LSTMCell, x: np.ndarray, h: np.ndarray, c: np.ndarray, mask: Any = 1.0):
    """LSTM of lstm.py's docstring, gate order i, f, g, o; ``mask`` multiplies the candidate."""
    gates = x @ n(cell.input_proj.weight).T + n(cell.input_proj.bias) + h @ n(cell.hidden_proj.weight).T
    gates = np_ln(gates, cell.gate_norm)
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = sig(f) * c + sig(i) * (np.tanh(g) * mask)
    h = sig(o) * np.tanh(np_ln(c, cell.cell_norm))
    return h, c


def np_lstm(cell: LSTMCell, xs: np.ndarray, state: LSTMState, mask: Any = 1.0):
    h, c = n(state.h), n(state.c)
    ys = []
    for x in xs:
        h, c = np_lstm_step(cell, x, h, c, mask)
        ys.append(h)
    return np.stack(ys), (h, c)


def np_rhn(cell: RHNCell, xs: np.ndarray, state: RHNState, mask: Any = 1.0):
    """The ANCHORS RHN: x enters micro-layer 1 only, coupled carry gate 1 - t."""
    Hs = cell.hidden_size
    W = n(cell.input_proj.weight)  # (2H, IN) = [W_H; W_T]
    s = n(state.s)
    ys = []
    for x in xs:
        for layer in range(cell.depth):
            R, b = n(cell.recurrent[layer].weight), n(cell.recurrent[layer].bias)
            pre = s @ R.T + b + (x @ W.T if layer == 0 else 0.0)
            pre = np_ln(pre, None if cell.norms is None else cell.norms[layer])
            h_l = np.tanh(pre[:, :Hs]) * mask
            t_l = sig(pre[:, Hs:])
            s = h_l * t_l + s * (1.0 - t_l)
        ys.append(s)
    return np.stack(ys), (s,)


def np_hyper(cell: HyperLSTMCell, xs: np.ndarray, state: HyperState, mask: Any = 1.0):
    """The ANCHORS HyperLSTM (z from ĥ_t), main gate order i, g, f, o, written gate by gate."""
    Hs, Nz = cell.hidden_size, cell.hyper_embed
    h, c, hh, hc = (n(t) for t in state)
    Wx, Wh = n(cell.input_proj.weight), n(cell.hidden_proj.weight)  # (4H, IN), (4H, H)
    Dh, Dx, Db, b0 = n(cell.d_h), n(cell.d_x), n(cell.d_b), n(cell.bias)
    ys = []
    for x in xs:
        hh, hc = np_lstm_step(cell.hyper, np.concatenate([x, h], axis=-1), hh, hc)
        zh = hh @ n(cell.z_h.weight).T + n(cell.z_h.bias)
        zx = hh @ n(cell.z_x.weight).T + n(cell.z_x.bias)
        zb = hh @ n(cell.z_b.weight).T
        gates = []
        for k in range(4):
            zs, rows = slice(k * Nz, (k + 1) * Nz), slice(k * Hs, (k + 1) * Hs)
            d_h, d_x, bias = zh[:, zs] @ Dh[k], zx[:, zs] @ Dx[k], zb[:, zs] @ Db[k] + b0[k]
            gates.append(d_h * (h @ Wh[rows].T) + d_x * (x @ Wx[rows].T) + bias)
        gates_all = np_ln(np.concatenate(gates, axis=-1), cell.gate_norm)
        i, g, f, o = np.split(gates_all, 4, axis=-1)
        c = sig(f) * c + sig(i) * (np.tanh(g) * mask)
        h = sig(o) * np.tanh(np_ln(c, cell.cell_norm))
        ys.append(h)
    return np.stack(ys), (h, c, hh, hc)


NP_REFERENCE = {"lstm": np_lstm, "rhn": np_rhn, "hypernets": np_hyper}


class FixedMask(nn.Module):
    """Stands in for a cell's candidate_dropout: multiplies by a known mask, counts its calls."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask
        self.calls = 0

    def forward(self, g: Tensor) -> Tensor:
        self.calls += 1
        return g * self.mask


def sequence_dropouts(module: nn.Module) -> list[SequenceDropout]:
    return [m for m in module.modules() if isinstance(m, SequenceDropout)]


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
        assert_state_close(a, b, atol=1e-6, rtol=1e-5)


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
    for k, mask in enumerate(masks):
        assert len(seen[k]) == 8, "each recurrent mask is used once per step"
        assert len({tuple(row.tolist()) for row in mask}) > 1, "all samples share one mask"
        for inp, out in seen[k]:
            torch.testing.assert_close(out, inp * mask, atol=0, rtol=0)
            assert torch.equal(out == 0, (mask == 0) | (inp == 0)), "zeroed state units differ from the mask"
    if cell_name == "rhn":  # one independent mask per micro-layer
        assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


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
        pre = cell.recurrent[0](state.s) + cell.input_proj(x)
        if layer_norm:
            pre = cell.norms[0](pre)
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
    assert len(records) == 4 * per_step
    for m, inp, out in records:
        G, Hn = m.gain.shape
        x = inp.double().reshape(B, G, Hn)
        normalized = (out.double().reshape(B, G, Hn) - m.bias.double()) / m.gain.double()
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
    x, state = torch.randn(B, IN), random_state(cell)
    with torch.no_grad():
        cell(x, state)
    expected = x @ cell.input_proj.weight.T + state.s @ cell.recurrent[0].weight.T + cell.recurrent[0].bias
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


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
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(np_ln(c, cell.cell_norm))
        ys_ref.append(h)
    np.testing.assert_allclose(n(ys), np.stack(ys_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(n(final.c), c, atol=1e-5, rtol=1e-5)


def _assert_orthogonal_blocks(weight: Tensor, blocks: int) -> None:
    for chunk in weight.detach().double().chunk(blocks, dim=0):
        rows, cols = chunk.shape
        gram = chunk @ chunk.T if rows <= cols else chunk.T @ chunk
        torch.testing.assert_close(gram, torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5, rtol=0)


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
    # With this init the main cell's effective scale is d = sum_z 1 * 0.1 / N_z = 0.1 for every row.
    zh = cell.z_h(torch.randn(2, Nh)).reshape(2, 4, Nz)
    torch.testing.assert_close(cell._scale(zh, cell.d_h), torch.full((2, 4, Hs), 0.1))


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
    weights += [layer.bias[:16] for layer in cell.recurrent]
    for w in weights:
        assert w.abs().max().item() <= scale
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    assert flat.abs().max().item() > 0.9 * scale and abs(flat.mean().item()) < 0.1 * scale  # spread, centred
    for layer in cell.recurrent:
        assert torch.equal(layer.bias[16:], torch.full((16,), -2.0))
    if layer_norm:  # the bias before LN is normalised away, so b_T must live in LN's bias
        for norm in cell.norms:
            assert torch.equal(norm.bias[1], torch.full((16,), -2.0)) and not norm.bias[0].any()
            assert torch.equal(norm.gain, torch.ones_like(norm.gain))
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
