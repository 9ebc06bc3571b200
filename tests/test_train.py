"""Training: exact resume after a signal, atomic checkpoints under SIGKILL, refusals of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnlm.checkpoint import load_model_dir, save_model_dir
from rnnlm.data import Corpus, Vocabulary
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import evaluate
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
