"""Training: exact resume after a signal, atomic checkpoints under SIGKILL, refusals of bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnlm.checkpoint import TRAIN_CONFIG, load_model_dir, read_config, save_model_dir
from rnnlm.config import PRESETS, apply_overrides
from rnnlm.data import Corpus, Vocabulary, batchify
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import evaluate
from rnnlm.model import LanguageModel
from rnnlm.train import train

torch.set_num_threads(1)
TINY = ["emb_size=16", "hidden_size=16", "batch_size=4", "bptt=6", "epochs=2", "hyper_size=8", "rhn_depth=2"]


def tiny_corpus(seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    vocab = Vocabulary([f"w{i}" for i in range(30)] + ["<unk>", "<eos>"])
    # A little structure (a noisy cycle), so losses move and differences would show.
    def stream(n: int) -> np.ndarray:
        base = np.arange(n) % 17
        noise = rng.integers(0, len(vocab), n)
        return np.where(rng.random(n) < 0.3, noise, base).astype(np.int64)

    return Corpus(level="word", vocab=vocab, train=stream(600), valid=stream(120), test=stream(120))


@pytest.mark.parametrize("cell", ["lstm", "rhn", "hypernets"])
def test_sigint_then_resume_reproduces_the_losses(tmp_path: Path, cell: str) -> None:
    corpus = tiny_corpus()
    full = train(cell=cell, corpus=corpus, out=tmp_path / "full", overrides=TINY, device="cpu", quiet=True)
    assert full.interrupted_by is None and len(full.step_losses) == 2 * 25  # 600 / 4 = 150 rows -> 25 windows

    k = 17  # mid-epoch: the carried state, the data position and the RNG must all be restored

    def interrupt(step: int) -> None:
        if step == k:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "interrupted"
    first = train(cell=cell, corpus=corpus, out=out, overrides=TINY, device="cpu", quiet=True, on_step=interrupt)
    assert first.interrupted_by == signal.SIGINT and first.exit_code == 130
    assert first.step_losses == full.step_losses[:k]
    second = train(cell=cell, corpus=corpus, out=out, overrides=TINY, device="cpu", quiet=True, resume=True)
    assert second.interrupted_by is None
    assert first.step_losses + second.step_losses == full.step_losses  # exactly, not approximately
    a, _ = load_model_dir(tmp_path / "full")
    b, _ = load_model_dir(out)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_refuses_a_changed_config_unless_forced(tmp_path: Path) -> None:
    corpus = tiny_corpus()
    train(cell="lstm", corpus=corpus, out=tmp_path, overrides=TINY, device="cpu", quiet=True, max_steps=3)
    with pytest.raises(RnnlmError, match="hidden_size: 16 -> 24"):
        train(cell="lstm", corpus=corpus, out=tmp_path, overrides=[*TINY, "hidden_size=24", "emb_size=24"],
              device="cpu", quiet=True, resume=True)
    with pytest.raises(RnnlmError, match="already holds a training run"):
        train(cell="lstm", corpus=corpus, out=tmp_path, overrides=TINY, device="cpu", quiet=True)
    other = Corpus("word", Vocabulary([f"v{i}" for i in range(30)] + ["<unk>", "<eos>"]), corpus.train, corpus.valid, corpus.test)
    with pytest.raises(RnnlmError, match="vocabulary differs"):
        train(cell="lstm", corpus=other, out=tmp_path, overrides=TINY, device="cpu", quiet=True, resume=True)


def test_missing_checkpoint_for_resume(tmp_path: Path) -> None:
    with pytest.raises(RnnlmError, match="cannot resume: no train_state.pt"):
        train(cell="lstm", corpus=tiny_corpus(), out=tmp_path / "nothing", overrides=TINY, device="cpu", quiet=True,
              resume=True)


def test_divergence_stops_with_the_step_and_writes_no_nan(tmp_path: Path) -> None:
    corpus = tiny_corpus()
    train(cell="lstm", corpus=corpus, out=tmp_path, overrides=TINY, device="cpu", quiet=True, max_steps=30)
    before = (tmp_path / "model.safetensors").read_bytes()
    state_before = (tmp_path / "train_state.pt").read_bytes()
    with pytest.raises(RnnlmError, match=r"diverged at step \d+") as e:
        train(cell="lstm", corpus=corpus, out=tmp_path, device="cpu", quiet=True, resume=True, force=True,
              overrides=[*TINY, "optimizer=sgd", "lr=1e38", "clip=0"])
    assert e.value.code != 0
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert (tmp_path / "train_state.pt").read_bytes() == state_before
    model, _ = load_model_dir(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("budget", [0, -1.5])
def test_time_budget_must_be_positive(tmp_path: Path, budget: float) -> None:
    with pytest.raises(RnnlmError, match="--time-budget"):
        train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, time_budget=budget, quiet=True)
    assert not any(tmp_path.iterdir())


def test_unwritable_output_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(RnnlmError, match="output directory"):
        train(cell="lstm", corpus=tiny_corpus(), out=blocker / "sub", overrides=TINY, device="cpu", quiet=True)
    assert blocker.read_text() == "I am a file"


def test_time_budget_stops_training(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=[*TINY, "epochs=100000"], device="cpu",
                   quiet=True, time_budget=0.05)  # 3 seconds
    assert time.monotonic() - t0 < 120  # generous: a loaded CI machine is slow, but 100000 epochs would take hours
    assert result.epochs_done < 100000 and result.metrics  # validated before stopping
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["valid_ppl"] == pytest.approx(result.metrics[-1]["valid_ppl"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_checkpoint_evaluates_to_the_recorded_valid_ppl(tmp_path: Path) -> None:
    corpus = tiny_corpus()
    result = train(cell="rhn", corpus=corpus, out=tmp_path, overrides=TINY, device="cpu", quiet=True)
    model, vocab = load_model_dir(tmp_path)
    # The per-epoch validation is batched (32 streams); recompute it independently at the same batch size.
    again = evaluate(model, corpus.valid, start_id=vocab.eos_id, batch_size=32)
    assert again.ppl == pytest.approx(result.best_valid_ppl, rel=1e-6)
    exact = evaluate(model, corpus.valid, start_id=vocab.eos_id, batch_size=1)
    assert exact.tokens == len(corpus.valid)


SLOW_WRITER = r"""
import sys, time
from pathlib import Path
import torch
from rnnlm.checkpoint import save_model_dir
from rnnlm.config import ModelConfig
from rnnlm.data import Vocabulary
from rnnlm.fsutil import atomic_write_with
from rnnlm.model import LanguageModel

out = Path(sys.argv[1])
vocab = Vocabulary([f"w{i}" for i in range(10)] + ["<unk>", "<eos>"])
torch.manual_seed(0)
model = LanguageModel(ModelConfig(cell="lstm", vocab_size=12, emb_size=8, hidden_size=8))
save_model_dir(out, model, vocab)           # the good checkpoint
print("saved", flush=True)

def slow(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)                        # killed here

atomic_write_with(out / "model.safetensors", slow)
"""


def test_sigkill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "saved"
    good = (tmp_path / "model.safetensors").read_bytes()
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "model.safetensors").read_bytes() == good
    model, vocab = load_model_dir(tmp_path)
    assert len(vocab) == 12 and model.cfg.hidden_size == 8


def test_sigterm_from_outside_saves_and_exits_143(tmp_path: Path) -> None:
    """The real CLI in a subprocess: SIGTERM mid-run -> resume state written, exit 143, resumable."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    for split, lines in (("train", 3000), ("valid", 50), ("test", 50)):
        text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(lines)) + "\n"
        (data / f"ptb.{split}.txt").write_text(text)
    import hashlib

    (data / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((data / f'ptb.{s}.txt').read_bytes()).hexdigest()}  ptb.{s}.txt\n"
                                             for s in ("train", "valid", "test")))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rnnlm", "train", "--cell", "lstm", "--data-dir", str(data), "--out", str(out),
           "--device", "cpu", *[a for kv in TINY for a in ("--set", kv)], "--set", "epochs=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "metrics.jsonl").exists(), proc.stderr.read() if proc.poll() is not None else "no epoch finished"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "--resume" in err
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] >= 1
    resumed = subprocess.run([*cmd[:-2], "--set", "epochs=1000", "--resume", "--max-steps", str(state["step"] + 2)],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == state["step"] + 2


def test_save_model_dir_refuses_nan_weights(tmp_path: Path) -> None:
    from rnnlm.config import ModelConfig
    from rnnlm.model import LanguageModel

    model = LanguageModel(ModelConfig(cell="lstm", vocab_size=12, emb_size=8, hidden_size=8))
    with torch.no_grad():
        model.decoder.bias[0] = float("nan")
    with pytest.raises(RnnlmError, match="not finite"):
        save_model_dir(tmp_path, model, Vocabulary([f"w{i}" for i in range(10)] + ["<unk>", "<eos>"]))
    assert not (tmp_path / "model.safetensors").exists()


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard directory (all its event files), as (step, value) in step order."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(directory))
    mux.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for run in mux.Runs():
        for tag in mux.GetAccumulator(run).Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(values) for tag, values in out.items()}


def test_tensorboard_summaries_hold_the_losses_and_the_metrics_and_continue_on_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # installed with the train extra
    corpus = tiny_corpus()
    out = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 30:  # in the second epoch, after the first validation
            os.kill(os.getpid(), signal.SIGINT)

    first = train(cell="lstm", corpus=corpus, out=out, overrides=TINY, device="cpu", quiet=True, on_step=interrupt,
                  tensorboard=True)
    second = train(cell="lstm", corpus=corpus, out=out, overrides=TINY, device="cpu", quiet=True, resume=True,
                   tensorboard=True)
    losses = first.step_losses + second.step_losses
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s = _scalars(out / "tensorboard")
    assert [step for step, _ in s["train/loss"]] == list(range(1, len(losses) + 1))  # no gap, no repeat
    np.testing.assert_allclose([v for _, v in s["train/loss"]], losses, rtol=1e-6)  # float32 on disk
    assert [step for step, _ in s["valid/ppl"]] == [m["step"] for m in metrics]
    np.testing.assert_allclose([v for _, v in s["valid/ppl"]], [m["valid_ppl"] for m in metrics], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in s["train/lr"]][:1], [metrics[0]["lr"]], rtol=1e-6)

    quiet = train(cell="lstm", corpus=corpus, out=tmp_path / "off", overrides=TINY, device="cpu", quiet=True,
                  max_steps=3, tensorboard=False)
    assert not (quiet.out / "tensorboard").exists()


# ------------------------------------------------------------------ the paper presets' training step


SMALL = ["emb_size=16", "hidden_size=16", "batch_size=4", "bptt=6", "rhn_depth=2", "hyper_size=8", "level=word",
         "dropout_emb=0", "dropout_input=0", "dropout_recurrent=0", "dropout_output=0", "recurrent_dropout=0"]
# Per preset: the extra overrides of its small copy. rhn-paper's L2 of 1e-7 would not move a float32
# weight, so its copy uses 0.05. The SGD copies get a clip between their token-mean and time-sum
# gradient norms (the presets' 5 and 10 are for the full-size models), so that the step tells the
# two conventions apart and the clip fires.
PAPER_STEP = {
    "lstm-medium": [],
    "rhn-paper": ["weight_decay=0.05"],
    "hypernets-char-paper": ["emb_size=8"],
    "hypernets-char-paper-ln": ["emb_size=8"],
}


def _reference_gradient(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, convention: str,
                        weight_decay: float) -> list[torch.Tensor]:
    """d(loss)/d(parameters) of the reference loss, written out: the NLL of every token, averaged
    over the batch at each time step, then summed over the steps (time_sum, the TF ptb_word_lm and
    RHN code) or averaged over them too (token_mean); plus weight_decay * sum(|w|^2) / 2 over every
    parameter, tied ones once (the RHN code's tf.nn.l2_loss over all trainable variables)."""
    params = list(model.parameters())
    logits, _ = model(x, model.init_state(x.shape[1]))  # (T, B, V) from the zero state
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (T, B)
    per_step = torch.stack([nll[t].mean() for t in range(nll.shape[0])])  # mean over the batch
    loss = per_step.sum() if convention == "time_sum" else per_step.mean()
    loss = loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)
    return list(torch.autograd.grad(loss, params))


def _global_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))


def _clip(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    scale = min(1.0, clip / (_global_norm(grads) + 1e-6))  # tf.clip_by_global_norm, as torch's clip_grad_norm_
    return [g * scale for g in grads]


def _step(p0: list[torch.Tensor], grads: list[torch.Tensor], optimizer: str, lr: float) -> list[torch.Tensor]:
    if optimizer == "sgd":
        return [p - lr * g for p, g in zip(p0, grads, strict=True)]
    # Adam's first step: m = (1 - b1) g and v = (1 - b2) g^2, bias-corrected to g and g^2.
    return [p - lr * g / (g.abs() + 1e-8) for p, g in zip(p0, grads, strict=True)]


@pytest.mark.parametrize("preset", list(PAPER_STEP))
def test_one_step_of_each_paper_preset_is_the_reference_update(tmp_path: Path, preset: str) -> None:
    corpus, paper = tiny_corpus(), PRESETS[preset]
    overrides = [*SMALL, *PAPER_STEP[preset]]
    model_cfg, train_cfg = apply_overrides(paper.model, paper.train, overrides)
    cfg = dataclasses.replace(model_cfg, vocab_size=len(corpus.vocab))
    torch.manual_seed(train_cfg.seed)  # the initial weights, as train() draws them
    model = LanguageModel(cfg).train()
    p0 = [p.detach().clone() for p in model.parameters()]
    data = torch.from_numpy(batchify(corpus.train, train_cfg.batch_size))
    x, y = data[: train_cfg.bptt], data[1 : train_cfg.bptt + 1]  # the first window, from the zero state
    if train_cfg.optimizer == "sgd":
        g_mean = _global_norm(_reference_gradient(model, x, y, "token_mean", 0.0))
        overrides.append(f"clip={g_mean * math.sqrt(train_cfg.bptt)}")  # T * g_mean > clip > g_mean

    run = train(preset=preset, corpus=corpus, out=tmp_path / "run", overrides=overrides, device="cpu", quiet=True,
                max_steps=1, tensorboard=False)
    assert read_config(run.out) == cfg
    tcfg = json.loads((run.out / TRAIN_CONFIG).read_text())  # what the run recorded
    assert (tcfg["loss"], tcfg["optimizer"], tcfg["lr"]) == (paper.train.loss, paper.train.optimizer, paper.train.lr)
    assert tcfg["loss"] == ("time_sum" if paper.train.optimizer == "sgd" else "token_mean")
    wd = tcfg["weight_decay"]

    def update(convention: str, l2: str = "in the loss") -> list[torch.Tensor]:
        g = _reference_gradient(model, x, y, convention, wd if l2 == "in the loss" else 0.0)
        g = _clip(g, tcfg["clip"])
        if l2 == "after the clip":  # what torch's optimizer weight_decay would do
            g = [t + wd * p for t, p in zip(g, p0, strict=True)]
        return _step(p0, g, tcfg["optimizer"], tcfg["lr"])

    expected = update(tcfg["loss"])
    saved = torch.load(run.out / "train_state.pt", weights_only=True)["model"]
    got = [saved[name] for name, _ in model.named_parameters()]
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))
    assert diff < 2e-6, diff

    # The step tells the reference convention from the plausible wrong ones.
    wrong = {"token_mean": update("token_mean")} if tcfg["optimizer"] == "sgd" else {}
    if wd:
        wrong["L2 after the clip"] = update(tcfg["loss"], "after the clip")
        wrong["no L2"] = update(tcfg["loss"], "none")
    for what, w in wrong.items():
        assert max(float((a - b).abs().max()) for a, b in zip(got, w, strict=True)) > 100 * diff + 1e-5, what
    if tcfg["optimizer"] == "sgd":  # the clip fired
        assert _global_norm(_reference_gradient(model, x, y, tcfg["loss"], wd)) > tcfg["clip"]


def test_each_epoch_starts_from_the_zero_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ptb_word_lm and the RHN code do: the carry at an epoch's end is the end of each stream, and
    the next window is the stream's start, so carrying it over would feed one stream another's context."""
    zero_at: list[bool] = []
    forward = LanguageModel.forward

    def recording(self: LanguageModel, tokens: torch.Tensor, state: tuple) -> tuple:
        if self.training:
            zero_at.append(all(not t.any() for layer in state for t in layer))
        return forward(self, tokens, state)

    monkeypatch.setattr(LanguageModel, "forward", recording)
    train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, device="cpu", quiet=True, tensorboard=False)
    assert len(zero_at) == 50  # 2 epochs of 25 windows
    assert [i for i, zero in enumerate(zero_at) if zero] == [0, 25]


def test_an_interrupt_before_the_first_validation_says_no_model_was_saved(tmp_path: Path) -> None:
    from rnnlm.reports import train_summary

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    r = train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, device="cpu", quiet=True,
              on_step=interrupt, tensorboard=False)
    data, text = train_summary(r, dry_run=False)
    assert r.interrupted_by == signal.SIGINT and not (tmp_path / "model.safetensors").exists()
    assert data["model_saved"] is False and data["resume_state_saved"] is True
    assert "before the first validation: no model saved" in text and "continue with --resume" in text
    assert "best valid ppl" not in text and "checkpoint in" not in text
    resumed = train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, device="cpu", quiet=True,
                    resume=True, max_steps=4, tensorboard=False)
    data, text = train_summary(resumed, dry_run=False)
    assert data["model_saved"] is True and text.startswith("best valid ppl ") and f"checkpoint in {tmp_path}" in text


def test_log_lines_are_whole_when_stderr_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("a-long-directory-name-" * 4)  # the resume line alone is over 80 columns
    train(cell="lstm", corpus=tiny_corpus(), out=out, overrides=TINY, device="cpu", max_steps=2, tensorboard=False)
    train(cell="lstm", corpus=tiny_corpus(), out=out, overrides=TINY, device="cpu", max_steps=4, resume=True,
          tensorboard=False)
    lines = capsys.readouterr().err.splitlines()
    summaries = [line for line in lines if "valid ppl" in line]
    assert len(summaries) == 2 and all(line.rstrip().endswith("s") and "tok/s" in line for line in summaries), lines
    resumed = [line for line in lines if line.startswith("resuming")]
    assert len(resumed) == 1 and len(resumed[0]) > 80 and "step 2" in resumed[0], lines


def test_resume_of_a_run_from_before_the_loss_key(tmp_path: Path) -> None:
    """A train_config.json written before `loss` existed meant the token mean: it resumes as that,
    and a changed convention is refused by name."""
    train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, device="cpu", quiet=True, max_steps=2,
          tensorboard=False)
    path = tmp_path / TRAIN_CONFIG
    old = json.loads(path.read_text())
    del old["loss"]
    path.write_text(json.dumps(old))
    with pytest.raises(RnnlmError, match="loss: token_mean -> time_sum"):
        train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=[*TINY, "loss=time_sum"], device="cpu",
              quiet=True, resume=True, max_steps=3, tensorboard=False)
    r = train(cell="lstm", corpus=tiny_corpus(), out=tmp_path, overrides=TINY, device="cpu", quiet=True, resume=True,
              max_steps=3, tensorboard=False)
    assert r.steps == 3
