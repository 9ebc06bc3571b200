"""Learning curves: train and validation perplexity against tokens seen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnlm.fsutil import atomic_write_with


def plot_curves(metrics: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    key = "bpc" if any("valid_bpc" in m for m in metrics) else "ppl"
    for split, style in (("train", "-o"), ("valid", "-s")):
        pts = [(m["tokens_seen"], m[f"{split}_{key}"]) for m in metrics if m.get(f"{split}_{key}") is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, label=split, markersize=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("perplexity" if key == "ppl" else "bits per character")
    if key == "ppl":
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
