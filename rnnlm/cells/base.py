"""Pieces every cell shares: per-sequence dropout masks, recurrent (candidate) dropout, gate layer norm.

Regularizers are small modules configured at construction. Variational masks are drawn once
per sequence (``draw``) and reused at every step; in eval mode every regularizer is the identity,
so nothing of it reaches an exported graph.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SequenceDropout(nn.Module):
    """Variational dropout (Gal & Ghahramani 2016): one Bernoulli mask per sample, reused over time.

    As in awd-lstm-lm's LockedDropout, the mask has shape (B, size) and multiplies the input at
    every time step of the sequence; surviving units are scaled by 1 / (1 - p).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.mask: Tensor | None = None

    def draw(self, batch: int, size: int, device: torch.device | str | None = None) -> None:
        if self.training and self.p > 0:
            keep = 1.0 - self.p
            self.mask = torch.empty(batch, size, device=device).bernoulli_(keep).div_(keep)  # (B, size)
        else:
            self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mask is None or self.mask.shape != x.shape[-2:]:
            # No mask for this batch yet: draw one now, so it still holds for the rest of the sequence.
            self.draw(x.shape[-2], x.shape[-1], x.device)
        assert self.mask is not None
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WordDropout(nn.Module):
    """Embedding dropout over word types: a dropped type is zero at every position of the sequence.

    One mask of shape (B, V) per sequence, so every occurrence of an id in sample b shares its fate.
    """

    def __init__(self, p: float, vocab_size: int) -> None:
        super().__init__()
        self.p = p
        self.vocab_size = vocab_size
        self.mask: Tensor | None = None

    def draw(self, batch: int, device: torch.device | str | None = None) -> None:
        if self.training and self.p > 0:
            keep = 1.0 - self.p
            self.mask = torch.empty(batch, self.vocab_size, device=device).bernoulli_(keep).div_(keep)
        else:
            self.mask = None

    def forward(self, emb: Tensor, tokens: Tensor) -> Tensor:
        """emb: (T, B, E) embeddings of tokens: (T, B)."""
        if not self.training or self.p == 0:
            return emb
        if self.mask is None or self.mask.shape[0] != tokens.shape[1]:
            self.draw(tokens.shape[1], tokens.device)
        assert self.mask is not None
        scale = self.mask.gather(1, tokens.t()).t()  # (T, B): the mask entry of each token's type
        return emb * scale.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class CandidateDropout(nn.Module):
    """Recurrent dropout (Semeniuta et al. 2016) on the candidate update only.

    c_t = f * c_{t-1} + i * drop(g_t): the memory is never erased by a mask, only the new
    content is. A fresh mask per step, as in the paper's per-step variant.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, g: Tensor) -> Tensor:
        return F.dropout(g, self.p, self.training) if self.p > 0 else g

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GateLayerNorm(nn.Module):
    """Layer normalization (Ba et al. 2016) of each gate's pre-activation over its own units.

    Input (B, G * H) holds G gates side by side; each gate is normalized over its H units and
    gets its own gain and bias. Exported as ONNX LayerNormalization plus the per-gate affine.
    """

    def __init__(self, num_gates: int, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_gates, self.size, self.eps = num_gates, size, eps
        self.gain = nn.Parameter(torch.ones(num_gates, size))
        self.bias = nn.Parameter(torch.zeros(num_gates, size))

    def normalize(self, x: Tensor) -> Tensor:
        """The zero-mean, unit-variance part, before the gain: (..., G, H)."""
        x = x.reshape(-1, self.num_gates, self.size)  # (B, G, H): a constant shape, no Shape ops in ONNX
        return F.layer_norm(x, (self.size,), eps=self.eps)

    def forward(self, x: Tensor) -> Tensor:
        y = self.normalize(x) * self.gain + self.bias  # (B, G, H)
        return y.reshape(-1, self.num_gates * self.size)


class Cell(Protocol):
    """What the model needs of a cell (each cell is an nn.Module with these methods)."""

    hidden_size: int

    def init_state(self, batch: int, device: torch.device | str | None = None) -> Any: ...
    def reset_dropout(self, batch: int, device: torch.device | str | None = None) -> None: ...
    def forward(self, x: Tensor, state: Any) -> tuple[Tensor, Any]: ...
    def hoist(self, xs: Tensor) -> tuple[Tensor, ...]: ...
    def recur(self, pre: tuple[Tensor, ...], state: Any) -> tuple[Tensor, Any]: ...
    def sequence(self, xs: Tensor, state: Any, keep: Tensor | None = None) -> tuple[Tensor, Any]: ...


def zeros_state(cls: Any, batch: int, sizes: dict[str, int], device: Any, dtype: Any = None) -> Any:
    """A state NamedTuple of zero tensors (B, size) named by the tuple's fields."""
    return cls(*(torch.zeros(batch, sizes[name], device=device, dtype=dtype) for name in cls._fields))


def hold(keep: Tensor | None, new: Any, old: Any) -> Any:
    """Per sample, the new state where keep (B, 1) is true and the old one elsewhere.

    This is how a batch of sequences of different lengths runs in one call: a finished
    sequence's state stops changing.
    """
    if keep is None:
        return new
    return type(new)(*(torch.where(keep, n, o) for n, o in zip(new, old, strict=True)))


def run_sequence(cell: Any, xs: Tensor, state: Any, keep: Tensor | None = None) -> tuple[Tensor, Any]:
    """All steps of xs (T, B, I) through ``cell``: what every cell's ``sequence`` is.

    The parts of a step that read only the input (``cell.hoist``) are one product for all T steps;
    ``cell.recur`` is the rest, one step at a time. keep (T, B, 1), if given, says which samples
    advance at each step (see ``hold``). Export replaces this loop by one ONNX Scan over
    ``cell.recur`` (rnnlm.export.recurrence)."""
    return recur_all(cell, cell.hoist(xs), state, keep)


def recur_all(cell: Any, pres: tuple[Tensor, ...], state: Any, keep: Tensor | None = None) -> tuple[Tensor, Any]:
    """``cell.recur`` over the hoisted inputs pres (each (T, B, ...)), one step at a time: (T, B, H), state."""
    outputs = []
    for t in range(pres[0].shape[0]):
        y, new = cell.recur(tuple(p[t] for p in pres), state)
        state = hold(None if keep is None else keep[t], new, state)
        outputs.append(y)
    return torch.stack(outputs), state  # (T, B, H)


def orthogonal_blocks_(weight: Tensor, blocks: int) -> None:
    """Orthogonal initialisation of each of ``blocks`` row blocks (one per gate) separately."""
    with torch.no_grad():
        for chunk in weight.chunk(blocks, dim=0):
            nn.init.orthogonal_(chunk)
