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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rnnlm.export import spec
from rnnlm.export.graphs import state_layout
from rnnlm.export.quantized_bundle import MAX_PPL_RISE, QUANT_STATE_TOLERANCE, quantize_bundle, score_ids
from rnnlm.export.tracing import GraphTracer
from rnnlm.export.validate import TOLERANCE, Report, load_staged, run_score, run_step, validate

from rnnlm import __version__
from rnnlm.checkpoint import CONFIG, WEIGHTS, load_model_dir
from rnnlm.checkpoint import VOCAB as VOCAB_FILE_CKPT
from rnnlm.data import Vocabulary, load_ptb
from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_text, replace_dir, sha256, staging_dir
from rnnlm.model import LanguageModel

if TYPE_CHECKING:
    from rnnlm.serve.runtime import LanguageModel as Runtime

QUANT_PROBE_TOLERANCE = 1e-2  # int8 kernels differ between CPUs (VNNI or not): the probe allows for it
PROBE_TOKENS = 6
QUANT_DIRS = {"auto": "onnx-quant", "int8": "onnx-int8"}


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


def _validate_advance(model: LanguageModel, lm: Runtime, tolerance: float) -> Report:
    from rnnlm.export.validate import validate_advance  # the advance graph's own check (export.validate)

    return validate_advance(model, lm, tolerance)


def _check_advance_chunk(advance_chunk: int) -> int:
    """The advance graph's chunk to export (0: none)."""
    if advance_chunk < 0 or advance_chunk > 1024:
        raise RnnlmError(f"--advance-chunk must be in [0, 1024] (0: no advance graph), got {advance_chunk}")
    return advance_chunk


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
        tracer = GraphTracer(model, states, step_spec, score_spec, advance, opset, chunk)
        # A quantized bundle starts from Scans for plain LSTM layers too: their products can then be quantized
        graphs = tracer.trace_all(tmp, fuse_lstm=not quantize)
        vocab.save(tmp / spec.VOCAB_FILE)
        stage = functools.partial(_manifest, cfg, vocab, states, step_spec, score_spec, chunk, opset, source, tmp,
                                  advance=advance)
        stage({})
        lm = load_staged(tmp)
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
            quant, lm, report = quantize_bundle(model, tracer, graphs, tmp, stage, lm, ids, valid_ids is not None,
                                                quantize, max_ppl_rise)
            probe_tol = QUANT_PROBE_TOLERANCE
            if advance_chunk:  # the quantized advance graph, against PyTorch on its own
                advance_report = _validate_advance(model, lm, QUANT_STATE_TOLERANCE)
            if valid_ids is not None:  # the quantized bundle's own perplexity
                metrics = {"valid_tokens": len(valid_ids), "valid_nll": quant["nll"], "valid_ppl": quant["ppl"]}
        validation = _validation_record(report, advance_report, quant["validation"]["tolerance"] if quant else tolerance)
        stage({"probe": _probe(lm, vocab, probe_tol), "validation": validation, "metrics": metrics, "quantization": quant})
        del lm
        if advance_chunk:  # the check serving runs when it first reads a prompt: the advance graph's state
            load_staged(tmp).session("advance")  # after the probe equals the scoring graph's, within its tolerance
        replace_dir(tmp, out_dir)
    summary = {"bundle": str(out_dir), "cell": cfg.cell, "seconds": round(time.monotonic() - t0, 1),
               "max_abs_logprob_diff": report.max_logprob_diff, "max_abs_state_diff": report.max_state_diff, **metrics}
    if quant:
        summary["quantization"] = {k: v for k, v in quant.items() if k != "products"}
        summary["quantization"]["choices"] = {f"{p['graph']}:{p['weight']}": p["chosen"] for p in quant["products"]}
    return summary


def _validation_record(report: Report, advance_report: Report | None, tolerance: float) -> dict[str, Any]:
    """The manifest's ``validation``: the bundle against eval-mode PyTorch, the advance graph's state too."""
    validation: dict[str, Any] = {"tolerance": tolerance, "max_abs_logprob_diff": report.max_logprob_diff,
                                  "max_abs_state_diff": report.max_state_diff, "cases": report.cases,
                                  "against": "eval-mode PyTorch, float32 weights"}
    if advance_report is not None:
        validation["advance"] = {"max_abs_state_diff": advance_report.max_state_diff, "cases": advance_report.cases}
    return validation


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


@torch.no_grad()
def _sample_text(model: LanguageModel, vocab: Vocabulary, n: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    token, state, out = torch.tensor([vocab.eos_id]), model.init_state(1), []
    for _ in range(n):
        logits, state = model.step(token, state)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        out.append(int(token))
    return np.array(out, np.int64)
