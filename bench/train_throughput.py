"""Training throughput on this machine, side by side in one run: tokens/s of a full training step
(forward, backward, clip, Adam) for each cell's default preset, eager and torch.compile'd, and
torch.nn.LSTM (cuDNN/oneDNN fused) at the same size as the reference for the own LSTM cell.

    python bench/train_throughput.py [--device cpu|cuda] [--steps 6] [--no-compile]

Prints a table and the ratios the training issue sets goals for:
  own LSTM time per batch / nn.LSTM time per batch      (goal <= 1.25)
  eager time / compiled time, RHN and HyperLSTM        (goal >= 1.5)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm.config import PRESETS
from rnnlm.model import LanguageModel, detach_state


class HeadOnly(nn.Module):
    """Embedding -> decoder -> loss with no recurrence: the part of a step no cell speed-up touches."""

    def __init__(self, vocab: int, size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, size)
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        return self.decoder(self.embedding(x)), state


class TorchLSTMModel(nn.Module):
    """The same embedding/decoder around torch.nn.LSTM: the reference for the own LSTM cell."""

    def __init__(self, vocab: int, size: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, size)
        self.lstm = nn.LSTM(size, size, layers)
        self.decoder = nn.Linear(size, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        out, state = self.lstm(self.embedding(x), state)
        return self.decoder(out), state


def time_steps(model: nn.Module, state, batch: int, bptt: int, vocab: int, steps: int, device: str, warmup: int) -> float:
    """Seconds per training step (median of ``steps`` after ``warmup``)."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (bptt, batch), generator=g).to(device)
    y = torch.randint(0, vocab, (bptt, batch), generator=g).to(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits, state = model(x, state)
        state = detach_state(state) if isinstance(state, tuple) and hasattr(state[0], "_fields") else tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in ("lstm-small", "rhn-small", "hypernets-small"):
        p = PRESETS[name]
        B, T, V = p.train.batch_size, p.train.bptt, p.model.vocab_size
        model = LanguageModel(p.model).to(args.device).train()
        eager = time_steps(model, model.init_state(B, args.device), B, T, V, args.steps, args.device, warmup=2)
        row = {"preset": name, "batch": B, "bptt": T, "eager_s": eager, "eager_tok_s": B * T / eager}
        if not args.no_compile:
            compiled_model = LanguageModel(p.model).to(args.device).train()
            for layer in compiled_model.layers:  # the per-step function: one graph reused at every step
                layer.step = torch.compile(layer.step, dynamic=False)
            t0 = time.perf_counter()
            compiled = time_steps(compiled_model, compiled_model.init_state(B, args.device), B, T, V, args.steps,
                                  args.device, warmup=2)
            row.update(compiled_s=compiled, compiled_tok_s=B * T / compiled, compile_and_warmup_s=time.perf_counter() - t0
                       - compiled * args.steps, eager_over_compiled=eager / compiled)
        head = HeadOnly(V, p.model.hidden_size).to(args.device).train()
        head_s = time_steps(head, (torch.zeros(1),), B, T, V, args.steps, args.device, warmup=2)
        # The recurrence's share bounds what compiling the cell can give (Amdahl).
        row.update(head_only_s=head_s, recurrence_share=1 - head_s / eager, max_speedup_if_cell_free=eager / head_s)
        if p.model.cell == "lstm":
            ref = TorchLSTMModel(V, p.model.hidden_size, p.model.num_layers).to(args.device).train()
            zeros = (torch.zeros(p.model.num_layers, B, p.model.hidden_size, device=args.device),) * 2
            ref_s = time_steps(ref, zeros, B, T, V, args.steps, args.device, warmup=2)
            row.update(nn_lstm_s=ref_s, nn_lstm_tok_s=B * T / ref_s, own_over_nn_lstm=eager / ref_s)
        rows.append(row)
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}")
    for r in rows:
        if "own_over_nn_lstm" in r:
            print(f"own LSTM / nn.LSTM time per batch: {r['own_over_nn_lstm']:.2f}x  (goal <= 1.25)")
        if "eager_over_compiled" in r and r["preset"] != "lstm-small":
            print(f"{r['preset']}: compiled is {r['eager_over_compiled']:.2f}x eager speed  (goal >= 1.5); the recurrence "
                  f"is {r['recurrence_share']:.0%} of a step, so even a free cell would be {r['max_speedup_if_cell_free']:.2f}x")


if __name__ == "__main__":
    main()
