"""Per-call overhead of each runner backend: how long `await runner.call(...)` takes for a call that does (almost)
nothing, minus that call made directly on the worker. Median of many calls, in microseconds.

The worker is the built-in tiny-draft (StaticWorker); the call is `rollback(0)` on an empty cache (a list slice).
Ray is measured when it is installed (a local Ray of one node, started here).

    python scripts/runner_overhead.py --calls 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from pipespec.loading import resolve_source
from pipespec.runners import Backend
from pipespec.workers import load_worker


async def measure(kind: str, calls: int) -> dict[str, float]:
    device = torch.device("cpu")
    [runner] = Backend(kind).runners(["tiny-draft"], [device])  # type: ignore[arg-type]
    try:
        await runner.start(load_worker, resolve_source("tiny-draft"), "tiny-draft", device, "auto", False, "auto")
        for _ in range(100):  # warm up: connections, caches
            await runner.call("rollback", 0)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await runner.call("rollback", 0)
            samples.append(time.perf_counter() - started)
        return {"median_us": statistics.median(samples) * 1e6,
                "p90_us": statistics.quantiles(samples, n=10)[-1] * 1e6}
    finally:
        runner.close()


def direct(calls: int) -> float:
    worker = load_worker(resolve_source("tiny-draft"), "tiny-draft", torch.device("cpu"), "auto", False, "auto")
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        worker.rollback(0)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--backends", default="thread,process,ray")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out: dict[str, object] = {"direct_us": direct(args.calls)}
    for kind in args.backends.split(","):
        if kind == "ray":
            try:
                import ray
            except ImportError:
                out["ray"] = "not installed"
                continue
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
        out[kind] = asyncio.run(measure(kind, args.calls))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
