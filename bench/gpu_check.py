"""The GPU check: one script, one table, at most 8 minutes on one GPU.

    python bench/gpu_check.py [--data-dir ../shared/data/ptb] [--bundle DIR] [--budget 480]

Rows (each CUDA row compared with the CPU where it says so):
  1. training throughput on CUDA, 200 steps of `rnnlm train --preset rhn-paper` and `--preset lstm-medium`
     (the real command line), tokens/s from metrics.jsonl;
  2. the first training steps' losses on CUDA against the CPU, same seed, dropout 0, plain SGD on the
     preset's model (TF32 off), to a relative tolerance of LOSS_TOL;
  3. `rnnlm score` of PTB valid with onnxruntime's CUDA provider against the CPU provider (relative ppl difference);
  4. greedy generation with the state on the device (IOBinding) against the CPU: identical tokens;
  5. CUDA step latency at batch 1 and scoring throughput (PTB valid, tokens/s);
  6. a one-GPU NCCL torchrun step (`torchrun --nproc-per-node 1 -m rnnlm train --device cuda --max-steps 2`).

Without a GPU it is a dry run: the CPU halves run (small), and every CUDA row says why it was skipped.
The bundle is --bundle, or the default LSTM preset's initial weights exported to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOL = 1e-3  # relative: float32 kernels on two devices, TF32 off, over a few SGD steps
SCORE_TOL = 1e-4  # relative ppl, CUDA provider vs CPU provider
NO_DROPOUT = ["dropout_emb=0", "dropout_input=0", "dropout_recurrent=0", "dropout_output=0", "recurrent_dropout=0"]
ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)


def row(check: str, result: str, verdict: str) -> None:
    ROWS.append((check, result, verdict))
    print(f"  {check}: {result} [{verdict}]", flush=True)


def cuda_reason() -> str | None:
    """Why the CUDA rows cannot run here, or None when they can."""
    import torch

    if not torch.cuda.is_available():
        return f"skipped: torch {torch.__version__} sees no CUDA device"
    return None


def ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"skipped: onnxruntime {ort.__version__} has no CUDAExecutionProvider"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its refusal is the answer here, not log lines
    try:
        sess = ort.InferenceSession(_tiny_model(), opts, providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        return f"skipped: the CUDA provider does not start ({str(e).splitlines()[0][:120]})"
    if "CUDAExecutionProvider" not in sess.get_providers():  # onnxruntime falls back to the CPU silently
        return (f"skipped: onnxruntime {ort.__version__} lists a CUDA provider, but it does not start here "
                "(no GPU or no CUDA libraries: it fell back to the CPU)")
    return None


def _tiny_model() -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def train_throughput(preset: str, steps: int, data_dir: str, reason: str | None) -> None:
    if reason:
        row(f"train {preset}, CUDA, {steps} steps", reason, "skip")
        return
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "rnnlm", "train", "--preset", preset, "--device", "cuda", "--max-steps", str(steps),
               "--data-dir", data_dir, "--out", out]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            row(f"train {preset}, CUDA, {steps} steps", f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}", "FAIL")
            return
        last = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])
        row(f"train {preset}, CUDA, {steps} steps", f"{last['tokens_per_s']:,.0f} tok/s, train ppl {last['train_ppl']:.1f}, "
            f"wall {time.monotonic() - t0:.0f} s", "ok")


def first_losses(preset: str, device: str, steps: int, data_dir: str) -> list[float]:
    """Losses of the first SGD steps of the preset's model, dropout 0, seed 0, on ``device``."""
    import torch
    import torch.nn.functional as F

    from rnnlm.config import PRESETS, apply_overrides
    from rnnlm.data import batchify, load_ptb
    from rnnlm.model import LanguageModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    p = PRESETS[preset]
    cfg, tcfg = apply_overrides(p.model, p.train, NO_DROPOUT)
    torch.manual_seed(0)
    model = LanguageModel(cfg).to(device)
    data = batchify(load_ptb(data_dir, download=False).train[: 20 * 35 * 8 + 1], 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state, out = model.init_state(8, device), []
    for s in range(steps):
        x = torch.from_numpy(data[s * 35 : (s + 1) * 35]).long().to(device)
        y = torch.from_numpy(data[s * 35 + 1 : (s + 1) * 35 + 1]).long().to(device)
        logits, state = model(x, state)
        state = tuple(type(t)(*(v.detach() for v in t)) for t in state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


def losses_row(preset: str, steps: int, data_dir: str, reason: str | None) -> None:
    cpu = first_losses(preset, "cpu", steps, data_dir)
    if reason:
        row(f"first {steps} losses {preset}, CUDA vs CPU", f"CPU {', '.join(f'{v:.4f}' for v in cpu)}; CUDA {reason}", "skip")
        return
    gpu = first_losses(preset, "cuda", steps, data_dir)
    worst = max(abs(a / b - 1) for a, b in zip(gpu, cpu, strict=True))
    row(f"first {steps} losses {preset}, CUDA vs CPU", f"max relative difference {worst:.1e} (tolerance {LOSS_TOL:g})",
        "ok" if worst <= LOSS_TOL else "FAIL")


def score_file(bundle: Path, file: Path, device: str) -> tuple[float, float]:
    """(ppl, seconds) of `rnnlm score FILE` on ``device``, the real command line."""
    exe = Path(sys.executable).with_name("rnnlm")
    t0 = time.monotonic()
    proc = subprocess.run([str(exe), "score", str(file), "--model", str(bundle), "--device", device, "--json"],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-300:])
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ppl"]), time.monotonic() - t0


def serving_rows(bundle: Path, data_dir: str, reason: str | None, dry: bool) -> None:
    from rnnlm.serve import LanguageModel

    valid = Path(data_dir) / "ptb.valid.txt"
    if dry:  # a dry run scores a slice, to exercise the path quickly
        tmp = Path(tempfile.mkdtemp()) / "valid-head.txt"
        tmp.write_text("\n".join(valid.read_text().splitlines()[:300]) + "\n")
        valid = tmp
    ppl_cpu, t_cpu = score_file(bundle, valid, "cpu")
    prompt = "the stock market"
    cpu_lm = LanguageModel.load(bundle, device="cpu")
    greedy_cpu = cpu_lm.generate(prompt, max_new_tokens=40, temperature=0.0)
    if reason:
        row("rnnlm score PTB valid, CUDA vs CPU provider", f"CPU ppl {ppl_cpu:.4f} in {t_cpu:.1f} s; CUDA {reason}", "skip")
        row("greedy generation, IOBinding on CUDA vs CPU", f"CPU: {greedy_cpu[0][:60]!r}...; CUDA {reason}", "skip")
        row("CUDA step latency, scoring throughput", reason, "skip")
        return
    ppl_gpu, t_gpu = score_file(bundle, valid, "cuda")
    rel = abs(ppl_gpu / ppl_cpu - 1)
    row("rnnlm score PTB valid, CUDA vs CPU provider", f"ppl {ppl_gpu:.4f} vs {ppl_cpu:.4f}: {rel:.1e} relative "
        f"(tolerance {SCORE_TOL:g}); {t_gpu:.1f} s vs {t_cpu:.1f} s", "ok" if rel <= SCORE_TOL else "FAIL")
    gpu_lm = LanguageModel.load(bundle, device="cuda")
    greedy_gpu = gpu_lm.generate(prompt, max_new_tokens=40, temperature=0.0)
    row("greedy generation, IOBinding on CUDA vs CPU", "identical 40 tokens" if greedy_gpu == greedy_cpu
        else f"differ: {greedy_gpu[0][:40]!r} vs {greedy_cpu[0][:40]!r}", "ok" if greedy_gpu == greedy_cpu else "FAIL")
    row("CUDA step latency, scoring throughput", _cuda_speed(gpu_lm), "ok")


def _cuda_speed(lm: Any) -> str:
    import numpy as np

    state, tid = lm.initial_state(1), np.array([lm.eos_id])
    for _ in range(20):
        _, state = lm.step_ids(state, tid)
    t0 = time.perf_counter()
    for _ in range(200):
        _, state = lm.step_ids(state, tid)
    step = (time.perf_counter() - t0) / 200
    ids = np.random.default_rng(0).integers(0, len(lm.vocab), 20_000)
    t0 = time.perf_counter()
    lm.sequence_logprobs([ids[i : i + 25].tolist() for i in range(0, len(ids), 25)], batch_size=256)
    return f"step {step * 1e6:.0f} us at batch 1; per-line scoring {len(ids) / (time.perf_counter() - t0):,.0f} tok/s (batch 256)"


def nccl_row(data_dir: str, reason: str | None) -> None:
    if reason:
        row("one-GPU NCCL torchrun step", reason, "skip")
        return
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "rnnlm", "train", "--cell", "lstm",
               "--device", "cuda", "--max-steps", "2", "--data-dir", data_dir, "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        ok = proc.returncode == 0 and (Path(out) / "metrics.jsonl").exists()
        row("one-GPU NCCL torchrun step", "2 steps, exit 0" if ok else f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}",
            "ok" if ok else "FAIL")


def default_bundle(tmp: Path, data_dir: str) -> Path:
    import torch
    from rnnlm.export import export_bundle

    from rnnlm.checkpoint import save_model_dir
    from rnnlm.config import PRESETS, default_preset
    from rnnlm.data import load_ptb
    from rnnlm.model import LanguageModel

    torch.manual_seed(0)
    save_model_dir(tmp / "lstm", LanguageModel(PRESETS[default_preset("lstm")].model), load_ptb(data_dir, download=False).vocab)
    export_bundle(tmp / "lstm", out=tmp / "lstm" / "onnx", data_dir=tmp / "no-data")
    return tmp / "lstm" / "onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("RNNLM_DATA_DIR", str(ROOT.parent / "shared/data/ptb")))
    ap.add_argument("--bundle", type=Path, help="a bundle to score and generate with (default: the LSTM preset, untrained)")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    t0 = time.monotonic()
    reason, ort_reason = cuda_reason(), ort_cuda_reason()
    dry = reason is not None
    print(f"GPU check ({'dry run on CPU: ' + reason if dry else 'CUDA'}; onnxruntime CUDA: {ort_reason or 'available'})",
          flush=True)
    checks: list[Callable[[], None]] = [
        lambda: train_throughput("rhn-paper", args.steps, args.data_dir, reason),
        lambda: train_throughput("lstm-medium", args.steps, args.data_dir, reason),
        lambda: losses_row("rhn-paper", 2 if dry else 5, args.data_dir, reason),
        lambda: losses_row("lstm-medium", 2 if dry else 5, args.data_dir, reason),
    ]
    for check in checks:
        check()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or default_bundle(Path(tmp), args.data_dir)
        serving_rows(bundle, args.data_dir, ort_reason, dry)
    nccl_row(args.data_dir, reason)
    print("\n| check | result | verdict |\n|---|---|---|")
    for check, result, verdict in ROWS:
        print(f"| {check} | {result} | {verdict} |")
    print(f"\n{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
