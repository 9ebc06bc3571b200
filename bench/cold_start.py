"""Where the cold start of `rnnlm score` goes: each layer timed as its own fresh process, side by side.

    python bench/cold_start.py BUNDLE [BUNDLE ...] [--repeat 5]

For each bundle, the median of ``--repeat`` fresh processes (interleaved, so that load changes fall on
all rows alike) of:
  python          the interpreter alone (`python -c pass`)
  imports         `import numpy, onnxruntime` (what any onnxruntime program pays)
  cli imports     `import rnnlm.cli` + the score path's modules (typer, the runtime)
  load            `LanguageModel.load(bundle, eager=False)` in-process after the imports: sha256 of every
                  file (on threads) + the scoring graph's session + its probe
  session only    onnxruntime session creation of score.onnx from bytes, with the runtime's options
  rnnlm score     the whole command on a one-line file
The difference between the floor (python + imports + cli imports) and the goal is what a faster
load must fit in.

rnnlm's own modules are byte-compiled first (``compile_bytecode``), as pip does when it installs a
package: with PYTHONDONTWRITEBYTECODE set (as on the development machines) an editable checkout
would otherwise recompile them at every start (+0.04 s), which no installed copy does.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SESSION = """
import time, onnxruntime as ort
data = open({path!r}, 'rb').read()
o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
o.enable_mem_reuse = False; o.inter_op_num_threads = 1
t = time.perf_counter(); ort.InferenceSession(data, o, providers=['CPUExecutionProvider']); print(time.perf_counter() - t)
"""
LOAD = """
import time
import rnnlm.serve.runtime as r
t = time.perf_counter(); r.LanguageModel.load({path!r}, device='cpu', eager=False); print(time.perf_counter() - t)
"""


def compile_bytecode() -> None:
    """Byte-compile rnnlm, rnnlm.export and rnnlm.serve where they live (their __pycache__ folders)."""
    import rnnlm.serve

    import rnnlm

    folders = {str(Path(rnnlm.__file__).parent), str(Path(rnnlm.serve.__file__).parent)}
    folders.add(str(Path(rnnlm.serve.__file__).parent.parent / "export"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", *sorted(folders)], check=True)


def score_one_line(bundle: Path, repeat: int = 5) -> float:
    """Median wall time of `rnnlm score` on a one-line file, in fresh processes (bytecode compiled first)."""
    compile_bytecode()
    exe = str(Path(sys.executable).with_name("rnnlm"))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("the stock market fell\n")
    try:
        return statistics.median(wall([exe, "score", f.name, "--model", str(bundle), "--device", "cpu"])
                                 for _ in range(repeat))
    finally:
        Path(f.name).unlink()


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def inner(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    compile_bytecode()
    exe = str(Path(sys.executable).with_name("rnnlm"))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("the stock market fell\n")
    rows: dict[str, dict[str, list[float]]] = {str(b): {} for b in args.bundles}
    for _ in range(args.repeat):
        for b in args.bundles:
            r = rows[str(b)]
            r.setdefault("python", []).append(wall([sys.executable, "-c", "pass"]))
            r.setdefault("imports", []).append(wall([sys.executable, "-c", "import numpy, onnxruntime"]))
            r.setdefault("cli imports", []).append(wall([sys.executable, "-c", "import rnnlm.cli, rnnlm.serve.cli_impl"]))
            r.setdefault("load", []).append(inner(LOAD.format(path=str(b))))
            r.setdefault("session only", []).append(inner(SESSION.format(path=str(b / "score.onnx"))))
            r.setdefault("rnnlm score", []).append(wall([exe, "score", f.name, "--model", str(b), "--device", "cpu"]))
    Path(f.name).unlink()
    for b, r in rows.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        size = sum(p.stat().st_size for p in Path(b).iterdir()) / 1e6
        print(f"{b} ({size:.1f} MB): " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))


if __name__ == "__main__":
    main()
