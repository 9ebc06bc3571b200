"""What the training-side commands report, for people and for machines (``--json``): ``rnnlm info``'s
account of the loss, ``rnnlm train``'s summary, ``rnnlm export``'s report. Kept apart from the
command definitions in rnnlm/cli.py, which stay thin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOSS_MEANING = {  # what `rnnlm info` says of TrainConfig.loss
    "token_mean": "each window trains on the mean NLL over its T x B tokens",
    "time_sum": "each window trains on the sum over its T steps of the batch-mean NLL (the paper's code)",
}


def train_summary(result: Any, dry_run: bool) -> tuple[dict[str, Any], str]:
    """What a training run kept, as JSON and as one line: the model only exists after a validation."""
    from rnnlm.checkpoint import TRAIN_STATE, WEIGHTS

    out: Path = result.out
    model_saved = not dry_run and (out / WEIGHTS).is_file()
    state_saved = not dry_run and (out / TRAIN_STATE).is_file()
    data = {"out": str(out), "epochs": result.epochs_done, "steps": result.steps,
            "best_valid_ppl": result.best_valid_ppl, "interrupted": result.interrupted_by is not None,
            "world_size": result.world_size, "model_saved": model_saved, "resume_state_saved": state_saved}
    procs = f" ({result.world_size} processes)" if result.world_size > 1 else ""
    if dry_run:
        return data, f"best valid ppl {result.best_valid_ppl:.2f} after {result.steps} steps (dry run: nothing kept){procs}"
    if model_saved:
        text = f"best valid ppl {result.best_valid_ppl:.2f} after {result.steps} steps; checkpoint in {out}"
        if result.interrupted_by is not None:
            text += "; interrupted: continue with --resume"
        return data, text + procs
    text = f"stopped at step {result.steps} before the first validation: no model saved (no {out / WEIGHTS})"
    if state_saved:
        text += f"; the resume state is in {out / TRAIN_STATE}: continue with --resume"
    return data, text + procs


def export_text(summary: dict[str, Any]) -> str:
    """``rnnlm export``'s report for people: where, how close to PyTorch, what quantization chose."""
    text = (f"wrote {summary['bundle']} in {summary['seconds']} s; validated against PyTorch: max |Δ log p| "
            f"{summary['max_abs_logprob_diff']:.1e}")
    if "valid_ppl" in summary:
        text += f"; PTB valid ppl {summary['valid_ppl']:.2f}"
    if "quantization" in summary:
        q = summary["quantization"]
        text += (f"\nquantized ({q['mode']}): ppl {q['fp32_ppl']:.2f} -> {q['ppl']:.2f} ({q['ppl_rise']:+.2%}, at most "
                 f"{q['max_ppl_rise']:.2%}), scoring {q['scoring_speedup']:.2f}x faster; max |Δ log p| vs PyTorch "
                 f"{q['validation']['max_abs_logprob_diff']:.1e}\nproducts: "
                 + ", ".join(f"{k} {v}" for k, v in q["choices"].items()))
        layout = q["layout"]
        timed = "; ".join(f"{c['form']} " + " / ".join(f"{c.get(f'{use}_tokens_per_s') or 0:,.0f}"
                                                      for use in ("batch1", "lines", "prompt"))
                          for c in layout["candidates"])
        text += f"\nlayout: {layout['chosen']} " + (f"(tokens/s at batch 1 / on lines / in a prompt: {timed})"
                                                    if timed else f"({layout['reason']})")
    if "triton" in summary:
        text += f"\nTriton model repository: {summary['triton']}"
    return text
