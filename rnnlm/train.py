"""The training program: truncated BPTT with the state carried, SGD or Adam, exact resume.
This module resolves the config, the data and the device; the loop itself is rnnlm.trainer.

    for epoch (from 0):                          lr = lr0 / lr_decay ** max(0, epoch + 1 - max(1, decay_start))
        state = zeros
        for window (x, y) of the B parallel streams (T steps each):
            logits, state = model(x, state)       new dropout masks per window (one sequence)
            objective(loss).backward()            token mean or time sum (cfg.loss), + L2
            clip global norm; optimizer.step(); state = state.detach()
        validate; keep the best weights; write metrics, curves and the resume state

Ctrl-C or SIGTERM finishes the current step, writes the resume state and exits 130 or 143.
A non-finite loss or gradient stops the run before the optimizer can write NaN into the weights.

Under ``torchrun --nproc-per-node W`` the same loop runs data-parallel (rnnlm/distributed.py): each
rank trains B / W of the streams, DDP averages the gradients, rank 0 validates and writes, and every
stop (signal, budget, divergence) is agreed on by all ranks at the same step.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rnnlm.config import ModelConfig, apply_overrides, resolve
from rnnlm.data import (
    Corpus,
    DataFiles,
    load_corpus,
    locate_ptb,
    ptb_filenames,
)
from rnnlm.distributed import detect, process_group, rank_device
from rnnlm.errors import RnnlmError
from rnnlm.trainer import EXIT_SIGNAL as EXIT_SIGNAL
from rnnlm.trainer import TrainResult as TrainResult
from rnnlm.trainer import learning_rate as learning_rate
from rnnlm.trainer import make_optimizer as make_optimizer
from rnnlm.trainer import objective as objective
from rnnlm.trainer import run_training
from rnnlm.trainer import stop_on_signals as stop_on_signals


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RnnlmError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise RnnlmError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def _slice_corpus(corpus: Corpus, train_tokens: int, valid_tokens: int) -> Corpus:
    return dataclasses.replace(
        corpus, train=corpus.train[:train_tokens], valid=corpus.valid[:valid_tokens], test=corpus.test[:valid_tokens]
    )


def train(
    *,
    cell: str | None = None,
    preset: str | None = None,
    level: str | None = None,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    time_budget: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
    overrides: list[str] | None = None,
    dry_run: bool = False,
    files: DataFiles | None = None,
    vocab_size: int | None = None,
    min_count: int = 1,
    corpus: Corpus | None = None,
    eval_batch_size: int = 32,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
    distributed: bool | None = None,
    tensorboard: bool | None = None,
) -> TrainResult:
    """Train a language model and write its checkpoint directory; see the module docstring.

    ``files`` trains on a user's own corpus instead of the Penn Treebank, its vocabulary built from
    train (``vocab_size`` most frequent, ``min_count``); the text normalization is the model
    config's (``lowercase``, ``numbers``, ``blank_lines``). ``corpus`` replaces the data outright
    (tests pass tiny ones). ``time_budget`` is in minutes
    and includes validation. ``on_step(step)`` is called after every optimizer step (tests use it
    to send a signal at a chosen step). ``distributed``: ``None`` trains data-parallel when
    torchrun started several processes (WORLD_SIZE > 1) and as one process otherwise; ``True``
    insists on torchrun, ``False`` refuses it (see :func:`rnnlm.distributed.detect`).
    ``tensorboard``: ``None`` writes summaries to <out>/tensorboard when the package is installed,
    ``True`` insists, ``False`` writes none (see :mod:`rnnlm.summaries`).
    """
    if time_budget is not None and not time_budget > 0:
        raise RnnlmError(f"--time-budget is in minutes and must be > 0, got {time_budget}")
    if max_steps is not None and max_steps < 1:
        raise RnnlmError(f"--max-steps must be >= 1, got {max_steps}")
    p = resolve(cell, preset)
    extra = list(overrides or [])
    if level is not None:
        extra.append(f"level={level}")
    if epochs is not None:
        extra.append(f"epochs={epochs}")
    if seed is not None:
        extra.append(f"seed={seed}")
    model_cfg, train_cfg = apply_overrides(p.model, p.train, extra)
    world = detect(distributed)
    world.streams(train_cfg.batch_size)  # refuse a batch the ranks cannot share before any of them waits
    dev = rank_device(world, pick_device(device))

    if corpus is None:
        model_cfg, corpus = _training_data(model_cfg, data_dir, files, vocab_size, min_count)
    if corpus.level != model_cfg.level:
        raise RnnlmError(f"the corpus is {corpus.level}-level but the model is {model_cfg.level}-level")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=len(corpus.vocab))

    tmp_out: tempfile.TemporaryDirectory[str] | None = None
    if dry_run:
        corpus = _slice_corpus(corpus, 20 * train_cfg.batch_size * train_cfg.bptt, 2000)
        max_steps = min(max_steps or 5, 5)
        if world.rank == 0:
            tmp_out = tempfile.TemporaryDirectory(prefix="rnnlm-dry-run-")
        out_dir = Path(tmp_out.name) if tmp_out is not None else Path(os.devnull)  # other ranks never write
    else:
        out_dir = Path(out) if out is not None else Path("models") / model_cfg.cell
    try:
        with process_group(world, dev) as comm:
            return run_training(model_cfg, train_cfg, corpus, out_dir, dev, max_steps, time_budget, resume, force,
                        eval_batch_size, quiet, on_step, comm, tensorboard)
    finally:
        if tmp_out is not None:
            tmp_out.cleanup()


def _training_data(cfg: ModelConfig, data_dir: str | Path | None, files: DataFiles | None, vocab_size: int | None,
                   min_count: int) -> tuple[ModelConfig, Corpus]:
    """The corpus read with the model's text spec: the user's files, or PTB (whose character files
    are already split into characters by spaces)."""
    if files is None:
        if cfg.level == "char":
            cfg = dataclasses.replace(cfg, char_input="spaced")
        directory = locate_ptb(data_dir, level=cfg.level)
        files = DataFiles(*(directory / name for name in ptb_filenames(cfg.level)))
    return cfg, load_corpus(files, cfg.text_spec(), vocab_size=vocab_size, min_count=min_count)
