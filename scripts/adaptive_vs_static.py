"""Adaptive runtime vs static configurations, on simulated stages in the real scheduler (CPU).

For each chain configuration: tokens/s of `pipe` with the adaptive policy, with the default static configuration
(verify cap 64, max-ahead 64), and with every static (verify cap, max-ahead) in a grid; the best static is the
yardstick. Simulated stages sleep for their latency (plus a per-token verify cost), so the CPU's own speed matters
little, but a loaded machine still adds noise: each figure is the median of --repeats runs.

    python scripts/adaptive_vs_static.py --repeats 3 --tokens 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from pipespec.simworker import simulated_pipeline

CONFIGS = [
    # (latencies ms, acceptance, verify cost per token ms)
    ([0.5, 5, 20], [0.8, 0.8], 0.0),
    ([1, 10], [0.6], 0.5),  # verification cost grows with the window: a CPU-like target
    ([2, 20], [0.9], 0.0),
    ([1, 4], [0.5], 0.3),  # a draft barely cheaper than its target, poor acceptance
]
GRID = [(cap, ahead) for cap in (4, 8, 16, 64) for ahead in (4, 16, 64)]


async def rate(pipe, prompt: list[int], tokens: int, repeats: int, **options) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = await pipe.generate(prompt, max_new_tokens=tokens, mode="pipe", **options)
        runs.append(g.stats.tokens / (time.perf_counter() - t0))
    return statistics.median(runs)


async def main(args: argparse.Namespace) -> None:
    prompt = list(range(3, 19))
    for latencies, acceptance, cost in CONFIGS:
        async with simulated_pipeline(latencies, acceptance, verify_cost_per_token_ms=cost) as pipe:
            adaptive = await rate(pipe, prompt, args.tokens, args.repeats, adaptive=True)
            default = await rate(pipe, prompt, args.tokens, args.repeats, adaptive=False)
            grid = {}
            for cap, ahead in GRID:
                grid[(cap, ahead)] = await rate(pipe, prompt, args.tokens, args.repeats, adaptive=False,
                                                verify_cap=cap, max_ahead=ahead)
            best = max(grid, key=grid.get)
            print(json.dumps({"latencies_ms": latencies, "acceptance": acceptance, "verify_cost_ms": cost,
                              "adaptive": round(adaptive, 1), "default_static": round(default, 1),
                              "best_static": round(grid[best], 1), "best_static_config": best,
                              "adaptive_over_best": round(adaptive / grid[best], 3),
                              "adaptive_over_default": round(adaptive / default, 3)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
