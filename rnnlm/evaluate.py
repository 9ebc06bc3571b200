"""Exact evaluation: every token of a split scored once, the state carried through the stream.

Units: natural-log NLL summed over tokens; ppl = exp(nll / tokens); bpc = nll / (tokens · ln 2)
where, at character level, every character and every end of line is one token. The first token
is predicted from ``<eos>`` (a sentence start), so a split of N tokens gives N predictions:
82,430 on PTB test, as the papers count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rnnlm.data import FileRecord, encode_file, locate_ptb, ptb_filenames
from rnnlm.errors import RnnlmError
from rnnlm.fsutil import sha256
from rnnlm.model import LanguageModel, detach_state


@dataclass(frozen=True)
class EvalResult:
    tokens: int
    nll: float  # nats, summed
    level: str = "word"
    oov: int = 0  # tokens outside the vocabulary, scored as <unk>

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpc(self) -> float:
        return self.nll / (self.tokens * math.log(2))

    def as_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = {"tokens": self.tokens, "oov": self.oov, "nll": self.nll, "ppl": self.ppl}
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


def evaluation_file(model_dir: Path, split: str, data_dir: str | Path | None, level: str) -> Path:
    """The file a model's ``split`` was read from: the one its ``data.json`` records (checked
    unchanged by sha256), or PTB's for ``data_dir`` or a checkpoint that records none."""
    from rnnlm.checkpoint import read_data_record

    record = None if data_dir is not None else read_data_record(model_dir)
    if record is None:
        return locate_ptb(data_dir, level=level) / ptb_filenames(level)[("train", "valid", "test").index(split)]
    files = record["files"]
    if split not in files:
        raise RnnlmError(f"{model_dir} was trained without a {split} file (it has {', '.join(files)}); "
                         "evaluate a file with --file")
    saved = FileRecord(**files[split])
    path = Path(saved.path)
    if not path.is_file():
        raise RnnlmError(f"{path}, the {split} file {model_dir}/data.json records, is missing; pass --file")
    if sha256(path) != saved.sha256:
        raise RnnlmError(f"{path} changed since {model_dir} was trained (sha256 differs from data.json); "
                         "pass --file to evaluate it as it is now")
    return path


def evaluate_checkpoint(model_dir: Path, *, split: str | None = "valid", file: str | Path | None = None,
                        batch_size: int = 1, data_dir: str | Path | None = None,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate a checkpoint on one of the files it was trained with (``split``) or on any text
    (``file``), read with the model's own tokenizer; the summary ``rnnlm eval --json`` prints."""
    from rnnlm.checkpoint import load_model_dir

    if file is None and split not in ("train", "valid", "test"):
        raise RnnlmError(f"--split must be train, valid or test, not {split!r}")
    if batch_size < 1:
        raise RnnlmError(f"--batch-size must be >= 1, got {batch_size}")
    model, vocab = load_model_dir(model_dir, device)
    path = Path(file) if file is not None else evaluation_file(model_dir, split or "", data_dir, model.cfg.level)
    ids, record = encode_file(path, model.cfg.text_spec(), vocab)
    result = evaluate(model, ids, start_id=vocab.eos_id, batch_size=batch_size, device=device)
    result = dataclasses.replace(result, oov=record.oov)
    where = {"file": str(path)} if file is not None else {"split": split, "file": str(path)}
    return {"model": str(model_dir), **where, "batch_size": batch_size, **result.as_dict()}
