"""The 1 MiB prompt over HTTP for several bundles and thread pools, alternated: `rnnlm serve` as a
subprocess per run, POST /v1/completions {max_tokens: 1} with PTB valid repeated to 1 MiB while
another client probes /v2/health/ready every 20 ms (``bench/long_prompt.py``'s ``over_http``).

    python bench/prompt_http.py BUNDLE [BUNDLE ...] [--pools shared,per-session] [--passes 2] [--threads 2]
                               [--json FILE]

Each pass runs every bundle under every pool in turn, so that a slow minute on a shared machine falls
on all of them alike. Printed: one line per run (status, seconds, health max and probes >= 100 ms),
then each bundle and pool's times.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from long_prompt import one_mib, over_http


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("RNNLM_DATA_DIR", "../shared/data/ptb")))
    ap.add_argument("--pools", default="shared,per-session", help="rnnlm serve --thread-pool values to compare")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="rnnlm serve --threads")
    ap.add_argument("--json", type=Path, default=None, help="write every run here")
    args = ap.parse_args()
    prompt = one_mib(args.data)
    runs: list[dict[str, Any]] = []
    for _ in range(args.passes):
        for bundle in args.bundles:
            for pool in args.pools.split(","):
                status, seconds, health = over_http(bundle, prompt, args.threads, pool)
                runs.append({"bundle": str(bundle), "pool": pool, "status": status, "seconds": seconds,
                             "health_max_ms": max(health) * 1e3, "probes": len(health),
                             "probes_over_100ms": sum(h >= 0.1 for h in health)})
                r = runs[-1]
                print(f"{bundle} ({pool}): {status} in {seconds:.2f} s; /v2/health/ready max {r['health_max_ms']:.1f} ms, "
                      f"{r['probes_over_100ms']} of {r['probes']} probes >= 100 ms", flush=True)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in runs:
        times[(r["bundle"], r["pool"])].append(r["seconds"])
    for (bundle, pool), secs in times.items():
        print(f"{bundle} ({pool}): " + ", ".join(f"{s:.2f}" for s in secs) + " s")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
