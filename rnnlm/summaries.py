"""TensorBoard summaries of a training run (the seed wrote them; so do we).

    <out>/tensorboard/events.out.tfevents.*     train/loss (nats) and train/lr every step;
                                                train/ppl, valid/ppl (and bpc), tokens_per_s
                                                at every validation, against the step

``tensorboard --logdir models`` then compares runs. Written by rank 0 only, when the
``tensorboard`` package is installed (``pip install 'rnnlm[train]'`` has it); metrics.jsonl and
curves.png are written either way. A resumed run appends a new event file to the same directory,
starting at the step it resumes from, so the curves continue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnlm.errors import RnnlmError


class Summaries:
    def __init__(self, writer: Any = None) -> None:
        self.writer = writer  # a torch.utils.tensorboard SummaryWriter, or None: write nothing

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def validation(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("train_ppl", "valid_ppl", "train_bpc", "valid_bpc", "tokens_per_s", "epoch"):
            if key in row:
                split, _, name = key.partition("_")
                tag = f"{split}/{name}" if split in ("train", "valid") else f"speed/{key}" if key != "epoch" else "train/epoch"
                self.writer.add_scalar(tag, row[key], row["step"])
        self.writer.flush()  # a validation is a moment worth keeping if the run dies next


@contextlib.contextmanager
def summaries(directory: Path, enabled: bool | None, main: bool) -> Iterator[Summaries]:
    """``enabled``: None writes when tensorboard is installed, True insists, False never writes."""
    writer = None
    if main and enabled is not False:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if enabled:
                raise RnnlmError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        else:
            writer = SummaryWriter(str(directory))
    try:
        yield Summaries(writer)
    finally:
        if writer is not None:
            writer.close()
