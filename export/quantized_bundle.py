"""Quantized bundles (``rnnlm export --quantize``): the form of each product and of each plain LSTM
layer's recurrence, chosen by measurement on this machine, and the checks a quantized bundle passes
before it is written.

1. Activation ranges: the float32 step graph is stepped over the perplexity text; each product's
   largest |input| fixes its int8 activation scale (``quantize.activation_ranges``).
2. The products' forms, each timed alone in every candidate form (``form_timing.plan``).
3. The layout: what a product's own timing cannot decide is decided by timing whole bundles. A
   plain LSTM layer runs either as a Scan over its step, whose recurrent product can be quantized,
   or as ONNX's LSTM operator: float32, but the whole loop in one onnxruntime kernel, without a
   node's overhead per step. A Scan's per-step product is ranked by the geometric mean of its times
   at one row and at BATCH_ROWS, which can pick a form (int8: QuantizeLinear + its product, two nodes)
   that a step at batch 1 pays for. Which is faster depends on the machine and its threads
   (bench/RESULTS.md, "Goals, session 8"), so in ``auto`` mode each such bundle is staged and timed
   on the perplexity text in the three uses a layout serves: exact scoring at batch 1, lines at
   BATCH_ROWS per call, and a prompt read through the advance graph; the one with the highest
   geometric mean of the three speeds is kept. ``int8`` mode quantizes every product, the
   recurrence's too, so it has one layout.
4. The check: each graph's perplexity against the float32 graphs' (``--max-ppl-rise``) and its
   log-probabilities against PyTorch. A graph that fails has its 4-bit products demoted to int8 and
   the bundle is rebuilt; when even that fails, export refuses.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from rnnlm.export import form_timing, quantize, recurrence
from rnnlm.export.graphs import state_layout
from rnnlm.export.tracing import GRAPH_FILES, GraphTracer, save_shared
from rnnlm.export.validate import Report, ValidationError, load_staged, validate

from rnnlm.errors import RnnlmError
from rnnlm.model import LanguageModel

if TYPE_CHECKING:
    from rnnlm.serve.runtime import LanguageModel as Runtime

MAX_PPL_RISE = 0.01  # the relative PTB-valid perplexity rise a quantized bundle may show (--max-ppl-rise)
# max |Δ log p| of a quantized bundle against float32 PyTorch, over the validation cases (random token
# sequences, far from text): int8 moves single log-probabilities by hundredths of a nat, 4-bit by tenths
# (0.42 for the trained LSTM's 4-bit step graph, whose PTB perplexity moves by 0.01 %); beyond a nat the
# graph is broken. Perplexity, on text, is the judge: see --max-ppl-rise.
QUANT_LOGPROB_TOLERANCE = 1.0
# The recurrent state, relative to max(1, |value|): quantized recurrent products move it by up to ~0.1 on
# small random models; the log-probabilities and the perplexity are what the bundle is judged on.
QUANT_STATE_TOLERANCE = 1.0
STEP_CHECK_TOKENS = 16_384  # of the perplexity text, run through the step graph (32 streams side by side)
# Timing a layout (a whole staged bundle): exact scoring of LAYOUT_TOKENS of the perplexity text at
# batch 1 and of its first LAYOUT_LINES lines, quantize.BATCH_ROWS per call, over LAYOUT_ROUNDS interleaved
# rounds (each layout's median counts): 0.5-0.7 s a round per layout on the 2-core machine. With 4,096
# tokens, 256 lines and 3 rounds, one LSTM layout's line speed moved by 1.2x from one export to the next.
LAYOUT_TOKENS = 8192
LAYOUT_LINES = 512
LAYOUT_ROUNDS = 5
SCAN, ONNX_LSTM = "scan", "onnx-lstm"
# A layout serves three uses, each timed and weighed alike: exact scoring at batch 1, lines scored in
# batches, and a prompt read (the advance graph). The LSTM operator reads prompts and exact text
# 1.1-1.3x faster than a Scan with int8 products and lines 0.9x as fast (bench/RESULTS.md, "Goals,
# session 9"): timing only the first two left its choice to the noise.
SPEEDS = ("batch1", "lines", "prompt")

Stage = Callable[[dict[str, Any]], Any]  # restage the manifest over the graphs in the staging directory


def score_ids(lm: Runtime, ids: np.ndarray) -> float:
    """Total NLL (nats) of a 1-D id stream at batch 1, predicted from <eos> + ids[:-1], through the runtime."""
    total, state, prev = 0.0, None, lm.eos_id
    for start in range(0, len(ids), 4096):
        block = np.asarray(ids[start : start + 4096], np.int64)
        inputs = np.concatenate([[prev], block[:-1]])
        picked, state = lm._score_ids(inputs[:, None], block[:, None], np.array([len(block)]), state)
        total -= float(picked.astype(np.float64).sum())
        prev = int(block[-1])
    return total


def step_nll(lm: Runtime, ids: np.ndarray, streams: int = 32) -> float:
    """Total NLL (nats) of ``ids`` through the step graph (generation's graph): cut into ``streams``
    sequences stepped side by side, each from a fresh state and predicted from <eos>."""
    n = len(ids) // streams
    cols = np.asarray(ids[: n * streams], np.int64).reshape(streams, n).T  # (n, streams)
    state, prev, total = lm.initial_state(streams), np.full(streams, lm.eos_id, np.int64), 0.0
    for t in range(n):
        logprobs, state = lm.step_ids(state, prev)
        total -= float(logprobs[np.arange(streams), cols[t]].astype(np.float64).sum())
        prev = cols[t]
    return total


def nlls(lm: Runtime, ids: np.ndarray) -> tuple[dict[str, float], float]:
    """NLL per token of ``ids`` through each graph (the step graph on the first STEP_CHECK_TOKENS), and
    the scoring graph's seconds."""
    t = time.perf_counter()
    score = score_ids(lm, ids) / len(ids)
    seconds = time.perf_counter() - t
    few = ids[:STEP_CHECK_TOKENS]
    return {"score": score, "step": step_nll(lm, few) / (len(few) // 32 * 32)}, seconds


def quantize_bundle(model: LanguageModel, tracer: GraphTracer, graphs: dict[str, onnx.ModelProto], tmp: Path,
                    stage: Stage, lm: Runtime, ids: np.ndarray, is_valid: bool, mode: str,
                    max_ppl_rise: float) -> tuple[dict[str, Any], Runtime, Report]:
    """Quantize the float32 ``graphs`` staged in ``tmp`` (their runtime: ``lm``) where it pays, check the
    result on ``ids`` and against PyTorch; returns the manifest's ``quantization``, the quantized
    bundle's runtime and its validation report. Raises RnnlmError when no form passes."""
    nll32, t32 = nlls(lm, ids)
    threads = lm.threads  # the runtime's own count: what the bundle will be timed and served at
    ranges = quantize.activation_ranges(graphs["step"], [(s.input, s.output) for s in state_layout(model)],
                                        ids[:STEP_CHECK_TOKENS], lm.eos_id)
    step_rows = _plan({"step": graphs["step"]}, mode, tracer.chunk, threads, ranges)
    variants, reason = _variants(model, tracer, graphs, mode, step_rows, threads, ranges)
    chosen, record = _choose_layout(variants, reason, ranges, tmp, stage, ids, threads)
    graphs, rows = chosen.graphs, chosen.rows
    lm, report, nllq, tq, attempts = _check(model, graphs, rows, ranges, tmp, stage, ids, nll32, max_ppl_rise)
    rises = {g: math.exp(nllq[g] - nll32[g]) - 1 for g in nllq}
    ppl32, pplq = math.exp(nll32["score"]), math.exp(nllq["score"])
    result = {"mode": mode, "method": "per product by measurement, once per call shape: fp32, int8 "
              "(MatMulIntegerToFloat, per-column weight scales, one activation scale per product calibrated at "
              "export: activation_range; products of one input merged; in the advance graph's steps the scales "
              "applied after the product), 4-bit "
              "(MatMulNBits; generation's step graph only), bf16 where onnxruntime has a kernel; then whole "
              "bundles timed where a product's timing alone cannot decide: a plain LSTM layer as a Scan or "
              "ONNX's LSTM operator, the recurrent products in their fastest form at batch 1 or by the "
              "geometric mean (layout)", "threads": threads,
              "layout": record, "products": rows, "attempts": attempts,
              "text": "PTB valid" if is_valid else "sampled from the model",
              "tokens": int(len(ids)), "fp32_ppl": ppl32, "ppl": pplq, "nll": nllq["score"] * len(ids),
              "ppl_rise": rises["score"], "step_graph_ppl_rise": rises["step"],
              "step_graph_tokens": len(ids[:STEP_CHECK_TOKENS]) // 32 * 32, "max_ppl_rise": max_ppl_rise,
              "scoring_speedup": t32 / tq,
              "validation": {"tolerance": QUANT_LOGPROB_TOLERANCE, "state_tolerance": QUANT_STATE_TOLERANCE,
                             "max_abs_logprob_diff": report.max_logprob_diff,
                             "max_abs_state_diff": report.max_state_diff}}
    return result, lm, report


def _plan(graphs: dict[str, onnx.ModelProto], mode: str, chunk: int, threads: int,
          ranges: dict[quantize.ContentKey, float]) -> list[dict[str, Any]]:
    """``form_timing.plan``'s rows for ``graphs``, each with its calibrated activation range; in ``int8``
    mode every product int8, as asked (the measurement is still recorded). The scoring graph's products
    take only ``quantize.ROW_EXACT_FORMS``, so that a sentence scores alike alone and in any batch."""
    auto = "step" in graphs and mode == "auto"
    rows = form_timing.plan(graphs, chunk, threads, None if auto else list(quantize.ROW_EXACT_FORMS))
    for r in rows:
        if mode == "int8":
            r["chosen"] = "int8"
        r["activation_range"] = ranges.get(quantize.content_key(quantize.weights(graphs[r["graph"]])[r["weight"]]))
    return rows


@dataclass
class Variant:
    """One way to write the quantized bundle: its graphs and every product's form."""

    name: str
    recurrence: str  # SCAN or ONNX_LSTM, for plain LSTM layers
    per_step: str  # the Scan's per-step products: "plan" (form_timing.choose) or "batch-1" (fastest at one row)
    graphs: dict[str, onnx.ModelProto]
    rows: list[dict[str, Any]]

    def describe(self) -> dict[str, str]:
        return {"form": self.name, "recurrence": self.recurrence, "per_step_forms": self.per_step}


def _variants(model: LanguageModel, tracer: GraphTracer, graphs: dict[str, onnx.ModelProto], mode: str,
              step_rows: list[dict[str, Any]], threads: int,
              ranges: dict[quantize.ContentKey, float]) -> tuple[list[Variant], str]:
    """The bundles worth timing whole, the per-product plan's first, and why there is only one where
    there is. A per-step product of the scoring graph is timed alone at one row and at BATCH_ROWS and
    ranked by the geometric mean: where its fastest form at one row differs, a bundle with that form
    is timed too (a Scan step's extra node, an int8 product's QuantizeLinear, shows in the whole graph
    at batch 1, not in the product's own timing). A plain LSTM layer can also be ONNX's LSTM operator."""
    plan = step_rows + _plan({"score": graphs["score"]}, mode, tracer.chunk, threads, ranges)
    out = [Variant(SCAN, SCAN, "plan", graphs, plan)]
    if mode != "auto":
        return out, "--quantize int8 quantizes every product, the recurrent ones too: one layout"
    batch1 = _batch1_forms(plan)
    if batch1 is not None:
        out.append(Variant(f"{SCAN}, batch-1 forms", SCAN, "batch-1", graphs, batch1))
    if any(recurrence.fits_onnx_lstm(cell) for cell in model.layers):
        with tempfile.TemporaryDirectory() as d:
            fused = {**graphs, **tracer.trace_all(Path(d), fuse_lstm=True, keys=tuple(k for k in graphs if k != "step"))}
        out.append(Variant(ONNX_LSTM, ONNX_LSTM, "plan", fused,
                           step_rows + _plan({"score": fused["score"]}, mode, tracer.chunk, threads, ranges)))
    return out, "" if len(out) > 1 else "no plain LSTM layer and every per-step product's form the fastest at batch 1"


def _batch1_forms(plan: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``plan`` with each per-step product of the scoring graph in its fastest form at one row (where that
    beats fp32 by form_timing.MIN_GAIN), or None where that changes nothing."""
    rows, changed = copy.deepcopy(plan), False
    for r in rows:
        if r["graph"] != "score" or "batch_candidates" not in r:
            continue
        timed = [c for c in r["candidates"] if c.get("relative") is not None]
        fastest = min(timed, key=lambda c: c["relative"])
        form = fastest["form"] if fastest["relative"] * form_timing.MIN_GAIN <= 1.0 else "fp32"
        if form != r["chosen"]:
            r["chosen"], r["chosen_for"], changed = form, "batch 1", True
    return rows if changed else None


def _choose_layout(variants: list[Variant], reason: str, ranges: dict[quantize.ContentKey, float], tmp: Path,
                   stage: Stage, ids: np.ndarray, threads: int) -> tuple[Variant, dict[str, Any]]:
    """The layout to keep and the manifest's record of it: with one candidate, that one and why; else
    each staged in ``tmp`` and timed (``time_variants``), the highest geometric mean of its speeds kept."""
    if len(variants) == 1:
        return variants[0], {**variants[0].describe(), "chosen": variants[0].name, "candidates": [], "reason": reason}
    staged = {v.name: stage_quantized(v.graphs, v.rows, ranges, tmp, stage) for v in variants}
    candidates = [{**c, **v.describe()} for v, c in zip(variants, time_variants(staged, ids), strict=True)]
    best = max(range(len(variants)), key=lambda i: _merit(candidates[i]))
    return variants[best], {**variants[best].describe(), "chosen": variants[best].name, "threads": threads,
                            "candidates": candidates, "rule": "the highest geometric mean of tokens/s: exact scoring at "
                            f"batch 1, lines at {quantize.BATCH_ROWS} per call, and a prompt read"}


def _lines(ids: np.ndarray, eos_id: int, n: int) -> list[list[int]]:
    """The first ``n`` lines of an id stream, each with its <eos>."""
    cuts = np.flatnonzero(np.asarray(ids) == eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [[int(t) for t in ids[s : e + 1]] for s, e in zip(starts[:n], cuts[:n], strict=False) if e >= s]


def time_variants(lms: dict[str, Runtime], ids: np.ndarray, rounds: int = LAYOUT_ROUNDS, *,
                  tokens: int = LAYOUT_TOKENS, max_lines: int = LAYOUT_LINES) -> list[dict[str, Any]]:
    """Tokens/s of each bundle, interleaved over ``rounds`` (each bundle's median counts), in the three
    uses its layout serves: exact scoring of the first ``tokens`` of ``ids`` at batch 1, its first
    ``max_lines`` lines scored ``quantize.BATCH_ROWS`` per call (both the scoring graph), and the same
    ``tokens`` read as a prompt (the advance graph, where the bundle has one). bench/layouts.py runs
    it on any bundles."""
    first = next(iter(lms.values()))
    stream, lines = ids[:tokens], _lines(ids, first.eos_id, max_lines)
    prompt = [int(t) for t in stream] if first.advance_chunk and len(stream) >= first.advance_chunk else []
    line_tokens = sum(len(line) for line in lines)
    uses: dict[str, tuple[int, Callable[[Runtime], Any]]] = {
        "batch1": (len(stream), lambda lm: score_ids(lm, stream)),
        "lines": (line_tokens, lambda lm: lm.sequence_logprobs(lines, batch_size=quantize.BATCH_ROWS)),
        "prompt": (len(prompt), lambda lm: lm.advance(lm.context(), prompt)),
    }
    uses = {k: u for k, u in uses.items() if u[0]}
    seconds: dict[str, dict[str, list[float]]] = {k: {use: [] for use in uses} for k in lms}
    for _ in range(rounds):
        for name, lm in lms.items():
            for use, (_, run) in uses.items():
                t = time.perf_counter()
                run(lm)
                seconds[name][use].append(time.perf_counter() - t)
    return [{"form": name, **{f"{use}_tokens_per_s": (uses[use][0] / statistics.median(s[use]) if use in uses else None)
                              for use in SPEEDS}, "lines": len(lines)} for name, s in seconds.items()]


def _merit(candidate: dict[str, Any]) -> float:
    """The geometric mean of a bundle's speeds in the uses timed (``time_variants``)."""
    speeds = [v for v in (candidate[f"{use}_tokens_per_s"] for use in SPEEDS) if v]
    return math.exp(sum(math.log(v) for v in speeds) / len(speeds))


def _check(model: LanguageModel, graphs: dict[str, onnx.ModelProto], rows: list[dict[str, Any]],
           ranges: dict[quantize.ContentKey, float], tmp: Path, stage: Stage, ids: np.ndarray,
           nll32: dict[str, float], max_ppl_rise: float) -> tuple[Runtime, Report, dict[str, float], float,
                                                                  list[dict[str, Any]]]:
    """Stage ``graphs`` with ``rows``' forms and check them, demoting 4-bit products to int8 in a graph
    that fails until every graph passes; returns the runtime, its report, each graph's NLL per token,
    the scoring seconds and every attempt. Raises when no form passes."""
    attempts: list[dict[str, Any]] = []
    while True:
        lm = stage_quantized(graphs, rows, ranges, tmp, stage)
        nllq, tq = nlls(lm, ids)
        rises = {g: math.exp(nllq[g] - nll32[g]) - 1 for g in nllq}
        try:
            report, problem = validate(model, lm, QUANT_LOGPROB_TOLERANCE, state_tol=QUANT_STATE_TOLERANCE,
                                       what="the quantized bundle"), None
        except ValidationError as e:
            report, problem = None, e
        failed = {g for g, r in rises.items() if r > max_ppl_rise}
        if problem is not None:
            failed |= {"step", "score"}
        attempts.append({"choices": sorted({r["chosen"] for r in rows}), "ppl_rise": rises,
                         "validation": "passed" if problem is None else problem.message})
        if not failed:
            assert report is not None
            return lm, report, nllq, tq, attempts
        if not any(quantize.demote(rows, "nbits4", "int8", graph=g) for g in sorted(failed)):
            g = max(rises, key=lambda k: rises[k])
            if rises[g] <= max_ppl_rise and problem is not None:
                raise problem
            raise RnnlmError(f"quantization raised the {g} graph's perplexity by {rises[g]:.2%} "
                             f"({math.exp(nll32[g]):.2f} -> {math.exp(nllq[g]):.2f}), over the --max-ppl-rise "
                             f"{max_ppl_rise:.2%}: no bundle written", code=1)


def stage_quantized(graphs: dict[str, onnx.ModelProto], rows: list[dict[str, Any]],
                    ranges: dict[quantize.ContentKey, float], tmp: Path, stage: Stage) -> Runtime:
    """Write the graphs with the products' chosen forms (int8 ones with their calibrated activation
    ``ranges``), restage the manifest, load it in the runtime. The advance graph is the scoring graph's
    recurrence: its products take the forms chosen for the scoring graph's products with the same
    weights, so that both reach the same state."""
    for key, graph in graphs.items():
        q = onnx.ModelProto()
        q.CopyFrom(graph)
        forms = quantize.forms_by_weights(graph, graphs["score"], [r for r in rows if r["graph"] == "score"]) \
            if key == "advance" else {r["weight"]: r["chosen"] for r in rows if r["graph"] == key}
        quantize.apply_forms(q, forms, ranges, one_row_steps=key == "advance")
        save_shared(q, tmp / GRAPH_FILES[key])
    stage({})
    try:
        return load_staged(tmp)
    except RnnlmError as e:
        raise RnnlmError(f"the quantized graphs do not load in onnxruntime: {e.message}", code=1) from None
