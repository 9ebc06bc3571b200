"""The loss convention of the paper presets, before and after: `lstm-medium` on PTB for a fixed
wall-clock budget with ``loss=token_mean`` (what rnnlm did before issue 11) and ``loss=time_sum``
(what Zaremba et al.'s ptb_word_lm does, and what the preset's lr 1.0 and clip 5 are calibrated to).

    python bench/loss_convention.py run --loss token_mean --out /work/runs-train/token_mean &
    python bench/loss_convention.py run --loss time_sum   --out /work/runs-train/time_sum &
    python bench/loss_convention.py report /work/runs-train/token_mean /work/runs-train/time_sum \\
        --png bench/loss_convention.png

``run`` trains in chunks of ``--every`` optimizer steps, each call resuming the last exactly
(rnnlm's resume is bit-exact), so that every chunk ends in a validation: the curve gets a point
every ``--every`` steps instead of one per epoch. Both runs must get the same ``--set`` overrides
(the default shrinks the model to 2 x 200 so that a 30-minute CPU run sees more than an epoch);
they differ only in ``loss``. One torch thread each, so that two can run side by side.
``report`` prints both curves as a Markdown table and plots valid ppl against tokens seen.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

SHRINK = ["emb_size=200", "hidden_size=200"]


def run(args: argparse.Namespace) -> None:
    import torch

    from rnnlm.train import train

    torch.set_num_threads(1)
    out = Path(args.out)
    overrides = [*(args.set or SHRINK), f"loss={args.loss}"]
    start = time.monotonic()
    step, first = 0, True
    while True:
        left_min = args.minutes - (time.monotonic() - start) / 60
        if left_min <= 0.1:
            break
        r = train(preset="lstm-medium", data_dir=args.data_dir, out=out, overrides=overrides, device="cpu",
                  max_steps=step + args.every, time_budget=left_min, resume=not first, force=first,
                  tensorboard=False)
        first = False
        if r.steps == step or r.exit_code:  # the budget ran out before a step, or a signal
            break
        step = r.steps
    (out / "bench.json").write_text(json.dumps({"loss": args.loss, "overrides": overrides, "minutes": args.minutes,
                                                "every": args.every, "machine": platform.platform(),
                                                "wall_s": round(time.monotonic() - start, 1)}) + "\n")


def _rows(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]


def report(args: argparse.Namespace) -> None:
    runs = {Path(d).name: _rows(Path(d)) for d in args.dirs}
    for name, rows in runs.items():
        print(f"\n{name}:\n| step | epoch | tokens seen | train ppl | valid ppl |\n|---|---|---|---|---|")
        for m in rows:  # train ppl: over the steps since the previous validation
            print(f"| {m['step']} | {m['epoch']:.2f} | {m['tokens_seen']:,} | {m['train_ppl']:.1f} | "
                  f"{m['valid_ppl']:.1f} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for name, rows in runs.items():
            ax.plot([m["tokens_seen"] for m in rows], [m["valid_ppl"] for m in rows], "-o", markersize=3, label=name)
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel("valid perplexity")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="loss")
        ax.set_title("lstm-medium (2 x 200) on PTB: 30 min wall clock each, side by side")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"\nwrote {args.png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train lstm-medium with one loss convention for a wall-clock budget")
    r.add_argument("--loss", choices=("token_mean", "time_sum"), required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--minutes", type=float, default=30.0)
    r.add_argument("--every", type=int, default=250, help="validate every this many steps")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--set", action="append", help=f"override a config key (default: {' '.join(SHRINK)})")
    p = sub.add_parser("report", help="print both curves and plot them")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--png", default=None)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
