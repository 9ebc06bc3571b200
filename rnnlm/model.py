"""The language model: embedding -> stacked recurrent cells -> projection to the vocabulary.

    tokens (T, B) -> embed (T, B, E) -> word dropout, input dropout
                  -> cell 1 ... cell N, each followed by output dropout   (T, B, H)
                  -> decoder (T, B, V) logits          [decoder weight = embedding weight if tied]

``forward`` runs a whole window (training and exact evaluation); ``step`` runs one token and
is what export traces and generation uses. The state is a tuple with one NamedTuple per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rnnlm.cells import make_cell
from rnnlm.cells.base import SequenceDropout, WordDropout
from rnnlm.config import ModelConfig

State = tuple[Any, ...]  # one NamedTuple of (B, size) tensors per layer


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        self.word_dropout = WordDropout(cfg.dropout_emb, cfg.vocab_size)
        self.input_dropout = SequenceDropout(cfg.dropout_input)
        sizes = [cfg.emb_size] + [cfg.hidden_size] * (cfg.num_layers - 1)
        self.layers: Any = nn.ModuleList(make_cell(cfg, size) for size in sizes)  # of Cell
        self.output_dropouts: Any = nn.ModuleList(SequenceDropout(cfg.dropout_output) for _ in sizes)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        scale = cfg.init_scale
        with torch.no_grad():
            self.embedding.weight.uniform_(-scale, scale)
            self.decoder.bias.zero_()
            if not cfg.tie_weights:
                self.decoder.weight.uniform_(-scale, scale)
        if cfg.tie_weights:  # Press & Wolf 2017, Inan et al. 2017
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        return tuple(layer.init_state(batch, device) for layer in self.layers)

    def reset_dropout(self, batch: int, device: torch.device | str | None = None) -> None:
        """Draw fresh variational masks: call once per sequence (the trainer: once per BPTT window)."""
        self.word_dropout.draw(batch, device)
        self.input_dropout.draw(batch, self.cfg.emb_size, device)
        for layer, drop in zip(self.layers, self.output_dropouts, strict=True):
            layer.reset_dropout(batch, device)
            drop.draw(batch, self.cfg.hidden_size, device)

    def hidden(self, tokens: Tensor, state: State, keep: Tensor | None = None,
               sequence: Callable[..., tuple[Tensor, Any]] | None = None) -> tuple[Tensor, State]:
        """Top-layer outputs (T, B, H) for tokens (T, B), before the vocabulary projection.

        keep (T, B, 1) bool, if given, freezes each sample's state after its last real step.
        sequence(index, layer, x, state, keep), if given, runs layer ``index`` over the whole
        sequence instead of its own ``sequence`` (export writes each layer's time loop as one node)."""
        x = self.input_dropout(self.word_dropout(self.embedding(tokens), tokens))  # (T, B, E)
        new_state = []
        for index, (layer, drop, layer_state) in enumerate(zip(self.layers, self.output_dropouts, state, strict=True)):
            x, s = layer.sequence(x, layer_state, keep) if sequence is None else sequence(index, layer, x, layer_state, keep)
            x = drop(x)
            new_state.append(s)
        return x, tuple(new_state)

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (T, B) int64 -> logits (T, B, V). In training mode, new masks for this sequence."""
        if self.training:
            self.reset_dropout(tokens.shape[1], tokens.device)
        out, state = self.hidden(tokens, state)
        return self.decoder(out), state

    def step(self, token: Tensor, state: State) -> tuple[Tensor, State]:
        """One token per sequence: token (B,) int64 -> logits (B, V). Eval-mode use: export, generation."""
        x = self.embedding(token)  # (B, E)
        new_state = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            x, s = layer(x, layer_state)
            new_state.append(s)
        return self.decoder(x), tuple(new_state)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while carrying the values."""
    return tuple(type(s)(*(t.detach() for t in s)) for s in state)


def flatten_state(state: State) -> list[Tensor]:
    """Layer by layer, field by field: the order export names the state tensors."""
    return [t for layer_state in state for t in layer_state]
