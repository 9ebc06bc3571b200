"""Recurrent Highway Network (Zilly, Srivastava, Koutník, Schmidhuber 2016, arXiv 1607.03474).

One layer of recurrence depth L; x enters only the first micro-layer:

    s_0 = s_L of the previous time step
    for l = 1..L:
        h_l = tanh(W_H x·[l=1] + R_H,l drop_l(s_{l-1}) + b_H,l)
        t_l = σ(W_T x·[l=1] + R_T,l drop_l(s_{l-1}) + b_T,l)
        s_l = drop_c(h_l) ⊙ t_l + s_{l-1} ⊙ (1 - t_l)       # coupled carry gate c = 1 - t
    y = s_L

drop_l is variational: one mask per sequence, the same before every micro-layer (the RHN code's
noise_h), so drop_l = drop; drop_c is the recurrent dropout
of Semeniuta et al. on the candidate. Weights uniform ±init_scale (0.04 in the paper), transform
biases b_T = -2 so that the cell starts out carrying its state.

Layer normalization follows Ba et al. (2016): the recurrent and the input contributions are
normalized separately, each gate over its own units, and the bias added after,

    [h_pre; t_pre] = LN_l(R_l drop_l(s_{l-1})) + LN_x(W x)·[l=1] + b_l

Normalizing their sum instead (as one might for an LSTM) failed here: once the recurrent term
dominates the sum, the normalized micro-layer is nearly odd in s, and a trained model had two
regimes, s and roughly -s (state cosine -0.6 between two starts), one of which predicts
confidently wrong: validation from a zero state read ppl 10^5-10^6 (bench/RESULTS.md). A
separately normalized input keeps its weight whatever the state's scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from rnnlm.cells.base import CandidateDropout, GateLayerNorm, SequenceDropout, run_sequence, zeros_state


class RHNState(NamedTuple):
    s: Tensor  # (B, H)


class RHNCell(nn.Module):
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        depth: int = 3,
        layer_norm: bool = False,
        dropout_recurrent: float = 0.0,
        recurrent_dropout: float = 0.0,
        init_scale: float = 0.04,
        transform_bias: float = -2.0,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.depth = input_size, hidden_size, depth
        self.input_proj = nn.Linear(input_size, 2 * hidden_size, bias=False)  # [W_H; W_T]
        # [R_H,l; R_T,l] with biases [b_H,l; b_T,l], one per micro-layer; with layer norm the biases
        # are LN's own (a bias before LN would be normalised away, and LN(0 + b) would turn a zero
        # state into a full-scale copy of b)
        self.recurrent = nn.ModuleList(nn.Linear(hidden_size, 2 * hidden_size, bias=not layer_norm) for _ in range(depth))
        self.norms = nn.ModuleList(GateLayerNorm(2, hidden_size) for _ in range(depth)) if layer_norm else None
        self.input_norm = GateLayerNorm(2, hidden_size) if layer_norm else None  # LN_x, gain 1 and bias 0
        # One mask per sequence for the whole recurrence, reused before every micro-layer, as the RHN
        # code applies its one noise_h to current_state in each of the depth micro-layers.
        self.state_dropout = SequenceDropout(dropout_recurrent)
        self.candidate_dropout = CandidateDropout(recurrent_dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-init_scale, init_scale)
            for layer in self.recurrent:
                assert isinstance(layer, nn.Linear)
                if layer.bias is not None:
                    layer.bias[hidden_size:].fill_(transform_bias)
            if self.norms is not None and self.input_norm is not None:
                for norm in self.norms:  # b_T lives in LN's bias
                    assert isinstance(norm, GateLayerNorm)
                    norm.gain.fill_(1.0)
                    norm.bias.zero_()
                    norm.bias[1].fill_(transform_bias)
                self.input_norm.gain.fill_(1.0)
                self.input_norm.bias.zero_()

    def init_state(self, batch: int, device: torch.device | str | None = None) -> RHNState:
        return zeros_state(RHNState, batch, {"s": self.hidden_size}, device, self.input_proj.weight.dtype)

    def reset_dropout(self, batch: int, device: torch.device | str | None = None) -> None:
        self.state_dropout.draw(batch, self.hidden_size, device)

    def project(self, xs: Tensor) -> Tensor:
        """The input's contribution [W_H x; W_T x] (..., 2H), normalized in the layer-norm variant."""
        px = self.input_proj(xs)
        return px if self.input_norm is None else self.input_norm(px).reshape(px.shape)

    def step(self, px: Tensor, state: RHNState) -> tuple[Tensor, RHNState]:
        """One time step from the precomputed input contribution px = project(x): (B, 2H)."""
        s = state.s
        for layer in range(self.depth):
            pre = self.recurrent[layer](self.state_dropout(s))  # (B, 2H)
            if self.norms is not None:
                pre = self.norms[layer](pre)
            if layer == 0:
                pre = pre + px
            h_pre, t_pre = pre.split(self.hidden_size, dim=-1)  # one ONNX Split of constant sizes
            h = self.candidate_dropout(torch.tanh(h_pre))
            t = torch.sigmoid(t_pre)
            s = s + t * (h - s)  # = h ⊙ t + s ⊙ (1 - t) in three operations, not four
        return s, RHNState(s)

    def forward(self, x: Tensor, state: RHNState) -> tuple[Tensor, RHNState]:
        """One time step: x (B, I) -> s_L (B, H)."""
        return self.step(self.project(x), state)

    def hoist(self, xs: Tensor) -> tuple[Tensor]:
        """What a step needs of its input, for any number of steps at once: project(x)."""
        return (self.project(xs),)

    def recur(self, pre: tuple[Tensor, ...], state: RHNState) -> tuple[Tensor, RHNState]:
        return self.step(pre[0], state)

    def sequence(self, xs: Tensor, state: RHNState, keep: Tensor | None = None) -> tuple[Tensor, RHNState]:
        """All steps of xs (T, B, I); keep (T, B, 1) optionally freezes finished samples."""
        return run_sequence(self, xs, state, keep)
