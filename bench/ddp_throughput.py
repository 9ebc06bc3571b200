"""Data-parallel training throughput: a cell's default preset on PTB for a fixed number of steps,
as one process (1 and 2 threads) and as torchrun processes (gloo, one thread each).

    python bench/ddp_throughput.py --data-dir ../shared/data/ptb [--steps 80] [--cell lstm] [--nproc 2]
    python bench/ddp_throughput.py --data-dir ../shared/data/ptb --steps 20 --no-dropout   # equality check

Every run is the real command line (`python -m rnnlm train ... --max-steps N`, under
`torch.distributed.run` for the data-parallel one), each in its own fresh output directory; the
numbers come from the metrics.jsonl that rank 0 writes: training tokens per second over all ranks
(validation excluded), train perplexity over the steps run, and the batched valid perplexity at the
end. With --no-dropout the runs see the same gradients, so their train and valid perplexities must
agree to float rounding; with dropout each rank draws its own masks and they only come close.
Thread counts: OMP_NUM_THREADS (torch's intra-op threads) and MKL_NUM_THREADS per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NO_DROPOUT = ["dropout_emb=0", "dropout_input=0", "dropout_recurrent=0", "dropout_output=0", "recurrent_dropout=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(name: str, nproc: int, threads: int, train_args: list[str], out: Path) -> dict[str, Any]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--local-ranks-filter", "0"]
    cmd = [*launcher, "-m", "rnnlm", "train", *train_args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"run": name, "processes": nproc, "threads_per_process": threads, "steps": row["step"],
            "tokens": row["tokens_seen"], "train_tok_per_s": row["tokens_per_s"], "train_ppl": row["train_ppl"],
            "valid_ppl": row["valid_ppl"], "wall_s": round(wall, 1), "load_before": round(load, 2),
            "command": f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} " + " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("RNNLM_DATA_DIR"), help="PTB directory")
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--steps", type=int, default=80, help="optimizer steps per run (lstm-small: ~1 min at 1 thread)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run")
    ap.add_argument("--no-dropout", action="store_true", help="dropout 0: the runs must then agree")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if not args.data_dir:
        sys.exit("pass --data-dir or set RNNLM_DATA_DIR")

    train_args = ["--cell", args.cell, "--data-dir", args.data_dir, "--device", "cpu", "--max-steps", str(args.steps)]
    if args.no_dropout:
        train_args += [a for kv in NO_DROPOUT for a in ("--set", kv)]
    plan = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2),
            (f"{args.nproc} processes (torchrun, gloo), 1 thread each", args.nproc, 1)]
    with tempfile.TemporaryDirectory(prefix="rnnlm-ddp-bench-") as tmp:
        rows = [run(name, n, t, train_args, Path(tmp) / f"run{i}") for i, (name, n, t) in enumerate(plan)]

    import torch

    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "cell": args.cell, "steps": args.steps, "dropout": not args.no_dropout}
    if args.json:
        print(json.dumps({"machine": machine, "runs": rows}, indent=2))
        return
    print(f"{machine}")
    print(f"{'run':46s} {'train tok/s':>11s} {'train ppl':>10s} {'valid ppl':>10s} {'wall s':>7s} {'load':>5s}")
    for r in rows:
        print(f"{r['run']:46s} {r['train_tok_per_s']:11,.0f} {r['train_ppl']:10.4f} {r['valid_ppl']:10.4f} "
              f"{r['wall_s']:7.1f} {r['load_before']:5.2f}")
    for r in rows:
        print(f"  {r['command']}")


if __name__ == "__main__":
    main()
