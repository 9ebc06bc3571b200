"""PyTorch modules -> the bundle's ONNX graphs: traced, each layer's time loop lowered to one node,
every product a MatMul, and saved with fsync.

``GraphTracer`` holds what every trace of one export shares (the model, its state layout, the
graphs' interfaces, the opset and chunks), so that the exporter and the quantizer trace alike: the
quantizer traces the scoring and advance graphs a second time with plain LSTM layers as ONNX's LSTM
operator, to time that form against the Scan.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import onnx
import torch
from rnnlm.export import recurrence, spec
from rnnlm.export.graphs import AdvanceGraph, ScoreGraph, StepGraph
from rnnlm.export.passes import drop_weight_identities, gemm_to_matmul, share_tied_weights

from rnnlm.model import LanguageModel

GRAPH_FILES = {"step": spec.STEP_FILE, "score": spec.SCORE_FILE, "advance": spec.ADVANCE_FILE}
EXAMPLE_BATCH = 2  # the batch the tracer runs; every graph's batch axis is dynamic


def save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_shared(model: onnx.ModelProto, path: Path) -> None:
    """Save a copy of ``model`` that holds a tied decoder's matrix once (``share_tied_weights``) and whose
    Scans skip their per-step holds when every column advances every step (``full_chunk_twins``)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    share_tied_weights(copy)
    recurrence.full_chunk_twins(copy)
    save(copy, path)


@dataclass(frozen=True)
class GraphTracer:
    """Traces one model's graphs: ``step`` (one token), ``score`` (``chunk`` steps with targets) and,
    where ``advance`` gives its interface and chunk, ``advance`` (the recurrence alone)."""

    model: LanguageModel
    states: list[spec.StateSpec]
    step_spec: spec.GraphSpec
    score_spec: spec.GraphSpec
    advance: tuple[spec.GraphSpec, int] | None
    opset: int
    chunk: int

    @property
    def keys(self) -> tuple[str, ...]:
        return ("step", "score", "advance") if self.advance is not None else ("step", "score")

    def trace_all(self, directory: Path, *, fuse_lstm: bool, keys: tuple[str, ...] | None = None) -> dict[str, onnx.ModelProto]:
        """Trace ``keys`` (default: every graph) into ``directory``. ``fuse_lstm`` False keeps plain LSTM
        layers as Scans, whose products quantization can rewrite; the step graph has no time loop."""
        return {key: self.trace(key, directory / GRAPH_FILES[key], fuse_lstm=fuse_lstm) for key in keys or self.keys}

    def trace(self, key: str, path: Path, *, fuse_lstm: bool) -> onnx.ModelProto:
        """Trace graph ``key`` to ``path``; returns the model with every product a MatMul (what
        quantization plans on), before the tied decoder is shared."""
        module, args, graph = self._module(key)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript tracer names every input and output and keeps weights inside the file (no
            # external data); the scoring and advance graphs' time loops are traced as one placeholder node
            # per layer, which ``recurrence.lower`` replaces by a Scan over the step (or ONNX's LSTM operator).
            torch.onnx.export(module, args, str(path), input_names=graph.input_names, output_names=graph.output_names,
                              dynamic_axes=graph.dynamic_axes(), opset_version=self.opset, dynamo=False,
                              external_data=False, do_constant_folding=True,
                              custom_opsets=None if key == "step" else {recurrence.DOMAIN: 1})
        model = onnx.load(str(path))
        recurrence.lower(model, list(cast(LanguageModel, self.model).layers), self.opset, fuse_lstm=fuse_lstm)
        gemm_to_matmul(model)
        drop_weight_identities(model)
        save_shared(model, path)
        return model

    def _module(self, key: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], spec.GraphSpec]:
        """The module that computes graph ``key``, example inputs for the tracer, the graph's interface."""
        b = EXAMPLE_BATCH
        zeros = [torch.zeros(b, s.size) for s in self.states]
        if key == "step":
            return StepGraph(self.model).eval(), (torch.zeros(b, dtype=torch.long), *zeros), self.step_spec
        if key == "score":
            c = self.chunk
            return ScoreGraph(self.model).eval(), (torch.zeros(c, b, dtype=torch.long), torch.zeros(c, b, dtype=torch.long),
                                                   torch.full((b,), c, dtype=torch.long), *zeros), self.score_spec
        assert key == "advance" and self.advance is not None
        graph, c = self.advance
        return AdvanceGraph(self.model).eval(), (torch.zeros(c, b, dtype=torch.long), torch.full((b,), c, dtype=torch.long),
                                                 *zeros), graph
