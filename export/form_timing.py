"""Timing the forms of each product and choosing one (``export.quantize`` holds the forms, the
calibration and the rewriting).

Each product is timed as a one-node graph with its own weights, at the row count it meets in its graph
at batch 1 (1 in the step graph and for per-step products; ``chunk`` for a product the scoring graph
hoists over a whole chunk), the scoring graph's per-step products also at BATCH_ROWS, in every
candidate form, the forms in turn round after round. The fastest (for a product timed at two row
counts: by the geometric mean of its two times relative to fp32) wins if it beats fp32 by
``MIN_GAIN``. Products that share a call (graph, shape, rows) are timed once and take one form.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from rnnlm.export.quantize import MS_DOMAIN, Product, candidate_forms, find_products, form_nodes, weights

MIN_GAIN = 1.10  # a quantized form must be at least this much faster than fp32 to be chosen
TIME_PER_CANDIDATE = 0.15  # seconds of timing per candidate and product, over ROUNDS interleaved rounds
ROUNDS = 7


def one_node_model(form: str, w: np.ndarray, act_range: float = 1.0) -> bytes:
    k, n = w.shape
    nodes, inits = form_nodes(form, "x", "y", "w", w, act_range=act_range)
    graph = helper.make_graph(nodes, "product", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["m", n])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def _session(form: str, w: np.ndarray, threads: int, act_range: float) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(one_node_model(form, w, act_range), opts, providers=["CPUExecutionProvider"])


def time_forms(forms: list[str], w: np.ndarray, rows: int, threads: int, budget: float = 1.0) -> list[dict[str, Any]]:
    """Seconds per call of y = x @ w in each form at ``rows`` rows (median of ROUNDS rounds), its time
    relative to the first form's in the same rounds, and its error against float64. The forms are timed
    in turn, round after round, so that a change in the machine's load falls on all of them alike, for
    ``budget`` x TIME_PER_CANDIDATE seconds each."""
    x = _probe(rows, w)
    out: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[Any, int, list[float]]] = {}
    for form in forms:
        try:
            sess = _session(form, w, threads, float(np.abs(x).max()))
            err = _rel_error(sess, x, w)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; the refusal is the measurement
            out[form] = {"form": form, "seconds": None, "unavailable": str(e).splitlines()[0][:160]}
            continue
        t = time.perf_counter()
        sess.run(None, {"x": x})
        calls = max(1, int(budget * TIME_PER_CANDIDATE / ROUNDS / max(time.perf_counter() - t, 1e-6)))
        live[form] = (sess, calls, [])
        out[form] = {"form": form, "seconds": None, "max_rel_error": err}
    for _ in range(ROUNDS):
        for sess, calls, times in live.values():
            t = time.perf_counter()
            for _ in range(calls):
                sess.run(None, {"x": x})
            times.append((time.perf_counter() - t) / calls)
    base = live[forms[0]][2] if forms[0] in live else None
    for form, (_, _, times) in live.items():
        out[form]["seconds"] = statistics.median(times)
        if base is not None:
            # Each round times every form back to back, so the load of that moment falls on all of them:
            # the median over rounds of the time relative to the first form (fp32) in the same round is
            # what ranks them (a load that changes between rounds cancels; min or median alone did not).
            out[form]["relative"] = statistics.median(t / b for t, b in zip(times, base, strict=True))
    return [out[f] for f in forms]


def _probe(rows: int, w: np.ndarray) -> np.ndarray:
    """The input every form of ``w`` is timed and checked on: ``rows`` standard normal rows."""
    return np.random.default_rng(0).standard_normal((rows, w.shape[0])).astype(np.float32)


def _rel_error(sess: Any, x: np.ndarray, w: np.ndarray) -> float:
    """The largest error of a form's one-node session on ``x``, relative to float64's largest output."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    y = sess.run(None, {"x": x})[0]
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def form_errors(forms: list[str], w: np.ndarray, rows: int, threads: int) -> dict[str, float]:
    """Each form's ``max_rel_error`` on ``w`` at ``rows`` rows, as ``time_forms`` records it, without the
    timing; a form onnxruntime refuses is left out."""
    x = _probe(rows, w)
    out = {}
    for form in forms:
        try:
            out[form] = _rel_error(_session(form, w, threads, float(np.abs(x).max())), x, w)
        except Exception:  # noqa: BLE001, S112 - refused: time_forms records why, for the product it timed
            continue
    return out


def time_form(form: str, w: np.ndarray, rows: int, threads: int) -> dict[str, Any]:
    """One form alone (see ``time_forms``)."""
    return time_forms([form], w, rows, threads)[0]


def _timings(forms: list[str], w: np.ndarray, rows: int, threads: int, budget: float) -> list[dict[str, Any]]:
    """``time_forms``, each form's time relative to fp32's filled in (a replaced ``time_form``, in tests, is honoured)."""
    timings = time_forms(forms, w, rows, threads, budget) if time_form is _time_form_default else \
        [time_form(f, w, rows, threads) for f in forms]
    fp32 = next(t["seconds"] for t in timings if t["form"] == "fp32")
    for t in timings:
        if t["seconds"] is not None:
            t.setdefault("relative", t["seconds"] / fp32)
    return timings


def choose(product: Product, w: np.ndarray, threads: int, forms: list[str] | None = None,
           budget: float = 1.0) -> dict[str, Any]:
    """Time every candidate form of one product (for ``budget`` x TIME_PER_CANDIDATE seconds each); the
    fastest that beats fp32 by MIN_GAIN, else fp32.

    A product that meets two row counts (``batch_rows``: the scoring graph's per-step products, one row at
    batch 1 and BATCH_ROWS in per-line scoring) is timed at both, and ranked by the geometric mean of its
    two times relative to fp32: 4-bit with int8 compute is the fastest form at one row and the slowest at
    64, int8 close to it at one and 2-3x fp32 at 64 (bench/RESULTS.md)."""
    forms = forms or candidate_forms()
    timings = _timings(forms, w, product.rows, threads, budget)
    batch = _timings(forms, w, product.batch_rows, threads, budget) if product.batch_rows else None
    relative = {t["form"]: t["relative"] for t in timings if "relative" in t}
    if batch is not None:
        at_batch = {t["form"]: t["relative"] for t in batch if "relative" in t}
        relative = {f: math.sqrt(r * at_batch[f]) for f, r in relative.items() if f in at_batch}
    best = min(relative, key=lambda f: relative[f])
    chosen = best if relative[best] * MIN_GAIN <= 1.0 else "fp32"
    row = {"graph": product.graph, "weight": product.weight, "shape": [product.k, product.n], "uses": product.uses,
           "rows_per_call": product.rows, "chosen": chosen, "speedup": 1.0 / relative[chosen], "candidates": timings}
    if batch is not None:
        row.update(batch_rows_per_call=product.batch_rows, batch_candidates=batch)
    return row


_time_form_default = time_form


def plan(models: dict[str, onnx.ModelProto], chunk: int, threads: int, forms: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every product of every graph; one row per product with its timings and choice.

    A product's time depends on its call (graph, shape, rows), not on its weights' values: products that
    share one (an RHN's per-step matrices, all 256 x 512 at one row) are timed once, for as long as they
    would have been one by one, and take one form. Timed one by one, three such matrices of one bundle
    were measured at 0.98x, 1.40x and 1.20x fp32's time at one row and took two forms."""
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for graph, model in models.items():
            inits = weights(model)
            products = find_products(model, graph, chunk)
            calls = Counter(_call(p) for p in products)
            timed: dict[tuple[Any, ...], dict[str, Any]] = {}
            for p in products:
                w = numpy_helper.to_array(inits[p.weight])
                if _call(p) in timed:
                    rows.append(_same_call(timed[_call(p)], p, w, threads))
                    continue
                timed[_call(p)] = choose(p, w, threads, forms, budget=calls[_call(p)])
                rows.append(timed[_call(p)])
    return rows


def _call(p: Product) -> tuple[Any, ...]:
    return p.graph, p.k, p.n, p.rows, p.batch_rows


def _same_call(timed: dict[str, Any], p: Product, w: np.ndarray, threads: int) -> dict[str, Any]:
    """``timed``'s row (its timings, its choice) for another product of the same call, with the errors
    of this product's own weights ``w``."""
    row = {**copy.deepcopy(timed), "weight": p.weight, "uses": p.uses, "timed_with": timed["weight"]}
    for key, rows in (("candidates", p.rows), ("batch_candidates", p.batch_rows)):
        measured = [c for c in row.get(key, []) if "max_rel_error" in c]
        errors = form_errors([c["form"] for c in measured], w, rows or p.rows, threads)
        for c in measured:
            c["max_rel_error"] = errors.get(c["form"], c["max_rel_error"])
    return row
