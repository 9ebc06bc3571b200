"""The torch modules that are traced to ONNX, with flat tensor inputs and outputs in the
order that ``spec`` names them. Both run the model in eval mode, so no dropout remains."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rnnlm.export.recurrence import placeholder_sequence
from rnnlm.export.spec import StateSpec
from torch import Tensor, nn

from rnnlm.model import LanguageModel, State, flatten_state


def state_layout(model: LanguageModel) -> list[StateSpec]:
    """Layer by layer, field by field: the order of ``flatten_state``."""
    return [
        StateSpec(layer, name, int(t.shape[-1]))
        for layer, s in enumerate(model.init_state(1))
        for name, t in zip(s._fields, s, strict=True)
    ]


def unflatten_state(model: LanguageModel, flat: tuple[Tensor, ...]) -> State:
    template = model.init_state(1)
    out, i = [], 0
    for s in template:
        n = len(s._fields)
        out.append(type(s)(*flat[i : i + n]))
        i += n
    return tuple(out)


class StepGraph(nn.Module):
    """token_ids (B,), *state -> logprobs (B, V), *next_state."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        logits, state = self.model.step(token_ids, unflatten_state(self.model, flat_state))
        return (F.log_softmax(logits, dim=-1), *flatten_state(state))


class ScoreGraph(nn.Module):
    """token_ids (C, B), targets (C, B), lengths (B,), *state -> target_logprobs (C, B), *next_state.

    All C steps of the recurrence run (each sample's state frozen after lengths[b]); then the
    vocabulary projection and log-softmax are one batched product over the positions that hold a
    token, and only those: padding (a chunk's tail past a sample's length, which a batch of short
    lines is mostly made of) never reaches the 10,000-way product. Padding positions return 0.
    """

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor, targets: Tensor, lengths: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        steps = torch.arange(token_ids.shape[0], device=token_ids.device).unsqueeze(1)  # (C, 1): C is dynamic
        keep = steps < lengths.unsqueeze(0)  # (C, B)
        hidden, state = self.model.hidden(token_ids, unflatten_state(self.model, flat_state), keep.unsqueeze(-1),
                                          sequence=placeholder_sequence)
        rows = keep.reshape(-1).nonzero().squeeze(1)  # (N,): the positions that hold a token, of C * B
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, H)
        logprobs = F.log_softmax(self.model.decoder(h), dim=-1)  # (N, V)
        picked = logprobs.gather(1, targets.reshape(-1).index_select(0, rows).unsqueeze(1)).squeeze(1)  # (N,)
        out = torch.zeros(keep.numel(), dtype=picked.dtype, device=picked.device).index_copy(0, rows, picked)
        return (out.reshape(keep.shape), *flatten_state(state))  # (C, B)


class AdvanceGraph(nn.Module):
    """token_ids (C, B), lengths (B,), *state -> *next_state: the scoring graph's recurrence alone.

    Reading a prompt needs only the state after it; the vocabulary projection and log-softmax
    (about five times the recurrence's work at the default size) are left out. Sample b advances
    lengths[b] steps and its state is frozen after that, exactly as in ``ScoreGraph``."""

    def __init__(self, model: LanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor, lengths: Tensor, *flat_state: Tensor) -> tuple[Tensor, ...]:
        steps = torch.arange(token_ids.shape[0], device=token_ids.device).unsqueeze(1)  # (C, 1): C is dynamic
        keep = (steps < lengths.unsqueeze(0)).unsqueeze(-1)  # (C, B, 1)
        _, state = self.model.hidden(token_ids, unflatten_state(self.model, flat_state), keep, sequence=placeholder_sequence)
        return tuple(flatten_state(state))
