"""Exact evaluation: every token of a split scored once, the state carried through the stream.

Units: natural-log NLL summed over tokens; ppl = exp(nll / tokens); bpc = nll / (tokens · ln 2)
where, at character level, every character and every end of line is one token. The first token
is predicted from ``<eos>`` (a sentence start), so a split of N tokens gives N predictions:
82,430 on PTB test, as the papers count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rnnlm.model import LanguageModel, detach_state


@dataclass(frozen=True)
class EvalResult:
    tokens: int
    nll: float  # nats, summed
    level: str = "word"

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpc(self) -> float:
        return self.nll / (self.tokens * math.log(2))

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = {"tokens": self.tokens, "nll": self.nll, "ppl": self.ppl}
        if self.level == "char":
            d["bpc"] = self.bpc
        return d


def streams(data: np.ndarray, batch_size: int, start_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split data into ``batch_size`` contiguous streams, each led by ``start_id``.

    Returns inputs and targets (L, B) and a 0/1 mask (L, B) for the padding of shorter streams:
    stream b predicts its segment seg_b from [start] + seg_b[:-1].
    """
    segments = np.array_split(data, batch_size)
    length = max(len(s) for s in segments)
    inputs = np.full((length, batch_size), start_id, dtype=np.int64)
    targets = np.zeros((length, batch_size), dtype=np.int64)
    mask = np.zeros((length, batch_size), dtype=np.float32)
    for b, seg in enumerate(segments):
        n = len(seg)
        inputs[1:n, b] = seg[:-1]
        targets[:n, b] = seg
        mask[:n, b] = 1.0
    return inputs, targets, mask


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    data: np.ndarray,
    *,
    start_id: int,
    batch_size: int = 1,
    bptt: int = 200,
    device: str | torch.device = "cpu",
    progress: object | None = None,
) -> EvalResult:
    """Total NLL of ``data`` (1-D ids). batch_size 1 is the exact, non-batched evaluation."""
    was_training = model.training
    model.eval()
    inputs, targets, mask = streams(data, batch_size, start_id)
    state = model.init_state(batch_size, device)
    nll = 0.0
    for i in range(0, len(inputs), bptt):
        x = torch.from_numpy(inputs[i : i + bptt]).to(device)
        y = torch.from_numpy(targets[i : i + bptt]).to(device)
        m = torch.from_numpy(mask[i : i + bptt]).to(device)
        logits, state = model(x, state)
        state = detach_state(state)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        nll += float((losses * m.reshape(-1)).sum(dtype=torch.float64))
        if progress is not None:
            progress(int(m.sum()))  # type: ignore[operator]
    model.train(was_training)
    return EvalResult(tokens=int(mask.sum()), nll=nll, level=model.cfg.level)
