"""Export a checkpoint to a bundle: ONNX step and scoring graphs, vocabulary, manifest.

Nothing is written unless validation passes: the bundle is built in a temporary directory next
to its destination, validated, hashed, and renamed into place in one step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx
import torch
from rnnlm.export import quantize, recurrence, spec
from rnnlm.export.graphs import AdvanceGraph, ScoreGraph, StepGraph, state_layout
from rnnlm.export.passes import drop_weight_identities, gemm_to_matmul, share_tied_weights
from rnnlm.export.validate import TOLERANCE, Report, ValidationError, run_score, run_step, validate

from rnnlm import __version__
from rnnlm.checkpoint import CONFIG, WEIGHTS, load_model_dir
from rnnlm.checkpoint import VOCAB as VOCAB_FILE_CKPT
from rnnlm.data import Vocabulary, load_ptb
from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_text, replace_dir, sha256, staging_dir
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
QUANT_PROBE_TOLERANCE = 1e-2  # int8 kernels differ between CPUs (VNNI or not): the probe allows for it
PROBE_TOKENS = 6
STEP_CHECK_TOKENS = 16_384  # of the perplexity text, run through the step graph (32 streams side by side)
QUANT_DIRS = {"auto": "onnx-quant", "int8": "onnx-int8"}


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))
    _fsync(path)


def _trace(module: torch.nn.Module, args: tuple[torch.Tensor, ...], graph: spec.GraphSpec, path: Path, opset: int,
           *, fuse_lstm: bool = True) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript tracer names every input and output and keeps weights inside the file (no
        # external data); the scoring and advance graphs' time loops are traced as one placeholder node per
        # layer, which ``recurrence.lower`` replaces by a Scan over the step (or ONNX's LSTM operator).
        torch.onnx.export(module, args, str(path), input_names=graph.input_names, output_names=graph.output_names,
                          dynamic_axes=graph.dynamic_axes(), opset_version=opset, dynamo=False,
                          external_data=False, do_constant_folding=True,
                          custom_opsets=None if isinstance(module, StepGraph) else {recurrence.DOMAIN: 1})
    model = onnx.load(str(path))
    # each layer's time loop: one Scan or LSTM node
    recurrence.lower(model, list(cast(LanguageModel, module.model).layers), opset, fuse_lstm=fuse_lstm)
    gemm_to_matmul(model)
    drop_weight_identities(model)
    _save_shared(model, path)
    return model  # with every product a MatMul: what quantization plans on


def _save_shared(model: onnx.ModelProto, path: Path) -> None:
    """Save a copy of ``model`` that holds a tied decoder's matrix once (``share_tied_weights``) and whose
    Scans skip their per-step holds when every column advances every step (``full_chunk_twins``)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    share_tied_weights(copy)
    recurrence.full_chunk_twins(copy)
    _save(copy, path)


def _example_args(states: list[spec.StateSpec], chunk: int | None) -> tuple[torch.Tensor, ...]:
    batch = 2
    zeros = [torch.zeros(batch, s.size) for s in states]
    if chunk is None:
        return (torch.zeros(batch, dtype=torch.long), *zeros)
    return (torch.zeros(chunk, batch, dtype=torch.long), torch.zeros(chunk, batch, dtype=torch.long),
            torch.full((batch,), chunk, dtype=torch.long), *zeros)


def _probe(lm: Runtime, vocab: Vocabulary, tolerance: float) -> dict[str, Any]:
    """A fixed input and the graphs' outputs for it: the runtime checks it reproduces them on load."""
    rng = np.random.default_rng(1234)
    seq = np.concatenate([[vocab.eos_id], rng.integers(0, len(vocab), PROBE_TOKENS)]).astype(np.int64)
    lp, _ = run_step(lm, seq[:-1, None])
    picked, _ = run_score(lm, seq[:-1, None], seq[1:, None], np.array([PROBE_TOKENS]))
    return {"tokens": seq.tolist(), "target_logprobs": [float(v) for v in picked[:, 0]],
            "last_step_logprobs_head": [float(v) for v in lp[-1, 0, :16]], "tolerance": tolerance}


def _resolve_paths(model_dir: str | Path | None, cell: str | None, out: str | Path | None, quantize: str | None) -> tuple[Path, Path]:
    if model_dir is None:
        if cell is None:
            raise RnnlmError("name a checkpoint: rnnlm export MODEL_DIR, or --cell lstm|rhn|hypernets for models/<cell>")
        from rnnlm.config import CELLS

        if cell not in CELLS:
            raise RnnlmError(f"unknown cell {cell!r} (choose one of {', '.join(CELLS)})")
        model_dir = Path("models") / cell
    model_dir = Path(model_dir)
    default = QUANT_DIRS[quantize] if quantize else "onnx"
    return model_dir, Path(out) if out is not None else model_dir / default


def refuse_shadowing(path: str | Path, option: str = "--out") -> None:
    """Refuse a folder in the current directory named like an importable top-level module: Python
    puts the current directory first on sys.path, so ``triton/`` there breaks ``import triton``
    (torch's compiler imports it) for every command run from here."""
    p = Path(path)
    if not p.name.isidentifier() or p.resolve().parent != Path.cwd().resolve():
        return
    if p.name in sys.builtin_module_names or p.name in sys.stdlib_module_names:
        found = True
    else:
        here = {"", ".", os.getcwd()}
        saved = sys.path[:]
        sys.path[:] = [x for x in saved if x not in here]
        try:
            found = importlib.util.find_spec(p.name) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path[:] = saved
    if found:
        raise RnnlmError(f"{option} {path}: a folder named {p.name!r} in the current directory would shadow the "
                         f"Python module {p.name!r}; choose another name (for Triton: model_repository/)")


def source_identity(model_dir: Path) -> dict[str, Any]:
    """What identifies the checkpoint without saying where it lives: its config's and weights' sha256."""
    return {"config_sha256": sha256(model_dir / CONFIG), "weights_sha256": sha256(model_dir / WEIGHTS),
            "vocab_sha256": sha256(model_dir / VOCAB_FILE_CKPT)}


def _check_destination(out_dir: Path, source: dict[str, Any], force: bool) -> None:
    """Refuse to replace a folder that is not a bundle, or a bundle of another checkpoint, unless forced."""
    if not out_dir.exists() or force:
        return
    manifest = out_dir / spec.MANIFEST_FILE
    if not manifest.is_file():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            return
        raise RnnlmError(f"{out_dir} exists and is not a bundle: refusing to replace it (pass --force)")
    try:
        old = json.loads(manifest.read_text(encoding="utf-8")).get("source")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        old = None
    same = isinstance(old, dict) and old.get("weights_sha256") == source["weights_sha256"] \
        and old.get("config_sha256") == source["config_sha256"]
    if not same:
        raise RnnlmError(f"{out_dir} holds a bundle exported from another checkpoint: refusing to replace it (pass --force)")


def _check_options(opset: int, chunk: int, quantize: str | None, max_ppl_rise: float) -> None:
    if opset < spec.MIN_OPSET:
        raise RnnlmError(f"--opset {opset} is too old: {spec.MIN_OPSET} or newer is needed (native LayerNormalization)")
    if chunk < 1 or chunk > 512:
        raise RnnlmError(f"--chunk must be in [1, 512], got {chunk}")
    if quantize not in (None, *QUANT_DIRS):
        raise RnnlmError(f"--quantize must be auto (per product, by measurement) or int8, not {quantize!r}")
    if not 0 <= max_ppl_rise < 1:
        raise RnnlmError(f"--max-ppl-rise must be in [0, 1), got {max_ppl_rise}")


def _manifest(cfg: Any, vocab: Vocabulary, states: list[spec.StateSpec], step_spec: spec.GraphSpec,
              score_spec: spec.GraphSpec, chunk: int, opset: int, source: dict[str, Any], tmp: Path,
              extra: dict[str, Any], *, advance: tuple[spec.GraphSpec, int] | None = None) -> dict[str, Any]:
    manifest = {
        "format": "rnnlm-bundle",
        "format_version": spec.FORMAT_VERSION,
        "cell": cfg.cell,
        "config": dataclasses.asdict(cfg),
        "vocab": {"file": spec.VOCAB_FILE, "size": len(vocab), "unk": "<unk>", "eos": "<eos>",
                  "unk_id": vocab.unk_id, "eos_id": vocab.eos_id},
        "text": cfg.text_spec().to_json(),
        "graphs": {"step": step_spec.to_json(), "score": {**score_spec.to_json(), "chunk": chunk}},
        "state": spec.states_to_json(states),
        "opset": opset,
        "producer": {"rnnlm": __version__, "torch": torch.__version__, "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime")},
        "probe": {"tokens": [], "target_logprobs": [], "last_step_logprobs_head": [], "tolerance": TOLERANCE},
        "validation": None,
        "metrics": {},
        "quantization": None,
        "source": source,
        **extra,
        "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                  for name in (spec.STEP_FILE, spec.SCORE_FILE, spec.VOCAB_FILE)},
    }
    if advance is not None:
        _add_advance(manifest, tmp, *advance)
    atomic_write_text(tmp / spec.MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _add_advance(manifest: dict[str, Any], tmp: Path, graph: spec.GraphSpec, chunk: int) -> None:
    """List the advance graph in the manifest: its interface among the graphs, its file among the files."""
    manifest["graphs"]["advance"] = {**graph.to_json(), "chunk": chunk}
    manifest["files"][graph.file] = {"sha256": sha256(tmp / graph.file), "bytes": (tmp / graph.file).stat().st_size}


def _advance_args(states: list[spec.StateSpec], chunk: int) -> tuple[torch.Tensor, ...]:
    batch = 2
    return (torch.zeros(chunk, batch, dtype=torch.long), torch.full((batch,), chunk, dtype=torch.long),
            *[torch.zeros(batch, s.size) for s in states])


def _validate_advance(model: LanguageModel, lm: Runtime, tolerance: float) -> Report:
    from rnnlm.export.validate import validate_advance  # the advance graph's own check (export.validate)

    return validate_advance(model, lm, tolerance)


def _check_advance_chunk(advance_chunk: int) -> int:
    """The advance graph's chunk to export (0: none)."""
    if advance_chunk < 0 or advance_chunk > 1024:
        raise RnnlmError(f"--advance-chunk must be in [0, 1024] (0: no advance graph), got {advance_chunk}")
    return advance_chunk


def _runtime(tmp: Path) -> Runtime:
    from rnnlm.serve.bundle import Bundle
    from rnnlm.serve.runtime import LanguageModel as Runtime

    return Runtime(Bundle.open(tmp), device="cpu")


def export_bundle(
    model_dir: str | Path | None = None,
    *,
    cell: str | None = None,
    out: str | Path | None = None,
    opset: int = spec.DEFAULT_OPSET,
    chunk: int = spec.DEFAULT_CHUNK,
    quantize: str | None = None,
    max_ppl_rise: float = MAX_PPL_RISE,
    force: bool = False,
    data_dir: str | Path | None = None,
    tolerance: float = TOLERANCE,
    advance_chunk: int = spec.DEFAULT_ADVANCE_CHUNK,
) -> dict[str, Any]:
    """Export a checkpoint directory to a validated bundle; return the manifest's summary."""
    t0 = time.monotonic()
    _check_options(opset, chunk, quantize, max_ppl_rise)
    advance_chunk = _check_advance_chunk(advance_chunk)
    model_dir, out_dir = _resolve_paths(model_dir, cell, out, quantize)
    refuse_shadowing(out_dir)
    model, vocab = load_model_dir(model_dir)
    source = source_identity(model_dir)
    _check_destination(out_dir, source, force)
    cfg = model.cfg
    states = state_layout(model)
    step_spec, score_spec = spec.step_graph(states, cfg.vocab_size), spec.score_graph(states)

    with staging_dir(out_dir.parent, out_dir.name) as tmp:
        advance = (spec.advance_graph(states), advance_chunk) if advance_chunk else None
        graphs = _trace_graphs(model, states, step_spec, score_spec, advance, tmp, opset, chunk, fuse_lstm=not quantize)
        vocab.save(tmp / spec.VOCAB_FILE)
        stage = functools.partial(_manifest, cfg, vocab, states, step_spec, score_spec, chunk, opset, source, tmp,
                                  advance=advance)
        stage({})
        lm = _runtime(tmp)
        report = validate(model, lm, tolerance)
        advance_report = _validate_advance(model, lm, tolerance) if advance_chunk else None
        valid_ids = _valid_ids(cfg.level, vocab, data_dir)
        metrics: dict[str, Any] = {}
        if valid_ids is not None:
            nll = score_ids(lm, valid_ids)
            metrics = {"valid_tokens": len(valid_ids), "valid_nll": nll, "valid_ppl": math.exp(nll / len(valid_ids))}
        quant, probe_tol = None, tolerance
        if quantize:
            ids = valid_ids if valid_ids is not None else _sample_text(model, vocab, 3000)
            quant, lm, report = _quantize(model, graphs, tmp, stage, lm, ids, valid_ids is not None, quantize, chunk,
                                          max_ppl_rise)
            probe_tol = QUANT_PROBE_TOLERANCE
            if advance_chunk:  # the quantized advance graph, against PyTorch on its own
                advance_report = _validate_advance(model, lm, QUANT_STATE_TOLERANCE)
            if valid_ids is not None:  # the quantized bundle's own perplexity
                metrics = {"valid_tokens": len(valid_ids), "valid_nll": quant["nll"], "valid_ppl": quant["ppl"]}
        validation = _validation_record(report, advance_report, quant["validation"]["tolerance"] if quant else tolerance)
        stage({"probe": _probe(lm, vocab, probe_tol), "validation": validation, "metrics": metrics, "quantization": quant})
        del lm
        if advance_chunk:  # the check serving runs when it first reads a prompt: the advance graph's state
            _runtime(tmp).session("advance")  # after the probe equals the scoring graph's, within its tolerance
        replace_dir(tmp, out_dir)
    summary = {"bundle": str(out_dir), "cell": cfg.cell, "seconds": round(time.monotonic() - t0, 1),
               "max_abs_logprob_diff": report.max_logprob_diff, "max_abs_state_diff": report.max_state_diff, **metrics}
    if quant:
        summary["quantization"] = {k: v for k, v in quant.items() if k != "products"}
        summary["quantization"]["choices"] = {f"{p['graph']}:{p['weight']}": p["chosen"] for p in quant["products"]}
    return summary


def _trace_graphs(model: LanguageModel, states: list[spec.StateSpec], step_spec: spec.GraphSpec, score_spec: spec.GraphSpec,
                  advance: tuple[spec.GraphSpec, int] | None, tmp: Path, opset: int, chunk: int, *,
                  fuse_lstm: bool) -> dict[str, onnx.ModelProto]:
    """Trace the step and scoring graphs (and the advance graph, given its spec and chunk) into ``tmp``.
    ``fuse_lstm`` False keeps LSTM layers as Scans (a quantized bundle: their products can then be quantized)."""
    graphs = {"step": _trace(StepGraph(model).eval(), _example_args(states, None), step_spec, tmp / spec.STEP_FILE, opset),
              "score": _trace(ScoreGraph(model).eval(), _example_args(states, chunk), score_spec, tmp / spec.SCORE_FILE,
                              opset, fuse_lstm=fuse_lstm)}
    if advance is not None:
        graphs["advance"] = _trace(AdvanceGraph(model).eval(), _advance_args(states, advance[1]), advance[0],
                                   tmp / spec.ADVANCE_FILE, opset, fuse_lstm=fuse_lstm)
    return graphs


def _validation_record(report: Report, advance_report: Report | None, tolerance: float) -> dict[str, Any]:
    """The manifest's ``validation``: the bundle against eval-mode PyTorch, the advance graph's state too."""
    validation: dict[str, Any] = {"tolerance": tolerance, "max_abs_logprob_diff": report.max_logprob_diff,
                                  "max_abs_state_diff": report.max_state_diff, "cases": report.cases,
                                  "against": "eval-mode PyTorch, float32 weights"}
    if advance_report is not None:
        validation["advance"] = {"max_abs_state_diff": advance_report.max_state_diff, "cases": advance_report.cases}
    return validation


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


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "unknown"


def _valid_ids(level: str, vocab: Vocabulary, data_dir: str | Path | None) -> np.ndarray | None:
    """PTB validation ids where the data is at hand (never downloads during export)."""
    try:
        corpus = load_ptb(data_dir, level=level, download=False)
    except RnnlmError:
        return None
    return corpus.valid if corpus.vocab == vocab else None


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


def _nlls(lm: Runtime, ids: np.ndarray) -> tuple[dict[str, float], float]:
    """NLL per token of ``ids`` through each graph (the step graph on the first STEP_CHECK_TOKENS), and
    the scoring graph's seconds."""
    t = time.perf_counter()
    score = score_ids(lm, ids) / len(ids)
    seconds = time.perf_counter() - t
    few = ids[:STEP_CHECK_TOKENS]
    return {"score": score, "step": step_nll(lm, few) / (len(few) // 32 * 32)}, seconds


def _quantize(model: LanguageModel, graphs: dict[str, onnx.ModelProto], tmp: Path, stage: Callable[[dict[str, Any]], Any],
              lm: Runtime, ids: np.ndarray, is_valid: bool, mode: str, chunk: int,
              max_ppl_rise: float) -> tuple[dict[str, Any], Runtime, Report]:
    """Quantize the products where it pays (``export.quantize``), then check the quantized graphs
    themselves, each of them: by perplexity against the float32 graphs (the scoring graph on all of
    ``ids``, the step graph on its first STEP_CHECK_TOKENS) and against PyTorch (max |Δ log p|). A
    graph that fails has its 4-bit products demoted to int8 and the bundle is rebuilt; when even that
    fails, export refuses."""
    nll32, t32 = _nlls(lm, ids)
    threads = os.cpu_count() or 1
    measured = {k: g for k, g in graphs.items() if k != "advance"}  # the advance graph takes the score graph's forms
    rows = quantize.plan(measured, chunk, threads, None if mode == "auto" else ["fp32", "int8"])
    if mode == "int8":  # every product int8, as asked; the measurement is still recorded
        for r in rows:
            r["chosen"] = "int8"
    ranges = quantize.activation_ranges(graphs["step"], [(s.input, s.output) for s in state_layout(model)],
                                        ids[:STEP_CHECK_TOKENS], lm.eos_id)
    for r in rows:
        r["activation_range"] = ranges.get(quantize.content_key(quantize.weights(measured[r["graph"]])[r["weight"]]))
    attempts: list[dict[str, Any]] = []
    while True:
        lm = _stage_quantized(graphs, rows, ranges, tmp, stage)
        nllq, tq = _nlls(lm, ids)
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
            break
        if not any(quantize.demote(rows, "nbits4", "int8", graph=g) for g in sorted(failed)):
            g = max(rises, key=lambda k: rises[k])
            if rises[g] <= max_ppl_rise and problem is not None:
                raise problem
            raise RnnlmError(f"quantization raised the {g} graph's perplexity by {rises[g]:.2%} "
                             f"({math.exp(nll32[g]):.2f} -> {math.exp(nllq[g]):.2f}), over the --max-ppl-rise "
                             f"{max_ppl_rise:.2%}: no bundle written", code=1)
    assert report is not None
    ppl32, pplq = math.exp(nll32["score"]), math.exp(nllq["score"])
    result = {"mode": mode, "method": "per product by measurement: fp32, int8 (MatMulIntegerToFloat, per-column "
              "weight scales, one activation scale per product calibrated at export: activation_range), 4-bit "
              "(MatMulNBits), bf16 where onnxruntime has a kernel", "threads": threads,
              "products": rows, "attempts": attempts, "text": "PTB valid" if is_valid else "sampled from the model",
              "tokens": int(len(ids)), "fp32_ppl": ppl32, "ppl": pplq, "nll": nllq["score"] * len(ids),
              "ppl_rise": rises["score"], "step_graph_ppl_rise": rises["step"],
              "step_graph_tokens": len(ids[:STEP_CHECK_TOKENS]) // 32 * 32, "max_ppl_rise": max_ppl_rise,
              "scoring_speedup": t32 / tq,
              "validation": {"tolerance": QUANT_LOGPROB_TOLERANCE, "state_tolerance": QUANT_STATE_TOLERANCE,
                             "max_abs_logprob_diff": report.max_logprob_diff,
                             "max_abs_state_diff": report.max_state_diff}}
    return result, lm, report


GRAPH_FILES = {"step": spec.STEP_FILE, "score": spec.SCORE_FILE, "advance": spec.ADVANCE_FILE}


def _stage_quantized(graphs: dict[str, onnx.ModelProto], rows: list[dict[str, Any]],
                     ranges: dict[quantize.ContentKey, float], tmp: Path, stage: Callable[[dict[str, Any]], Any]) -> Runtime:
    """Write the graphs with the products' chosen forms (int8 ones with their calibrated activation
    ``ranges``), restage the manifest, load it in the runtime. The advance graph is the scoring graph's
    recurrence: its products take the forms chosen for the scoring graph's products with the same
    weights, so that both reach the same state."""
    for key, graph in graphs.items():
        q = onnx.ModelProto()
        q.CopyFrom(graph)
        forms = quantize.forms_by_weights(graph, graphs["score"], [r for r in rows if r["graph"] == "score"]) \
            if key == "advance" else {r["weight"]: r["chosen"] for r in rows if r["graph"] == key}
        quantize.apply_forms(q, forms, ranges)
        _save_shared(q, tmp / GRAPH_FILES[key])
    stage({})
    try:
        return _runtime(tmp)
    except RnnlmError as e:
        raise RnnlmError(f"the quantized graphs do not load in onnxruntime: {e.message}", code=1) from None


@torch.no_grad()
def _sample_text(model: LanguageModel, vocab: Vocabulary, n: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    token, state, out = torch.tensor([vocab.eos_id]), model.init_state(1), []
    for _ in range(n):
        logits, state = model.step(token, state)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        out.append(int(token))
    return np.array(out, np.int64)
