"""The recurrent cells, registered by name. Each has ``forward(x, state) -> (y, state)`` for one
step, ``sequence(xs, state)`` for many, ``init_state(batch, device)`` and ``reset_dropout``."""

from __future__ import annotations

from torch import nn

from rnnlm.cells.hypernets import HyperLSTMCell, HyperState
from rnnlm.cells.lstm import LSTMCell, LSTMState
from rnnlm.cells.rhn import RHNCell, RHNState
from rnnlm.config import ModelConfig

STATES = {"lstm": LSTMState, "rhn": RHNState, "hypernets": HyperState}


def make_cell(cfg: ModelConfig, input_size: int) -> nn.Module:
    """The cell that ``cfg.cell`` names, reading its input of size ``input_size``."""
    if cfg.cell == "lstm":
        return LSTMCell(input_size, cfg.hidden_size, layer_norm=cfg.layer_norm,
                        dropout_recurrent=cfg.dropout_recurrent, recurrent_dropout=cfg.recurrent_dropout,
                        init_scale=cfg.init_scale)
    if cfg.cell == "rhn":
        return RHNCell(input_size, cfg.hidden_size, depth=cfg.rhn_depth, layer_norm=cfg.layer_norm,
                       dropout_recurrent=cfg.dropout_recurrent, recurrent_dropout=cfg.recurrent_dropout,
                       init_scale=cfg.init_scale, transform_bias=cfg.rhn_transform_bias)
    if cfg.cell == "hypernets":
        return HyperLSTMCell(input_size, cfg.hidden_size, hyper_size=cfg.hyper_size, hyper_embed=cfg.hyper_embed,
                             layer_norm=cfg.layer_norm, dropout_recurrent=cfg.dropout_recurrent,
                             recurrent_dropout=cfg.recurrent_dropout)
    raise ValueError(f"unknown cell {cfg.cell!r}")  # ModelConfig validated it already


__all__ = ["HyperLSTMCell", "HyperState", "LSTMCell", "LSTMState", "RHNCell", "RHNState", "STATES", "make_cell"]
