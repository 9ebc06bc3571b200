"""LSTM baseline (Hochreiter & Schmidhuber 1997; Zaremba et al. 2014 for the PTB setting).

    i, f, g, o = split(LN(W_x x_t + b + W_h drop_h(h_{t-1})))      # LN in the layer-norm variant only
    c_t = σ(f + forget_bias) ⊙ c_{t-1} + σ(i) ⊙ drop_c(tanh(g))     # drop_c: Semeniuta recurrent dropout
    h_t = σ(o) ⊙ tanh(LN_c(c_t))

drop_h is variational (one mask per sequence, Gal & Ghahramani 2016). Weights start uniform in
±init_scale (Zaremba et al.). forget_bias is 0 for the LSTM cell (ptb_word_lm's BasicLSTMCell and
LSTMBlockCell use forget_bias=0.0 for the paper's settings); HyperLSTM's hyper cell passes 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cells.base import CandidateDropout, GateLayerNorm, SequenceDropout, run_sequence, zeros_state


class LSTMState(NamedTuple):
    h: Tensor  # (B, H)
    c: Tensor  # (B, H)


class LSTMCell(nn.Module):
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        layer_norm: bool = False,
        dropout_recurrent: float = 0.0,
        recurrent_dropout: float = 0.0,
        init_scale: float = 0.1,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.forget_bias = forget_bias  # a constant added to f; 0 here as in ptb_word_lm, 1 in HyperLSTM's hyper cell
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)  # W_x and b, hoisted over time
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)  # W_h
        self.gate_norm = GateLayerNorm(4, hidden_size) if layer_norm else None
        self.cell_norm = GateLayerNorm(1, hidden_size) if layer_norm else None
        self.state_dropout = SequenceDropout(dropout_recurrent)
        self.candidate_dropout = CandidateDropout(recurrent_dropout)
        with torch.no_grad():
            for w in (self.input_proj.weight, self.input_proj.bias, self.hidden_proj.weight):
                w.uniform_(-init_scale, init_scale)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> LSTMState:
        return zeros_state(LSTMState, batch, {"h": self.hidden_size, "c": self.hidden_size}, device,
                           self.input_proj.weight.dtype)

    def reset_dropout(self, batch: int, device: torch.device | str | None = None) -> None:
        self.state_dropout.draw(batch, self.hidden_size, device)

    def step(self, px: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """One step from the precomputed input projection px = W_x x_t + b: (B, 4H), b as ``input_bias``."""
        gates = px + self.hidden_proj(self.state_dropout(state.h))  # (B, 4H)
        if self.gate_norm is not None:
            gates = self.gate_norm(gates)
        i, f, g, o = gates.split(self.hidden_size, dim=-1)  # split, not chunk: one ONNX Split of constant sizes
        if self.forget_bias and self.gate_norm is not None:  # without layer norm it is in px (input_bias)
            f = f + self.forget_bias
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * self.candidate_dropout(torch.tanh(g))
        c_out = self.cell_norm(c) if self.cell_norm is not None else c
        h = torch.sigmoid(o) * torch.tanh(c_out)
        return h, LSTMState(h, c)

    def input_bias(self) -> Tensor:
        """b of px = W_x x + b, the forget bias folded into f's rows where no layer norm comes between:
        the same sum, and one add fewer per step (traced, the fold is a constant)."""
        b = self.input_proj.bias
        if not self.forget_bias or self.gate_norm is not None:
            return b
        H = self.hidden_size
        return torch.cat((b[:H], b[H : 2 * H] + self.forget_bias, b[2 * H :]))  # gates i, f, g, o

    def forward(self, x: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """One time step: x (B, I) -> h (B, H)."""
        return self.step(*self.hoist(x), state)

    def hoist(self, xs: Tensor) -> tuple[Tensor]:
        """What a step needs of its input, for any number of steps at once: W_x x + b (``input_bias``)."""
        return (F.linear(xs, self.input_proj.weight, self.input_bias()),)

    def recur(self, pre: tuple[Tensor, ...], state: LSTMState) -> tuple[Tensor, LSTMState]:
        return self.step(pre[0], state)

    def sequence(self, xs: Tensor, state: LSTMState, keep: Tensor | None = None) -> tuple[Tensor, LSTMState]:
        """All steps of xs (T, B, I); keep (T, B, 1) optionally freezes finished samples."""
        return run_sequence(self, xs, state, keep)
