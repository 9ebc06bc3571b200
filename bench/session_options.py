"""onnxruntime's session options on a bundle's advance (or scoring) graph: creation time and time per
token at batch 1, for each optimisation level with and without memory reuse, side by side.

    python bench/session_options.py BUNDLE [BUNDLE ...] [--graph advance|score] [--tokens 7680] [--threads 1,2]
                                    [--parallel]

The runtime uses basic optimisations without memory reuse (serve/runtime.py, ``_session_options``);
this is the measurement behind that choice for the Scan graphs. --threads lists the intra-op thread
counts to compare (default one; serve.graphs.advance_threads chooses the advance graph's); random
token ids (the weights and ids do not change the time), the state carried from call to call as in
reading a prompt. --parallel adds onnxruntime's parallel executor (basic, no reuse, two inter-op
threads), which could overlap a step's independent branches (the HyperLSTM's hyper cell and its main
product).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
SETS = [("basic", False), ("basic", True), ("extended", True), ("all", True)]


def session(path: Path, level: str, reuse: bool, threads: int = 1,
            parallel: bool = False) -> tuple[ort.InferenceSession, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 2 if parallel else 1
    if parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.graph_optimization_level, opts.enable_mem_reuse, opts.log_severity_level = LEVELS[level], reuse, 3
    t = time.perf_counter()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t


def per_token(sess: ort.InferenceSession, manifest: dict[str, Any], graph: str, ids: np.ndarray) -> float:
    """Seconds per token of reading ``ids`` at batch 1, a chunk per call."""
    chunk, states = manifest["graphs"][graph]["chunk"], manifest["state"]
    state = {s["input"]: np.zeros((1, s["size"]), np.float32) for s in states}
    t = time.perf_counter()
    for start in range(0, len(ids) - chunk + 1, chunk):
        feeds = {"token_ids": ids[start : start + chunk, None], "lengths": np.array([chunk], np.int64), **state}
        if graph == "score":
            feeds["targets"] = feeds["token_ids"]
        out = sess.run(None, feeds)
        state = dict(zip([s["input"] for s in states], out[-len(states):], strict=True))
    return (time.perf_counter() - t) / (len(ids) // chunk * chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--graph", choices=["advance", "score"], default="advance")
    ap.add_argument("--tokens", type=int, default=7680)
    ap.add_argument("--threads", default="1", help="intra-op thread counts to compare, e.g. 1,2")
    ap.add_argument("--parallel", action="store_true", help="also the parallel executor, two inter-op threads")
    args = ap.parse_args()
    for bundle in args.bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        if args.graph not in manifest["graphs"]:
            print(f"{bundle}: no {args.graph} graph")
            continue
        ids = np.random.default_rng(0).integers(0, manifest["vocab"]["size"], args.tokens).astype(np.int64)
        path = bundle / manifest["graphs"][args.graph]["file"]
        sets = [(level, reuse, False) for level, reuse in SETS] + ([("basic", False, True)] if args.parallel else [])
        for threads, (level, reuse, parallel) in itertools.product([int(n) for n in args.threads.split(",")], sets):
            sess, created = session(path, level, reuse, threads, parallel)
            per_token(sess, manifest, args.graph, ids[:1024])  # warm-up
            best = min(per_token(sess, manifest, args.graph, ids) for _ in range(2))
            print(f"{bundle} {args.graph}: {threads} thread(s) {level:8s} reuse={reuse!s:5s} "
                  f"{'parallel ' if parallel else ''}created in "
                  f"{created * 1e3:5.1f} ms, {best * 1e6:6.1f} us/token", flush=True)
            del sess  # one session's thread pool at a time


if __name__ == "__main__":
    main()
