"""The training loop: one run from its checkpoint directory (fresh or resumed) to its last
validation, on one process or under torchrun (``rnnlm.distributed``). ``rnnlm.train.train``
resolves the config, the data and the device, then hands them to :func:`run_training`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rnnlm import checkpoint as ckpt
from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.data import (
    BpttBatches,
    Corpus,
    Vocabulary,
    batchify,
)
from rnnlm.distributed import Comm
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import evaluate
from rnnlm.fsutil import atomic_write_text
from rnnlm.model import LanguageModel, State, detach_state
from rnnlm.plot import plot_curves
from rnnlm.progress import Bar, Log
from rnnlm.summaries import summaries

EXIT_SIGNAL: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    steps: int
    best_valid_ppl: float
    interrupted_by: int | None = None  # the signal number, when stopped by one
    metrics: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # the mean loss of each step this call ran
    rank: int = 0  # of world_size processes (torchrun); only rank 0 writes and reports
    world_size: int = 1

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(self.interrupted_by, 1) if self.interrupted_by is not None else 0


def _ppl(nll_per_token: float) -> float:
    return math.exp(min(nll_per_token, 700.0))  # a huge early loss must not crash the report


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying mid-step; the loop checks the list after each step."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in EXIT_SIGNAL}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """epoch counts from 0: held for max(1, decay_start) epochs, then divided by lr_decay each epoch."""
    return cfg.lr / cfg.lr_decay ** max(0, epoch + 1 - max(1, cfg.decay_start))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight_decay here: L2 is a term of the loss (see objective), so it is clipped with the rest of
    # the gradient, as in the RHN reference code. The optimizer's own weight_decay would add wd * w after
    # clipping instead.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def objective(nll: torch.Tensor, steps: int, cfg: TrainConfig, model: torch.nn.Module) -> torch.Tensor:
    """The loss one window is trained on, from ``nll``, the mean NLL over its ``steps`` x B tokens.

    ``cfg.loss`` (see rnnlm.config.LOSSES): token_mean trains on ``nll`` itself; time_sum on the sum
    over the window's time steps of the mean over the batch, which is ``steps * nll`` since every
    position of a window is a real token. Then L2 over every parameter, as the RHN reference adds
    ``weight_decay * sum(tf.nn.l2_loss(v) for v in trainable_variables)`` (tied weights count once).
    """
    loss = nll * steps if cfg.loss == "time_sum" else nll
    if cfg.weight_decay:
        loss = loss + 0.5 * cfg.weight_decay * sum((p * p).sum() for p in model.parameters())
    return loss


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise RnnlmError(f"cannot write to output directory {out}: {e.strerror or e}") from None


def _corpus_summary(corpus: Corpus) -> str:
    parts = [f"{split} {r.tokens:,} tokens ({r.oov:,} OOV)" for split, r in corpus.records.items()]
    return f"data: {', '.join(parts)}; vocabulary {len(corpus.vocab):,}" if parts else f"vocabulary {len(corpus.vocab):,}"


@dataclass
class _Position:
    """Where a run is: what the resume state records and the summary reports."""

    epoch: int = 0
    window: int = 0  # the next window of the epoch
    step: int = 0
    tokens_seen: int = 0
    best: float = math.inf  # the best validation perplexity so far


@dataclass
class _Epoch:
    """One pass (or the rest of one) over the training windows, as the validation row reports it."""

    lr: float
    started: float
    nll: float = 0.0  # summed over tokens
    tokens: int = 0
    stop: str | None = None  # "signal" or "budget" when the pass ended early


class _Trainer:
    """One training run, from its checkpoint directory (fresh or resumed) to its last validation.

    Rank 0 alone touches ``out`` (through ``comm.on_main``); every rank runs the same steps and
    agrees on every stop (signal, budget, divergence) at the same step."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus, out: Path,
                 dev: torch.device, comm: Comm, log: Log) -> None:
        self.model_cfg, self.cfg, self.corpus, self.out, self.dev, self.comm, self.log = (
            model_cfg, train_cfg, corpus, out, dev, comm, log)
        self.data = comm.shard(batchify(corpus.train, train_cfg.batch_size))  # (N, B / W): this rank's streams
        self.windows = BpttBatches(self.data, train_cfg.bptt)
        torch.manual_seed(train_cfg.seed)
        self.model = LanguageModel(model_cfg).to(dev)
        if comm.parallel:  # the same initial weights on every rank, but dropout masks of its own
            torch.manual_seed(comm.dropout_seed(train_cfg.seed))
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.state: State = self.model.init_state(self.data.shape[1], dev)
        self.at = _Position()
        self.metrics: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.interrupted: int | None = None

    # ------------------------------------------------------------------ starting
    def start(self, resume: bool, force: bool) -> None:
        """Check the run directory (rank 0), then restore the resume state or write the run's files."""
        saved, self.metrics = self.comm.on_main(lambda: self._prepare(resume, force))
        if saved is not None:
            self._restore(saved)
        else:
            self.comm.on_main(self._write_run_files)
        self.net = self.comm.wrap(self.model)  # DDP when data-parallel: train through `net`, evaluate and save `model`

    def _prepare(self, resume: bool, force: bool) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        out = self.out
        if resume:
            saved = ckpt.load_train_state(out)
            _check_same_run(out, self.model_cfg, self.cfg, self.corpus, force)
            _check_world_size(out, saved, self.comm.size, force)
        else:
            if (out / ckpt.TRAIN_STATE).exists() and not force:
                raise RnnlmError(f"{out} already holds a training run: pass --resume to continue it, "
                                 "--force to start over (overwriting it), or --out elsewhere")
            saved = None
        _check_writable(out)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()] \
            if saved is not None and (out / "metrics.jsonl").exists() else []
        return saved, rows

    def _write_run_files(self) -> None:
        out = self.out
        self.corpus.vocab.save(out / ckpt.VOCAB)
        atomic_write_text(out / ckpt.DATA, json.dumps(self.corpus.describe(), indent=2) + "\n")
        atomic_write_text(out / ckpt.CONFIG, self.model_cfg.to_json())
        atomic_write_text(out / ckpt.TRAIN_CONFIG, json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    def _restore(self, saved: dict[str, Any]) -> None:
        comm, dev = self.comm, self.dev
        self.model.load_state_dict(saved["model"])
        if saved.get("optimizer_name") == self.cfg.optimizer:
            self.optimizer.load_state_dict(saved["optimizer"])
            for group in self.optimizer.param_groups:  # a run saved before L2 moved into the loss kept it here
                group["weight_decay"] = 0.0
        else:  # only reachable with --force: the moments of another optimizer do not carry over
            self.log(f"the optimizer changed to {self.cfg.optimizer}: starting its state fresh")
        self.at = _Position(saved["epoch"], saved["window"], saved["step"], saved["tokens_seen"],
                            saved["best_valid_ppl"])
        lo, hi = comm.world.streams(self.cfg.batch_size)  # the carry is saved for all B streams
        self.state = tuple(type(s)(*(t[lo:hi].to(dev) for t in saved_s))
                           for s, saved_s in zip(self.state, saved["carry"], strict=True))
        rng_cpu = saved.get("rng_cpu_ranks", [saved["rng_cpu"]])
        if comm.rank < len(rng_cpu):  # else (--force to another world size): this rank's fresh seed
            torch.set_rng_state(rng_cpu[comm.rank])
        rng_cuda = saved.get("rng_cuda_ranks", [saved["rng_cuda"]] if "rng_cuda" in saved else [])
        if dev.type == "cuda" and comm.rank < len(rng_cuda):
            torch.cuda.set_rng_state(rng_cuda[comm.rank], dev)
        self.log(f"resuming {self.out} at epoch {self.at.epoch + 1}, window {self.at.window}, step {self.at.step}")

    # ------------------------------------------------------------------ the resume state
    def _rank_state(self) -> dict[str, Any]:
        """What only this rank knows: its streams' carried state and its random state."""
        part: dict[str, Any] = {"carry": [tuple(t.cpu() for t in layer) for layer in self.state],
                                "rng_cpu": torch.get_rng_state()}
        if self.dev.type == "cuda":
            part["rng_cuda"] = torch.cuda.get_rng_state(self.dev)
        return part

    def _resume_state(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        at = self.at
        s: dict[str, Any] = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.cfg.optimizer, "epoch": at.epoch, "window": at.window, "step": at.step,
            "tokens_seen": at.tokens_seen, "best_valid_ppl": at.best,
            "carry": _join_carries([p["carry"] for p in parts]), "rng_cpu": parts[0]["rng_cpu"],
        }
        if "rng_cuda" in parts[0]:
            s["rng_cuda"] = parts[0]["rng_cuda"]
        if len(parts) > 1:  # a single-process run writes exactly what it always has
            s["world_size"] = len(parts)
            s["rng_cpu_ranks"] = [p["rng_cpu"] for p in parts]
            if "rng_cuda" in parts[0]:
                s["rng_cuda_ranks"] = [p["rng_cuda"] for p in parts]
        return s

    # Rank 0 alone runs these (comm.on_main); ``parts`` is every rank's _rank_state(), in rank order.
    def _save_resume(self, parts: list[dict[str, Any]] | None) -> None:
        assert parts is not None  # rank 0 holds every rank's part
        ckpt.check_finite(self.model)
        ckpt.save_train_state(self.out, self._resume_state(parts))

    def _write_interrupted(self, parts: list[dict[str, Any]] | None) -> None:
        self._save_resume(parts)
        self.log(f"interrupted at step {self.at.step}: wrote {self.out / ckpt.TRAIN_STATE}; continue with --resume")

    def _write_validated(self, parts: list[dict[str, Any]] | None, improved: bool, summary: str) -> None:
        if improved:
            ckpt.save_model_dir(self.out, self.model, self.corpus.vocab, self.cfg)
        self._save_resume(parts)
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        plot_curves(self.metrics, self.out / "curves.png", f"{self.model_cfg.cell}: {self.out.name}")
        self.log(summary)

    # ------------------------------------------------------------------ training
    def train_step(self, x_np: Any, y_np: Any, lr: float) -> float:
        """One window: forward, backward, clip, check for divergence on every rank, update. Returns
        the mean loss over the ranks (natural-log NLL per token)."""
        x, y = torch.from_numpy(x_np).to(self.dev), torch.from_numpy(y_np).to(self.dev)
        logits, self.state = self.net(x, self.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # token mean: reported
        self.optimizer.zero_grad(set_to_none=True)
        objective(loss, x.shape[0], self.cfg, self.model).backward()  # under DDP: averaged over the ranks
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip or math.inf)
        # A loss is one rank's own: sum the losses and the non-finite flags over the ranks.
        loss_sum, bad_loss, bad_norm = self.comm.all_sum(
            [float(loss.detach()), not torch.isfinite(loss), not torch.isfinite(norm)])
        if bad_loss or bad_norm:
            what = "loss" if bad_loss else "gradient norm"
            raise RnnlmError(
                f"training diverged at step {self.at.step + 1}: the {what} is not finite (lr {lr:g}). "
                f"Lower the learning rate (--set lr=...) or the clip norm; the last good checkpoint "
                f"in {self.out} is untouched.", code=3)
        self.optimizer.step()
        self.state = detach_state(self.state)
        return loss_sum / self.comm.size

    def run_epoch(self, clock: _Clock, signals: list[int], bar: Bar, tb: Any,
                  on_step: Callable[[int], None] | None) -> _Epoch:
        """Train the windows of the current epoch from ``at.window``, until its end or a stop that
        every rank agrees on (a signal on any rank, the budget or max_steps on rank 0's clock)."""
        at, comm = self.at, self.comm
        ep = _Epoch(lr=learning_rate(self.cfg, at.epoch), started=time.monotonic())
        for group in self.optimizer.param_groups:
            group["lr"] = ep.lr
        self.model.train()
        if at.window == 0:  # each epoch starts from the zero state, as ptb_word_lm and the RHN code do:
            self.state = self.model.init_state(self.data.shape[1], self.dev)  # the carry is another stream's end
        bar.start_epoch(at.epoch, at.window)
        for index, x_np, y_np in self.windows.windows(at.window):
            loss = self.train_step(x_np, y_np, ep.lr)
            n = y_np.size * comm.size  # every rank scores as many tokens
            at.step, at.window, at.tokens_seen = at.step + 1, index + 1, at.tokens_seen + n
            ep.nll, ep.tokens = ep.nll + loss * n, ep.tokens + n
            self.step_losses.append(loss)
            tb.step(at.step, loss, ep.lr)
            bar.advance(tokens=n, seconds=time.monotonic() - ep.started, epoch_tokens=ep.tokens,
                        ppl=_ppl(ep.nll / ep.tokens), lr=ep.lr, left=clock.left())
            if on_step is not None:
                on_step(at.step)
            signum, over = comm.all_max([signals[0] if signals else 0, clock.over(at.step) and comm.main])
            if signum:
                self.interrupted = int(signum)
                ep.stop = "signal"
                break
            if over:
                ep.stop = "budget"
                break
        return ep

    def validate(self, ep: _Epoch, clock: _Clock, tb: Any) -> None:
        """Evaluate on valid (rank 0), record the row, keep the best weights, write the resume state."""
        at, comm = self.at, self.comm
        epoch_done = at.window >= len(self.windows)
        t_valid = time.monotonic()
        result = comm.on_main(lambda: evaluate(self.model, self.corpus.valid, start_id=self.corpus.vocab.eos_id,
                                               batch_size=clock.eval_batch_size, device=self.dev))
        clock.valid_cost_s = time.monotonic() - t_valid
        row = self._row(ep, result, epoch_done, t_valid, clock)
        self.metrics.append(row)
        tb.validation(row)
        improved = result.ppl < at.best
        if improved:
            at.best = result.ppl
        if epoch_done:
            at.epoch, at.window = at.epoch + 1, 0
        comm.on_main(self._write_validated, comm.gather(self._rank_state()), improved,
                     f"epoch {row['epoch']:.2f}  step {at.step}  train ppl {row['train_ppl']:.1f}  valid ppl "
                     f"{result.ppl:.1f}  lr {ep.lr:.3g}  {row['tokens_per_s']:.0f} tok/s  {row['elapsed_s']:.0f}s")

    def _row(self, ep: _Epoch, result: Any, epoch_done: bool, t_valid: float, clock: _Clock) -> dict[str, Any]:
        at = self.at
        train_nll = ep.nll / max(ep.tokens, 1)
        row: dict[str, Any] = {
            "epoch": at.epoch + (1 if epoch_done else at.window / len(self.windows)), "step": at.step,
            "tokens_seen": at.tokens_seen, "lr": ep.lr, "train_ppl": _ppl(train_nll), "valid_ppl": result.ppl,
            "elapsed_s": round(clock.elapsed(), 1),
            "tokens_per_s": round(ep.tokens / max(t_valid - ep.started, 1e-9), 1),
            **({"valid_oov": self.corpus.records["valid"].oov} if "valid" in self.corpus.records else {}),
        }
        if self.model_cfg.level == "char":
            row["train_bpc"], row["valid_bpc"] = train_nll / math.log(2), result.bpc
        return row

    def run(self, clock: _Clock, on_step: Callable[[int], None] | None, tensorboard: bool | None) -> None:
        """Epochs until the config's last, a signal, or the budget; a validation after each."""
        comm = self.comm
        with stop_on_signals() as signals, self.log.progress(len(self.windows)) as bar, \
                summaries(self.out / "tensorboard", tensorboard, comm.main) as tb:
            while self.at.epoch < self.cfg.epochs:
                if comm.main_decides(self.at.window == 0 and clock.no_room_for_an_epoch()):
                    break  # the last validation was just done; a few steps more would only cost another one
                ep = self.run_epoch(clock, signals, bar, tb, on_step)
                if ep.stop == "signal":
                    comm.on_main(self._write_interrupted, comm.gather(self._rank_state()))
                    break
                self.validate(ep, clock, tb)
                if ep.stop == "budget":
                    break

    def result(self) -> TrainResult:
        at = self.at
        return TrainResult(out=self.out, epochs_done=at.epoch, steps=at.step, best_valid_ppl=at.best,
                           interrupted_by=self.interrupted, metrics=self.metrics, step_losses=self.step_losses,
                           rank=self.comm.rank, world_size=self.comm.size)


@dataclass
class _Clock:
    """The run's limits: a time budget that includes validation (whose measured cost is reserved
    once known), and max_steps."""

    budget_s: float
    max_steps: int | None
    eval_batch_size: int
    started: float = field(default_factory=lambda: time.monotonic())  # looked up at the call: tests patch time
    valid_cost_s: float = 0.0  # measured at the first validation

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float | None:
        return self.budget_s - self.elapsed() if self.budget_s < math.inf else None

    def over(self, step: int) -> bool:
        return (self.max_steps is not None and step >= self.max_steps) or self.elapsed() + self.valid_cost_s >= self.budget_s

    def no_room_for_an_epoch(self) -> bool:
        return bool(self.valid_cost_s) and self.elapsed() + 2 * self.valid_cost_s >= self.budget_s


def run_training(
    model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus, out: Path, dev: torch.device,
    max_steps: int | None, time_budget: float | None, resume: bool, force: bool, eval_batch_size: int,
    quiet: bool, on_step: Callable[[int], None] | None, comm: Comm, tensorboard: bool | None = None,
) -> TrainResult:
    clock = _Clock(time_budget * 60 if time_budget is not None else math.inf, max_steps, eval_batch_size)
    log = Log(quiet or not comm.main)
    trainer = _Trainer(model_cfg, train_cfg, corpus, out, dev, comm, log)
    trainer.start(resume, force)
    log(_corpus_summary(corpus))
    trainer.run(clock, on_step, tensorboard)
    return trainer.result()


def _join_carries(carries: list[list[tuple[torch.Tensor, ...]]]) -> list[tuple[torch.Tensor, ...]]:
    """The ranks' carried states (layer, field, (B / W, size)) side by side: the state of all B streams."""
    if len(carries) == 1:
        return carries[0]
    return [tuple(torch.cat(fields, dim=0) for fields in zip(*layers, strict=True))
            for layers in zip(*carries, strict=True)]


def _check_world_size(out: Path, saved: dict[str, Any], world_size: int, force: bool) -> None:
    was = int(saved.get("world_size", 1))
    if was != world_size and not force:
        raise RnnlmError(
            f"refusing to resume {out}: it was trained by {was} process{'es' if was > 1 else ''} and this run has "
            f"{world_size}; resume with the same number (torchrun --nproc-per-node {was}"
            f"{'' if was > 1 else ', or without torchrun'}), or pass --force to continue with {world_size} "
            "(the carried state is split exactly; the dropout random streams start afresh on the new ranks)")


def _check_same_run(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Corpus, force: bool) -> None:
    saved_cfg = ckpt.read_config(out)
    problems = []
    if saved_cfg != model_cfg:
        a, b = dataclasses.asdict(saved_cfg), dataclasses.asdict(model_cfg)
        problems.append("model config differs (" + ", ".join(f"{k}: {a[k]} -> {b[k]}" for k in a if a[k] != b[k]) + ")")
    if Vocabulary.load(out / ckpt.VOCAB) != corpus.vocab:
        problems.append("the vocabulary differs from the data's")
    saved_train = json.loads((out / ckpt.TRAIN_CONFIG).read_text()) if (out / ckpt.TRAIN_CONFIG).exists() else None
    if saved_train is not None:
        # A key the run predates had its default's meaning then (a run before `loss` existed: token_mean).
        saved_train = {**dataclasses.asdict(TrainConfig()), **saved_train}
        now = dataclasses.asdict(train_cfg)
        diffs = [f"{k}: {saved_train.get(k)} -> {now.get(k)}" for k in sorted(set(saved_train) | set(now))
                 if saved_train.get(k) != now.get(k)]
        if diffs:
            problems.append("training config differs (" + ", ".join(diffs) + ")")
    if problems and not force:
        raise RnnlmError(f"refusing to resume {out}: " + "; ".join(problems) + " (pass --force to resume anyway)")
