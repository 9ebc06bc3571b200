"""Export a checkpoint to a bundle: ONNX step and scoring graphs, vocabulary, manifest.

Nothing is written unless validation passes: the bundle is built in a temporary directory next
to its destination, validated, hashed, and renamed into place in one step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rnnlm.export import spec
from rnnlm.export.graphs import ScoreGraph, StepGraph, state_layout
from rnnlm.export.passes import gemm_to_matmul
from rnnlm.export.validate import TOLERANCE, run_score, run_step, session, validate

from rnnlm import __version__
from rnnlm.checkpoint import load_model_dir
from rnnlm.data import Vocabulary, load_ptb
from rnnlm.errors import RnnlmError
from rnnlm.fsutil import atomic_write_text, replace_dir, sha256, staging_dir
from rnnlm.model import LanguageModel

QUANT_TOLERANCE = 0.05  # the relative perplexity rise an int8 bundle may show
PROBE_TOKENS = 6


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _trace(module: torch.nn.Module, args: tuple[torch.Tensor, ...], graph: spec.GraphSpec, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript tracer: it unrolls the Python time loop into a fixed-length graph, names
        # every input and output, and keeps weights inside the file (no external data).
        torch.onnx.export(module, args, str(path), input_names=graph.input_names, output_names=graph.output_names,
                          dynamic_axes=graph.dynamic_axes(), opset_version=opset, dynamo=False,
                          external_data=False, do_constant_folding=True)
    model = onnx.load(str(path))
    gemm_to_matmul(model)
    onnx.save(model, str(path))
    _fsync(path)


def _example_args(states: list[spec.StateSpec], chunk: int | None) -> tuple[torch.Tensor, ...]:
    batch = 2
    zeros = [torch.zeros(batch, s.size) for s in states]
    if chunk is None:
        return (torch.zeros(batch, dtype=torch.long), *zeros)
    return (torch.zeros(chunk, batch, dtype=torch.long), torch.zeros(chunk, batch, dtype=torch.long),
            torch.full((batch,), chunk, dtype=torch.long), *zeros)


def score_tokens(score_path: Path, states: list[spec.StateSpec], chunk: int, ids: np.ndarray, start_id: int,
                 threads: int = 0) -> float:
    """Total NLL (nats) of a 1-D id stream, predicted from [start] + ids[:-1], at batch 1."""
    sess = session(score_path, threads)
    inputs = np.concatenate([[start_id], ids[:-1]]).astype(np.int64)[:, None]
    picked, _ = run_score(sess, states, chunk, inputs, ids.astype(np.int64)[:, None], np.array([len(ids)], np.int64))
    return -float(picked.astype(np.float64).sum())


def _probe(step_path: Path, score_path: Path, states: list[spec.StateSpec], chunk: int, vocab: Vocabulary) -> dict[str, Any]:
    """A fixed input and the graphs' outputs for it: the runtime checks it reproduces them on load."""
    rng = np.random.default_rng(1234)
    seq = np.concatenate([[vocab.eos_id], rng.integers(0, len(vocab), PROBE_TOKENS)]).astype(np.int64)
    lp, _ = run_step(session(step_path), states, seq[:-1, None])
    picked, _ = run_score(session(score_path), states, chunk, seq[:-1, None], seq[1:, None], np.array([PROBE_TOKENS]))
    return {"tokens": seq.tolist(), "target_logprobs": [float(v) for v in picked[:, 0]],
            "last_step_logprobs_head": [float(v) for v in lp[-1, 0, :16]], "tolerance": TOLERANCE}


def _resolve_paths(model_dir: str | Path | None, cell: str | None, out: str | Path | None, quantize: str | None) -> tuple[Path, Path]:
    if model_dir is None:
        if cell is None:
            raise RnnlmError("name a checkpoint: rnnlm export MODEL_DIR, or --cell lstm|rhn|hypernets for models/<cell>")
        from rnnlm.config import CELLS

        if cell not in CELLS:
            raise RnnlmError(f"unknown cell {cell!r} (choose one of {', '.join(CELLS)})")
        model_dir = Path("models") / cell
    model_dir = Path(model_dir)
    default = "onnx-int8" if quantize else "onnx"
    return model_dir, Path(out) if out is not None else model_dir / default


def export_bundle(
    model_dir: str | Path | None = None,
    *,
    cell: str | None = None,
    out: str | Path | None = None,
    opset: int = spec.DEFAULT_OPSET,
    chunk: int = spec.DEFAULT_CHUNK,
    quantize: str | None = None,
    quantize_tolerance: float = QUANT_TOLERANCE,
    force: bool = False,
    data_dir: str | Path | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export a checkpoint directory to a validated bundle; return the manifest's summary."""
    t0 = time.monotonic()
    if opset < spec.MIN_OPSET:
        raise RnnlmError(f"--opset {opset} is too old: {spec.MIN_OPSET} or newer is needed (native LayerNormalization)")
    if chunk < 1 or chunk > 512:
        raise RnnlmError(f"--chunk must be in [1, 512], got {chunk}")
    if quantize not in (None, "int8"):
        raise RnnlmError(f"--quantize supports int8 only, not {quantize!r}")
    model_dir, out_dir = _resolve_paths(model_dir, cell, out, quantize)
    is_bundle = (out_dir / spec.MANIFEST_FILE).is_file()
    is_empty_dir = out_dir.is_dir() and not any(out_dir.iterdir())
    if out_dir.exists() and not (is_bundle or is_empty_dir or force):
        raise RnnlmError(f"{out_dir} exists and is not a bundle: refusing to replace it (pass --force)")
    model, vocab = load_model_dir(model_dir)
    cfg = model.cfg
    states = state_layout(model)
    step_spec, score_spec = spec.step_graph(states, cfg.vocab_size), spec.score_graph(states, chunk)

    with staging_dir(out_dir.parent, out_dir.name) as tmp:
        step_path, score_path = tmp / spec.STEP_FILE, tmp / spec.SCORE_FILE
        _trace(StepGraph(model).eval(), _example_args(states, None), step_spec, step_path, opset)
        _trace(ScoreGraph(model, chunk).eval(), _example_args(states, chunk), score_spec, score_path, opset)
        report = validate(model, step_path, score_path, step_spec, score_spec, states, chunk, tolerance)
        valid_ids = _valid_ids(cfg.level, vocab, data_dir)
        metrics: dict[str, Any] = {}
        if valid_ids is not None:
            nll = score_tokens(score_path, states, chunk, valid_ids, vocab.eos_id)
            metrics = {"valid_tokens": len(valid_ids), "valid_nll": nll, "valid_ppl": math.exp(nll / len(valid_ids))}
        quant = None
        if quantize:
            quant = _quantize(model, tmp, states, chunk, vocab, valid_ids, quantize_tolerance)
            if valid_ids is not None:  # _quantize scored exactly these ids: report the int8 bundle's own ppl
                metrics["valid_ppl"] = quant["int8_ppl"]
        vocab.save(tmp / spec.VOCAB_FILE)
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
            "probe": _probe(step_path, score_path, states, chunk, vocab),
            "validation": {"tolerance": tolerance, "max_abs_logprob_diff": report.max_logprob_diff,
                           "max_abs_state_diff": report.max_state_diff, "cases": report.cases},
            "metrics": metrics,
            "quantization": quant,
            "source": str(model_dir),
            "files": {name: {"sha256": sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                      for name in (spec.STEP_FILE, spec.SCORE_FILE, spec.VOCAB_FILE)},
        }
        atomic_write_text(tmp / spec.MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    summary = {"bundle": str(out_dir), "cell": cfg.cell, "seconds": round(time.monotonic() - t0, 1),
               "max_abs_logprob_diff": report.max_logprob_diff, "max_abs_state_diff": report.max_state_diff, **metrics}
    if quant:
        summary["quantization"] = quant
    return summary


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


def _quantize(model: LanguageModel, tmp: Path, states: list[spec.StateSpec], chunk: int, vocab: Vocabulary,
              valid_ids: np.ndarray | None, tolerance: float) -> dict[str, Any]:
    """Dynamic int8 quantization of the weight matrices, checked by perplexity, not elementwise."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ids = valid_ids if valid_ids is not None else _sample_text(model, vocab, 3000)
    fp32 = {name: tmp / f"fp32-{name}" for name in (spec.STEP_FILE, spec.SCORE_FILE)}
    for name, src in fp32.items():
        os.replace(tmp / name, src)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # DefaultTensorType: shape inference cannot type every intermediate of the traced graph.
                # MatMul only: they hold the large weights (projections, decoder); quantizing the small
                # Gemm of the traced graphs produces models onnxruntime then refuses.
                quantize_dynamic(str(src), str(tmp / name), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            except Exception as e:
                raise RnnlmError(f"int8 quantization of {name} failed: {type(e).__name__}: {e}", code=1) from None
        _fsync(tmp / name)
    try:
        t = time.perf_counter()
        nll32 = score_tokens(fp32[spec.SCORE_FILE], states, chunk, ids, vocab.eos_id, threads=1)
        t32 = time.perf_counter() - t
        t = time.perf_counter()
        nll8 = score_tokens(tmp / spec.SCORE_FILE, states, chunk, ids, vocab.eos_id, threads=1)
        t8 = time.perf_counter() - t
        session(tmp / spec.STEP_FILE)
    except Exception as e:
        raise RnnlmError(f"the int8 graphs do not run in onnxruntime: {str(e).splitlines()[0][:300]}", code=1) from None
    for src in fp32.values():
        src.unlink()
    ppl32, ppl8 = math.exp(nll32 / len(ids)), math.exp(nll8 / len(ids))
    rise = ppl8 / ppl32 - 1
    result = {"method": "onnxruntime quantize_dynamic, QInt8 weights", "tokens": int(len(ids)),
              "text": "PTB valid" if valid_ids is not None else "sampled from the model",
              "fp32_ppl": ppl32, "int8_ppl": ppl8, "ppl_rise": rise, "tolerance": tolerance,
              "scoring_speedup_1_thread": t32 / t8}
    if rise > tolerance:
        raise RnnlmError(f"int8 quantization raised perplexity by {rise:.2%} ({ppl32:.2f} -> {ppl8:.2f}), "
                         f"over the {tolerance:.0%} tolerance: no bundle written", code=1)
    return result


@torch.no_grad()
def _sample_text(model: LanguageModel, vocab: Vocabulary, n: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    token, state, out = torch.tensor([vocab.eos_id]), model.init_state(1), []
    for _ in range(n):
        logits, state = model.step(token, state)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]
        out.append(int(token))
    return np.array(out, np.int64)
