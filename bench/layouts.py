"""Bundles side by side in the three uses a quantized bundle's layout is chosen on: exact scoring at
batch 1, lines scored 64 per call, and a prompt read through the advance graph. The same measurement
export makes (``export.quantized_bundle.time_variants``), on any bundles and at any length.

    python bench/layouts.py BUNDLE [BUNDLE ...] [--tokens 40000] [--lines 3000] [--rounds 5] [--threads 2]

The text is PTB test (``--data``). The bundles take turns within each round, so a slow minute on a
shared machine falls on each alike; each one's median over the rounds is printed, with its ratio to
the first bundle's and the geometric mean of the three speeds that export compares.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
from rnnlm.export.quantized_bundle import SPEEDS, time_variants
from rnnlm.serve import LanguageModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb")))
    ap.add_argument("--tokens", type=int, default=40_000, help="tokens scored at batch 1 and read as a prompt")
    ap.add_argument("--lines", type=int, default=3_000, help="lines scored 64 per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    lms = {str(b): LanguageModel.load(b, threads=args.threads) for b in args.bundles}
    first = next(iter(lms.values()))
    text = (args.data / "ptb.test.txt").read_text()
    ids = np.array([t.id for t in first.tokenizer.text_tokens(text)], np.int64)
    rows = time_variants(lms, ids, args.rounds, tokens=args.tokens, max_lines=args.lines)
    print(f"{args.threads} threads, {args.rounds} interleaved rounds (medians), tokens/s at batch 1 / on "
          f"{rows[0]['lines']:,} lines / in a prompt of {min(args.tokens, len(ids)):,} tokens:")
    base = rows[0]
    for r in rows:
        speeds = [r[f"{use}_tokens_per_s"] for use in SPEEDS]
        mean = math.exp(sum(math.log(v) for v in speeds if v) / len([v for v in speeds if v]))
        ratios = " / ".join(f"{v / base[f'{use}_tokens_per_s']:.2f}x" if v else "-" for use, v in zip(SPEEDS, speeds, strict=True))
        print(f"  {r['form']}: " + " / ".join(f"{v:,.0f}" if v else "-" for v in speeds)
              + f"; geometric mean {mean:,.0f}; vs the first: {ratios}")


if __name__ == "__main__":
    main()
