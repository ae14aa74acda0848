"""Cached pipeline run vs an empty Prefect flow with the same number of tasks.

    .venv/bin/python benchmarks/cached_run_overhead.py [--profile tiny] [--repeats 3] [--out benchmarks/results/cached_run_overhead.json]

Both are measured in one process on the same Prefect (ephemeral) server after one warm-up run, so the
ratio shows the pipeline's own overhead per node (key computation, store lookup), not server start-up.
The pipeline must already have run once (this script runs it first if not). Target: ratio <= 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dagtune.config import load_config  # noqa: E402
from dagtune.pipeline import NODE_ORDER  # noqa: E402
from dagtune.runner import prepare_environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_config(profile=args.profile)
    prepare_environment(cfg)

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from dagtune.run_request import RunRequest
    from flows.pipeline import dagtune_pipeline

    @task
    def noop(i: int, upstream: list | None = None) -> int:
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def empty_flow(n: int) -> list[int]:
        prev = None
        out = []
        for i in range(n):  # a chain like the DAG: each task waits for the previous one
            prev = noop.submit(i, [prev] if prev is not None else None)
            out.append(prev)
        return [f.result() for f in out]

    n = len(NODE_ORDER)
    t = time.time()
    dagtune_pipeline(
        run=RunRequest(profile=cfg.profile or None)
    )  # builds anything missing; then everything is cached
    first = time.time() - t
    empty_flow(n)  # warm-up

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        fn(*a, **kw)
        return time.perf_counter() - t0

    cached = [
        timed(dagtune_pipeline, run=RunRequest(profile=cfg.profile or None)) for _ in range(args.repeats)
    ]
    empty = [timed(empty_flow, n) for _ in range(args.repeats)]
    res = {
        "benchmark": "cached_run_overhead",
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": __import__("os").cpu_count(),
        "profile": cfg.profile,
        "nodes": n,
        "first_run_seconds": round(first, 3),
        "cached_run_seconds_median": round(statistics.median(cached), 3),
        "empty_flow_seconds_median": round(statistics.median(empty), 3),
        "ratio": round(statistics.median(cached) / statistics.median(empty), 3),
        "cached_runs": [round(x, 3) for x in cached],
        "empty_runs": [round(x, 3) for x in empty],
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
