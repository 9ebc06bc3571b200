"""N-best rescoring: speed of the batched rescorer against a serial per-hypothesis loop, and how
well each cell picks the original sentence out of an n-best list of controlled corruptions.

    python bench/rescore.py --model BUNDLE [--model BUNDLE ...] [--sentences 300] [--nbest 10] [--threads 2]

The n-best list: for each of the first --sentences PTB test sentences (3 words or more), the
sentence itself and nbest-1 corruptions of it, in equal shares of three kinds: one word
substituted by a random vocabulary word, two adjacent (different) words swapped, one word dropped.
The hypotheses of an utterance are shuffled, so that no tie-break favours the original.

For each bundle it prints:
  1. hypotheses/s of ``Rescorer.run`` (every hypothesis of many utterances per call of the
     scoring graph) at several --batch-size values, and of a serial loop that scores one
     hypothesis per call (``lm.score_lines([text])``), in interleaved rounds, the best round of
     each: hypotheses per second of wall time and per CPU-second of this process, and the ratios
     (goal >= 5x the serial loop and >= 2,000 hypotheses/s);
  2. ``rnnlm rescore`` end to end (a Kaldi n-best file, process start to exit), hypotheses/s;
  3. how often the original ranks first by the rnnlm cost alone, per kind of corruption how often
     the original beats a corrupted hypothesis of that kind, and how often it ranks first among
     the hypotheses as long as itself (what a large word bonus leaves).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from rnnlm.serve import LanguageModel
from rnnlm.serve.nbest import Hypothesis, Utterance
from rnnlm.serve.rescore import Rescorer, ScoredUtterance, Weights

KINDS = ("substitute", "swap", "drop")


def corrupt(words: list[str], kind: str, rng: random.Random, vocab: list[str]) -> list[str]:
    """One controlled corruption of a sentence."""
    w = list(words)
    if kind == "substitute":
        i = rng.randrange(len(w))
        w[i] = rng.choice([v for v in (rng.choice(vocab) for _ in range(4)) if v != w[i]] or ["the"])
    elif kind == "swap":
        pairs = [i for i in range(len(w) - 1) if w[i] != w[i + 1]]
        if pairs:
            i = rng.choice(pairs)
            w[i], w[i + 1] = w[i + 1], w[i]
    else:
        del w[rng.randrange(len(w))]
    return w


def build_nbest(sentences: list[list[str]], n: int, rng: random.Random,
                vocab: list[str]) -> tuple[list[Utterance], dict[str, str]]:
    """The n-best list, and the kind of every hypothesis key ("original" or a corruption)."""
    utts, kinds = [], {}
    for u, words in enumerate(sentences):
        hyps: list[tuple[str, list[str]]] = [("original", words)]
        seen = {tuple(words)}
        attempts = 0
        while len(hyps) < n and attempts < 50 * n:
            kind = KINDS[(len(hyps) - 1) % len(KINDS)]
            attempts += 1
            c = corrupt(words, kind, rng, vocab)
            if tuple(c) not in seen:
                seen.add(tuple(c))
                hyps.append((kind, c))
        rng.shuffle(hyps)
        utt = Utterance(f"ptb{u:05d}", [], "bench")
        for k, (kind, w) in enumerate(hyps, 1):
            utt.hyps.append(Hypothesis(f"{utt.id}-{k}", w, "bench"))
            kinds[f"{utt.id}-{k}"] = kind
        utts.append(utt)
    return utts, kinds


def accuracy(scored: list[ScoredUtterance], kinds: dict[str, str]) -> dict[str, float]:
    """The share of utterances whose original ranks first, and per kind the share of corrupted
    hypotheses the original beats (a lower cost)."""
    first = 0
    beaten = {k: [0, 0] for k in KINDS}
    for u in scored:
        original = next(s for s in u.hyps if kinds[s.hyp.key] == "original")
        first += int(kinds[u.best_hyp.hyp.key] == "original")
        for s in u.hyps:
            kind = kinds[s.hyp.key]
            if kind != "original":
                beaten[kind][0] += int(original.cost < s.cost)
                beaten[kind][1] += 1
    return {"original first": first / len(scored), **{k: b / max(n, 1) for k, (b, n) in beaten.items()}}


@dataclass
class Rate:
    """Hypotheses per second of wall time and per second of this process' CPU time (all threads),
    the best of the rounds: on a machine shared with other jobs, wall time varies from one
    moment to the next, while CPU time measures the work itself."""

    wall: float = 0.0
    cpu: float = 0.0

    def measure(self, fn: Callable[[], object], count: int) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.wall = max(self.wall, count / (time.perf_counter() - w0))
        self.cpu = max(self.cpu, count / max(time.process_time() - c0, 1e-9))

    def vs(self, other: Rate) -> str:
        return (f"{self.wall:,.0f} hypotheses/s wall ({self.wall / other.wall:.1f}x), "
                f"{self.cpu:,.0f} per CPU-second ({self.cpu / other.cpu:.1f}x)")


def cli_end_to_end(model: Path, utts: list[Utterance], threads: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "nbest.txt"
        f.write_text("".join(f"{h.key} {h.text}\n" for u in utts for h in u.hyps), encoding="utf-8")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rnnlm", "rescore", str(f), "--model", str(model), "--threads",
                        str(threads), "--device", "cpu"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return sum(len(u.hyps) for u in utts) / (time.perf_counter() - t0)


def bench_model(model: Path, sentences: list[list[str]], args: argparse.Namespace) -> None:
    lm = LanguageModel.load(model, device="cpu", threads=args.threads)
    utts, kinds = build_nbest(sentences, args.nbest, random.Random(args.seed), [v for v in lm.vocab if not v.startswith("<")])
    n_hyps = sum(len(u.hyps) for u in utts)
    tokens = sum(len(h.words) + 1 for u in utts for h in u.hyps)
    print(f"\n== {model}  ({lm.bundle.manifest.get('cell', '?')}): {len(utts)} utterances, "
          f"{n_hyps} hypotheses, {tokens / n_hyps:.1f} tokens per hypothesis")
    serial_utts = utts[: max(1, args.serial // args.nbest)]
    serial_n = sum(len(u.hyps) for u in serial_utts)
    serial, batched = Rate(), {bs: Rate() for bs in args.batch_sizes}
    scored: list[ScoredUtterance] = []
    for _ in range(args.rounds):  # interleaved, so that both sides see the same moments of a busy machine
        serial.measure(lambda: [lm.score_lines([h.text]) for u in serial_utts for h in u.hyps], serial_n)
        for bs, rate in batched.items():
            rescorer = Rescorer(lm, Weights(), batch_size=bs)
            rate.measure(lambda r=rescorer: scored.__setitem__(slice(None), list(r.run(utts))), n_hyps)
    print(f"serial loop, one hypothesis per call ({serial_n} hypotheses): {serial.wall:,.0f} hypotheses/s wall, "
          f"{serial.cpu:,.0f} per CPU-second")
    for bs, rate in batched.items():
        print(f"batched Rescorer.run, --batch-size {bs}: {rate.vs(serial)} the serial loop")
    print(f"rnnlm rescore end to end (process start to exit, default --batch-size): "
          f"{cli_end_to_end(model, utts, args.threads):,.0f} hypotheses/s")
    acc = accuracy(scored, kinds)
    print(f"rnnlm cost alone: original ranked first in {acc['original first']:.1%} of {len(utts)} utterances; "
          f"it beats a substituted word in {acc['substitute']:.1%}, a swap in {acc['swap']:.1%}, "
          f"a dropped word in {acc['drop']:.1%} of pairs")
    print(f"among the hypotheses as long as the original (a word penalty of -inf: no dropped word can win): "
          f"original ranked first in {same_length_first(scored, kinds):.1%}")


def same_length_first(scored: list[ScoredUtterance], kinds: dict[str, str]) -> float:
    """How often the original has the lowest cost among the hypotheses with its number of words.

    A sentence LM prefers fewer words, and a dropped word is the one corruption that shortens; a
    word bonus large enough to rule the dropped ones out leaves the substitutions and swaps."""
    first = 0
    for u in scored:
        original = next(s for s in u.hyps if kinds[s.hyp.key] == "original")
        rivals = [s for s in u.hyps if len(s.hyp.words) == len(original.hyp.words)]
        first += int(min(rivals, key=lambda s: s.cost) is original)
    return first / len(scored)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="Bundle directory (repeatable: one per cell).")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "data/ptb")) / "ptb.test.txt")
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--nbest", type=int, default=10)
    p.add_argument("--serial", type=int, default=500, help="Hypotheses timed in the serial loop.")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--rounds", type=int, default=3, help="Timing rounds; the best of each side is reported.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lines = [line.split() for line in args.data.read_text(encoding="utf-8").splitlines()]
    sentences = [w for w in lines if len(w) >= 3][: args.sentences]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
          f"{args.threads} threads; PTB test sentences: {len(sentences)}, mean {sum(map(len, sentences)) / len(sentences):.1f} words")
    for model in args.model:
        bench_model(model, sentences, args)


if __name__ == "__main__":
    main()
