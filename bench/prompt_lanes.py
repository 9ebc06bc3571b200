"""Can a long prompt be read in parallel lanes? A measurement of one way, which this project does not
use: cut the prompt into K lanes, run all K through the advance graph as one batch from guessed
states, then again from each lane's left neighbour's end state, until the boundary states stop
changing (a Jacobi sweep). Lane 0 is exact after the first sweep, lane i after sweep i + 1 at the
latest; the method pays only if the recurrence forgets its start state fast enough that every
boundary settles in a few sweeps.

    python bench/prompt_lanes.py BUNDLE [--lanes 32] [--tokens 60000] [--sweeps 12]

Printed: the serial read's time (``LanguageModel.advance``), then per sweep its cumulative time, the
largest change of any boundary state since the sweep before, and the last lane's end state against
the serial one (max |difference|). It stops at a sweep that changes no boundary.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from rnnlm.serve import LanguageModel
from rnnlm.serve.values import State


def lanes(ids: list[int], first: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, K) inputs, each id read after the one before it (``first`` before the first), and each
    lane's length; the last lane is padded."""
    n = len(ids)
    width = -(-n // k)
    inputs = np.concatenate([[first], np.asarray(ids[:-1], np.int64)])
    padded = np.concatenate([inputs, np.full(k * width - n, first, np.int64)])
    lengths = np.array([width] * (k - 1) + [n - width * (k - 1)], np.int64)
    return padded.reshape(k, width).T.copy(), lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb")))
    ap.add_argument("--lanes", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--sweeps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    lm = LanguageModel.load(args.bundle, threads=args.threads)
    ids = [t.id for t in lm.tokenizer.text_tokens((args.data / "ptb.valid.txt").read_text())]
    ids = (ids * (args.tokens // len(ids) + 1))[: args.tokens]
    t = time.perf_counter()
    serial = lm.advance(lm.context(), ids).state.arrays
    print(f"{args.bundle}: {len(ids):,} tokens read serially in {time.perf_counter() - t:.2f} s; {args.lanes} lanes:")
    inputs, lengths = lanes(ids, lm.eos_id, args.lanes)
    initial = lm.initial_state(1).arrays
    start = {k: np.repeat(v, args.lanes, axis=0) for k, v in initial.items()}
    t = time.perf_counter()
    for sweep in range(1, args.sweeps + 1):
        end = lm._advance_ids(inputs, lengths, State({k: v.copy() for k, v in start.items()})).arrays
        change = max(float(np.abs(end[k][:-1] - start[k][1:]).max()) for k in end)
        last = max(float(np.abs(end[k][-1:] - serial[k]).max()) for k in end)
        print(f"  sweep {sweep}: {time.perf_counter() - t:.2f} s, largest boundary change {change:.3e}, "
              f"last lane vs serial {last:.3e}")
        if change == 0:
            break
        start = {k: np.concatenate([initial[k], end[k][:-1]]) for k in end}


if __name__ == "__main__":
    main()
