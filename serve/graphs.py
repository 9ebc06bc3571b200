"""A bundle's graphs in onnxruntime: the options and thread counts of their sessions, the check of
a session's interface against the manifest, and the step graph run through IOBinding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rnnlm.serve.bundle import BundleError
from rnnlm.serve.values import State

DTYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


def intra_threads(threads: int | None) -> int:
    """The intra-op threads a model's sessions get: ``threads``, or one per core."""
    return threads or (os.cpu_count() or 1)


# Intra-op threads of the process-wide onnxruntime pool once ``share_thread_pool`` made it (``rnnlm
# serve``); None while every session has its own pool.
_shared_pool: int | None = None


def share_thread_pool(threads: int) -> None:
    """One intra-op thread pool of ``threads`` for every onnxruntime session this process creates
    from now on, instead of one per session. A server alternates its scoring, step and advance
    sessions (and requests run two at a time), and pools of their own, each spinning after its run,
    take the two cores from each other: a quantized LSTM step alternated with another session's
    took 132-173 us with a pool per session and 88 us with one shared pool (bench/RESULTS.md).
    Process-wide and final: onnxruntime then refuses a session with its own pool, and a shared pool
    sets every session's thread count, so only a process that owns every session (``rnnlm serve``)
    calls this, before its first session."""
    global _shared_pool
    if _shared_pool is not None:
        if threads != _shared_pool:
            raise RuntimeError(f"this process already shares a pool of {_shared_pool} threads")
        return
    ort.set_global_thread_pool_sizes(threads, 1)
    _shared_pool = threads


def session_options(threads: int) -> ort.SessionOptions:
    """The onnxruntime options of every session, with ``threads`` intra-op threads (the shared
    pool's instead, where ``share_thread_pool`` made one)."""
    opts = ort.SessionOptions()
    # Measured (bench/RESULTS.md): on the unrolled graphs of older bundles (thousands of small nodes)
    # onnxruntime's memory-reuse planner took seconds while saving no run time; on the Scan graphs
    # (export.recurrence) basic, extended and all optimisation levels, with or without memory reuse,
    # show no consistent difference (bench/session_options.py). Basic optimisations, no reuse planning.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.enable_mem_reuse = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # a CUDA provider that cannot start is reported in one line, not ORT's log
    if _shared_pool is not None:
        opts.use_per_session_threads = False  # the thread counts are the shared pool's
        return opts
    opts.inter_op_num_threads = 1
    # Deliberate: one intra-op thread per core; the recurrent step is small, so more threads than
    # cores only adds synchronisation.
    opts.intra_op_num_threads = threads
    return opts


def advance_threads(manifest: dict[str, Any], threads: int) -> int:
    """Intra-op threads of the advance graph's session, which reads a prompt as a chain of batch-1
    steps, each reading every recurrent weight once. Float32 weights (1-1.5 MB at the default
    sizes) overflow one core's L2 cache; split across ``threads`` cores, each keeps its share cached
    and a step runs 1.15-1.65x faster. Quantized per-step products read a quarter of that, which fits
    one core, and splitting them only adds synchronisation: those bundles read prompts on one thread,
    leaving the other cores to the server's other requests (bench/RESULTS.md, "Threads of the
    advance graph"). Under a shared pool (``share_thread_pool``), the pool's."""
    if _shared_pool is not None:
        return _shared_pool
    products = (manifest.get("quantization") or {}).get("products", [])
    per_step = [p for p in products if p.get("graph") == "score" and p.get("rows_per_call") == 1]
    return 1 if any(p.get("chosen", "fp32") != "fp32" for p in per_step) else threads


def check_io(path: Path, spec: dict[str, Any], sess: ort.InferenceSession) -> None:
    """The session's inputs and outputs against the manifest's ``spec`` of its graph: names in order,
    dtypes, ranks, and every axis the manifest calls dynamic dynamic in the graph too (the runtime
    feeds such an axis any size)."""
    for kind, declared, actual in (("input", spec["inputs"], sess.get_inputs()), ("output", spec["outputs"], sess.get_outputs())):
        if [t["name"] for t in declared] != [a.name for a in actual]:
            raise BundleError(f"{path}: graph {kind}s {[a.name for a in actual]} do not match "
                              f"the manifest {[t['name'] for t in declared]}")
        for t, a in zip(declared, actual, strict=True):
            if DTYPES[t["dtype"]] != a.type or len(t["shape"]) != len(a.shape):
                raise BundleError(f"{path}: {kind} {a.name} is {a.type} of rank {len(a.shape)}, "
                                  f"the manifest says {t['dtype']} of rank {len(t['shape'])}")
            fixed = [i for i, (d, g) in enumerate(zip(t["shape"], a.shape, strict=True)) if isinstance(d, str) and isinstance(g, int)]
            if fixed:
                raise BundleError(f"{path}: {kind} {a.name} has axis {fixed[0]} fixed at {a.shape[fixed[0]]}, "
                                  f"the manifest says it is dynamic ({t['shape'][fixed[0]]})")


def fixed_steps(spec: dict[str, Any]) -> bool:
    """Whether a chunked graph (scoring, advance) takes exactly its chunk of steps per call (bundles
    exported before its step axis was dynamic state it as an integer), not any number up to it."""
    return not isinstance(spec["inputs"][0]["shape"][0], str)


class BoundStepper:
    """The step graph through IOBinding: the state stays where the session runs (GPU memory on
    CUDA) as OrtValues, swapped from outputs to inputs at every step, never copied to the host."""

    def __init__(self, sess: ort.InferenceSession, states: list[dict[str, Any]], state: State) -> None:
        self.sess = sess
        self.names = [(s["input"], s["output"]) for s in states]
        self.device = "cuda" if "CUDAExecutionProvider" in self.sess.get_providers() else "cpu"
        self.states = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)
                       for a in state.arrays.values()]

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        binding = self.sess.io_binding()
        binding.bind_cpu_input("token_ids", np.ascontiguousarray(token_ids, np.int64))
        for (name_in, _), value in zip(self.names, self.states, strict=True):
            binding.bind_ortvalue_input(name_in, value)
        binding.bind_output("logprobs", "cpu")  # sampling happens on the host
        for _, name_out in self.names:
            binding.bind_output(name_out, self.device)
        self.sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.states = list(outputs[1:])
        return outputs[0].numpy()
