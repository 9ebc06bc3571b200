"""HyperLSTM (Ha, Dai, Le 2016, arXiv 1609.09106, section 3.2 and appendix A.2.3).

A small hyper-LSTM reads [x_t; h_{t-1}] and emits embeddings z that scale the main LSTM's weight
rows, gate by gate, at every step:

    ĥ_t, ĉ_t = HyperLSTM([x_t; h_{t-1}], (ĥ_{t-1}, ĉ_{t-1}))
    z_h = W_ĥh ĥ_t + b_ĥh;   z_x = W_ĥx ĥ_t + b_ĥx;   z_b = W_ĥb ĥ_t        # N_z per gate
    for each gate y in {i, g, f, o}:
        d_h = W_hz z_h;   d_x = W_xz z_x;   b = W_bz z_b + b_0
        y = LN_y(d_h ⊙ (W_h h_{t-1}) + d_x ⊙ (W_x x_t) + b)
    c_t = σ(f + 1) ⊙ c_{t-1} + σ(i) ⊙ drop_c(tanh(g))
    h_t = σ(o) ⊙ tanh(LN_c(c_t))

z uses ĥ_t (the authors' code), not ĥ_{t-1} (the paper's text); see ../shared/ANCHORS.md. As in
the authors' supercell code (hardmaru/supercell HyperLSTMCell), a constant forget bias of 1 is added
to f after layer norm, in the main cell and in the hyper cell (whose own LSTM has the same
forget_bias=1.0), and the hyper cell gets no recurrent dropout (hyper_use_recurrent_dropout=False).
Initialisation as in the paper's appendix: hyper cell orthogonal with zero biases; W_ĥh, W_ĥx
zero with biases 1; W_ĥb N(0, 0.01); W_hz, W_xz constant 0.1 / N_z; W_bz and b_0 zero; W_h and
W_x orthogonal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm.cells.base import (
    CandidateDropout,
    GateLayerNorm,
    SequenceDropout,
    orthogonal_blocks_,
    run_sequence,
    zeros_state,
)
from rnnlm.cells.lstm import LSTMCell, LSTMState

FORGET_BIAS = 1.0  # the authors' supercell adds forget_bias=1.0 to f, after layer norm, in both cells


class HyperState(NamedTuple):
    h: Tensor  # (B, H)    main cell output
    c: Tensor  # (B, H)    main cell memory
    hyper_h: Tensor  # (B, N_hyper)
    hyper_c: Tensor  # (B, N_hyper)


class HyperLSTMCell(nn.Module):
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        hyper_size: int = 64,
        hyper_embed: int = 4,
        layer_norm: bool = False,
        dropout_recurrent: float = 0.0,
        recurrent_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.hyper_size, self.hyper_embed = hyper_size, hyper_embed
        H, Nz = hidden_size, hyper_embed
        # No dropout of its own: the authors' HyperLSTMCell has hyper_use_recurrent_dropout=False ("Not in
        # Paper"); it sees the main cell's dropped-out h_{t-1} in its input.
        self.hyper = LSTMCell(input_size + hidden_size, hyper_size, layer_norm=layer_norm, forget_bias=FORGET_BIAS)
        self.z_h = nn.Linear(hyper_size, 4 * Nz)  # W_ĥh, b_ĥh
        self.z_x = nn.Linear(hyper_size, 4 * Nz)  # W_ĥx, b_ĥx
        self.z_b = nn.Linear(hyper_size, 4 * Nz, bias=False)  # W_ĥb
        self.d_h = nn.Parameter(torch.full((4, Nz, H), 0.1 / Nz))  # W_hz, one (N_z -> H) map per gate
        self.d_x = nn.Parameter(torch.full((4, Nz, H), 0.1 / Nz))  # W_xz
        self.d_b = nn.Parameter(torch.zeros(4, Nz, H))  # W_bz
        self.bias = nn.Parameter(torch.zeros(4, H))  # b_0
        self.input_proj = nn.Linear(input_size, 4 * H, bias=False)  # W_x
        self.hidden_proj = nn.Linear(H, 4 * H, bias=False)  # W_h
        self.gate_norm = GateLayerNorm(4, H) if layer_norm else None
        self.cell_norm = GateLayerNorm(1, H) if layer_norm else None
        self.state_dropout = SequenceDropout(dropout_recurrent)
        self.candidate_dropout = CandidateDropout(recurrent_dropout)
        with torch.no_grad():
            orthogonal_blocks_(self.hyper.input_proj.weight, 4)
            orthogonal_blocks_(self.hyper.hidden_proj.weight, 4)
            self.hyper.input_proj.bias.zero_()
            for z in (self.z_h, self.z_x):
                z.weight.zero_()
                z.bias.fill_(1.0)
            self.z_b.weight.normal_(0.0, 0.01)
            orthogonal_blocks_(self.input_proj.weight, 4)
            orthogonal_blocks_(self.hidden_proj.weight, 4)

    def init_state(self, batch: int, device: torch.device | str | None = None) -> HyperState:
        sizes = {"h": self.hidden_size, "c": self.hidden_size, "hyper_h": self.hyper_size, "hyper_c": self.hyper_size}
        return zeros_state(HyperState, batch, sizes, device, self.input_proj.weight.dtype)

    def reset_dropout(self, batch: int, device: torch.device | str | None = None) -> None:
        self.state_dropout.draw(batch, self.hidden_size, device)
        self.hyper.reset_dropout(batch, device)

    def scales(self, hyper_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """d_h, d_x and b (each (B, 4H), laid out like the gates) from the hyper cell's output; b is
        W_bz z_b + b_0, plus the forget bias where no layer norm comes between (``_gate_bias``).

        The three embeddings z_h, z_x, z_b are one product, and their twelve (N_z -> H) maps, one per
        kind and gate, one batched product broadcast over the batch: the same sums as three separate
        ones, in 6 traced nodes instead of 18 (a step's nodes are what a batch-1 step costs in
        onnxruntime). The concatenated weights are parameters only, folded into constants when exported."""
        Nz, H = self.hyper_embed, self.hidden_size
        z = self._embeddings(hyper_out).reshape(-1, 12, 1, Nz)  # (B, 12, 1, N_z)
        d = torch.cat((self.d_h, self.d_x, self.d_b))  # (12, N_z, H)
        u = torch.matmul(z, d).reshape(-1, 3 * 4 * H)  # (B, 12, 1, H) -> (B, [kind, gate, H])
        d_h, d_x, d_b = u.split(4 * H, dim=-1)  # not Einsum: slow to load in onnxruntime
        return d_h, d_x, d_b + self._gate_bias()

    def _gate_bias(self) -> Tensor:
        """b_0 (4H), with the forget bias folded into f's units where no layer norm comes between."""
        b = self.bias
        if self.gate_norm is not None:
            return b.reshape(-1)
        return torch.cat((b[:2], b[2:3] + FORGET_BIAS, b[3:])).reshape(-1)  # gates i, g, f, o

    def _embeddings(self, hyper_out: Tensor) -> Tensor:
        """[z_h; z_x; z_b] (B, 12 N_z): one product while the three maps are plain ``nn.Linear``
        layers; a copy whose layers were swapped for others (``torch.ao.quantization.quantize_dynamic``
        swaps in its own) calls each."""
        maps = (self.z_h, self.z_x, self.z_b)
        if not all(type(m) is nn.Linear for m in maps):
            return torch.cat([m(hyper_out) for m in maps], dim=-1)
        w = torch.cat((self.z_h.weight, self.z_x.weight, self.z_b.weight))  # (12 N_z, N_hyper)
        bias = torch.cat((self.z_h.bias, self.z_x.bias, self.z_h.bias.new_zeros(4 * self.hyper_embed)))  # W_ĥb has none
        return F.linear(hyper_out, w, bias)

    def step(self, px: Tensor, hx: Tensor, state: HyperState, w_hyper_h: Tensor | None = None) -> tuple[Tensor, HyperState]:
        """One step from hoisted input projections: px = W_x x (B, 4H) and hx = the hyper cell's
        input projection of x with its bias (B, 4 N_hyper). w_hyper_h is the h part of the hyper
        cell's input weights, sliced once per sequence by the caller."""
        H = self.hidden_size
        h_prev = self.state_dropout(state.h)
        # The hyper cell's input is [x; h]: its x part is hoisted, its h part is added here.
        if w_hyper_h is None:
            w_hyper_h = self.hyper.input_proj.weight[:, self.input_size :]
        hyper_px = hx + F.linear(h_prev, w_hyper_h)
        hyper_out, hyper_state = self.hyper.step(hyper_px, LSTMState(state.hyper_h, state.hyper_c))
        d_h, d_x, b = self.scales(hyper_out)  # (B, 4H) each
        gates = d_h * self.hidden_proj(h_prev) + d_x * px + b
        if self.gate_norm is not None:
            gates = self.gate_norm(gates)
        i, g, f, o = gates.split(H, dim=-1)  # split, not chunk: one ONNX Split of constant sizes
        if self.gate_norm is not None:  # without layer norm it is in b (_gate_bias)
            f = f + FORGET_BIAS
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * self.candidate_dropout(torch.tanh(g))
        c_out = self.cell_norm(c) if self.cell_norm is not None else c
        h = torch.sigmoid(o) * torch.tanh(c_out)
        return h, HyperState(h, c, hyper_state.h, hyper_state.c)

    def hoist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What a step needs of its input, for any number of steps at once: W_x x, and the hyper cell's
        input projection of x with its bias."""
        w_hyper_x = self.hyper.input_proj.weight[:, : self.input_size]
        return self.input_proj(x), F.linear(x, w_hyper_x, self.hyper.input_bias())

    def forward(self, x: Tensor, state: HyperState) -> tuple[Tensor, HyperState]:
        """One time step: x (B, I) -> h (B, H)."""
        px, hx = self.hoist(x)
        return self.step(px, hx, state)

    def recur(self, pre: tuple[Tensor, ...], state: HyperState) -> tuple[Tensor, HyperState]:
        return self.step(pre[0], pre[1], state)

    def sequence(self, xs: Tensor, state: HyperState, keep: Tensor | None = None) -> tuple[Tensor, HyperState]:
        """All steps of xs (T, B, I); keep (T, B, 1) optionally freezes finished samples."""
        return run_sequence(self, xs, state, keep)
