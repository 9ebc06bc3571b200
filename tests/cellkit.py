"""Shared helpers for the cell, regularizer and config tests: tiny sizes, builders, NumPy references.

The references are NumPy float64 versions of the ANCHORS equations (LSTM, RHN, HyperLSTM) that do
not reuse the code under test. Sizes are tiny (hidden <= 16, vocab <= 50, T <= 12).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rnnlm.cells import HyperLSTMCell, HyperState, LSTMCell, LSTMState, RHNCell, RHNState, make_cell
from rnnlm.cells.base import GateLayerNorm, SequenceDropout
from rnnlm.config import ModelConfig

torch.set_num_threads(1)

CELLS = ("lstm", "rhn", "hypernets")
CELL_LN = [pytest.param(c, ln, id=f"{c}-{'ln' if ln else 'plain'}") for c in CELLS for ln in (False, True)]
CELL_CLASSES = {"lstm": LSTMCell, "rhn": RHNCell, "hypernets": HyperLSTMCell}
STATE_CLASSES = {"lstm": LSTMState, "rhn": RHNState, "hypernets": HyperState}

V, IN, H, NH, NZ, B, T = 20, 10, 12, 6, 3, 3, 5  # vocab, input, hidden, hyper units, N_z, batch, steps
ALL_RATES = dict(dropout_emb=0.3, dropout_input=0.4, dropout_recurrent=0.3, dropout_output=0.4,
                 recurrent_dropout=0.3)


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


def np_lstm_step(cell: LSTMCell, x: np.ndarray, h: np.ndarray, c: np.ndarray, mask: Any = 1.0,
                 forget_bias: float = 0.0):
    """LSTM of lstm.py's docstring, gate order i, f, g, o; ``mask`` multiplies the candidate."""
    gates = x @ n(cell.input_proj.weight).T + n(cell.input_proj.bias) + h @ n(cell.hidden_proj.weight).T
    gates = np_ln(gates, cell.gate_norm)
    i, f, g, o = np.split(gates, 4, axis=-1)
    c = sig(f + forget_bias) * c + sig(i) * (np.tanh(g) * mask)
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
    """The ANCHORS RHN: x enters micro-layer 1 only, coupled carry gate 1 - t; with layer norm,
    LN(R s + b) + LN(W x) in the first micro-layer."""
    Hs = cell.hidden_size
    W = n(cell.input_proj.weight)  # (2H, IN) = [W_H; W_T]
    s = n(state.s)
    ys = []
    for x in xs:
        for layer in range(cell.depth):
            bias = cell.recurrent[layer].bias
            R, b = n(cell.recurrent[layer].weight), 0.0 if bias is None else n(bias)
            if cell.norms is None:
                pre = s @ R.T + b + (x @ W.T if layer == 0 else 0.0)
            else:  # Ba et al.: recurrent and input terms normalized separately
                pre = np_ln(s @ R.T + b, cell.norms[layer]) + (np_ln(x @ W.T, cell.input_norm) if layer == 0 else 0.0)
            h_l = np.tanh(pre[:, :Hs]) * mask
            t_l = sig(pre[:, Hs:])
            s = h_l * t_l + s * (1.0 - t_l)
        ys.append(s)
    return np.stack(ys), (s,)


def np_hyper(cell: HyperLSTMCell, xs: np.ndarray, state: HyperState, mask: Any = 1.0):
    """The ANCHORS HyperLSTM (z from ĥ_t), main gate order i, g, f, o, written gate by gate, with the
    authors' supercell forget bias of 1 in both cells."""
    Hs, Nz = cell.hidden_size, cell.hyper_embed
    h, c, hh, hc = (n(t) for t in state)
    Wx, Wh = n(cell.input_proj.weight), n(cell.hidden_proj.weight)  # (4H, IN), (4H, H)
    Dh, Dx, Db, b0 = n(cell.d_h), n(cell.d_x), n(cell.d_b), n(cell.bias)
    ys = []
    for x in xs:
        hh, hc = np_lstm_step(cell.hyper, np.concatenate([x, h], axis=-1), hh, hc, forget_bias=1.0)  # supercell
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
        c = sig(f + 1.0) * c + sig(i) * (np.tanh(g) * mask)  # supercell's forget_bias=1.0
        h = sig(o) * np.tanh(np_ln(c, cell.cell_norm))
        ys.append(h)
    return np.stack(ys), (h, c, hh, hc)


NP_REFERENCE = {"lstm": np_lstm, "rhn": np_rhn, "hypernets": np_hyper}


def sequence_dropouts(module: nn.Module) -> list[SequenceDropout]:
    """The variational dropouts that drop something (HyperLSTM's hyper cell has one at p = 0)."""
    return [m for m in module.modules() if isinstance(m, SequenceDropout) and m.p > 0]
