"""Adaptive runtime vs static configurations, on simulated stages in the real scheduler (CPU).

For each chain configuration: tokens/s of `pipe`
- with the adaptive policy (verify caps, run-ahead limits and stage bypass), starting cold every generation (a fresh
  ChainMonitor, so nothing is carried over from an earlier run);
- with the default static configuration (the whole chain, verify cap 64, max-ahead 64);
- with every static configuration: each sub-chain that ends at the target (the target alone included) x verify
  cap x max-ahead; the best of them is the yardstick.
Acceptance is given as recorded traces (one 0/1 per generated position, drawn once at the configured rate), so that
a sub-chain can be simulated with exactly the agreement its stages have inside the whole chain: a draft token
reaches the target iff every link between them agrees at that position (the AND of their traces). With rates
instead, each chain would draw its own random agreements, and luck would differ between the contenders.
Simulated stages sleep for their latency (plus a per-token verify cost), so the CPU's own speed matters little, but
a loaded machine still adds noise: each figure is the median of --repeats runs.

    python scripts/adaptive_vs_static.py --repeats 3 --tokens 300
    python scripts/adaptive_vs_static.py --family --repeats 3 --tokens 96   # the built-in family, real models, CPU

With ``--family``, the same comparison on the built-in model family (tiny-draft, tiny-middle, tiny-target) on the
CPU, over the first prompts of the ``text`` set: real forward passes, real acceptance, and stages that contend for
the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time

from pipespec.apps.simulate import simulated_pipeline

CONFIGS = [
    # (latencies ms, acceptance, verify cost per token ms)
    ([0.5, 5, 20], [0.8, 0.8], 0.0),
    ([1, 10], [0.6], 0.5),  # verification cost grows with the window: a CPU-like target
    ([2, 20], [0.9], 0.0),
    ([1, 4], [0.5], 0.3),  # a draft barely cheaper than its target, poor acceptance
    ([1, 9, 10], [0.8, 0.5], 0.0),  # a middle stage nearly as slow as the target that agrees poorly with it
    ([1, 8, 10], [0.9, 0.6], 0.0),
]
GRID = [(cap, ahead) for cap in (4, 16, 64) for ahead in (4, 16, 64)]


async def rate(pipe, prompts: list[list[int]], tokens: int, repeats: int, cold: bool = False, **options) -> float:
    """Median over ``repeats`` of committed tokens/s through every prompt in turn. ``cold``: a fresh monitor for
    every generation (nothing carried over from earlier runs)."""
    runs = []
    for _ in range(repeats):
        committed, seconds = 0, 0.0
        for prompt in prompts:
            if cold:
                pipe.monitor = pipe.fresh_monitor()
            t0 = time.perf_counter()
            g = await pipe.generate(prompt, max_new_tokens=tokens, mode="pipe", **options)
            seconds += time.perf_counter() - t0
            committed += g.stats.tokens
        runs.append(committed / seconds)
    return statistics.median(runs)


def summary(adaptive: float, warm: float, default: float, grid: dict) -> dict:
    """The comparison printed for one chain: adaptive (cold and warm) against the default and the best static."""
    best = max(grid, key=grid.get)
    return {"adaptive": round(adaptive, 1), "adaptive_warm": round(warm, 1),
            "default_static": round(default, 1), "best_static": round(grid[best], 1),
            "best_static_config": {"chain": best[0], "verify_cap": best[1], "max_ahead": best[2]},
            "adaptive_over_best": round(adaptive / grid[best], 3),
            "adaptive_warm_over_best": round(warm / grid[best], 3),
            "adaptive_over_default": round(adaptive / default, 3)}


TRACE_LENGTH = 499  # prime, and longer than a generation: no short period lines up with the windows


def traces(acceptance: list[float], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[int(rng.random() < a) for _ in range(TRACE_LENGTH)] for a in acceptance]


def sub_chains(latencies: list[float], links: list[list[int]]):
    k = len(latencies)
    for r in range(k):
        for drafts in itertools.combinations(range(k - 1), r):
            chain = (*drafts, k - 1)
            acc = [[int(all(links[i][j] for i in range(a, b))) for j in range(TRACE_LENGTH)]
                   for a, b in zip(chain, chain[1:])]
            yield chain, [latencies[i] for i in chain], acc


async def main(args: argparse.Namespace) -> None:
    prompts = [list(range(3, 19))]
    only = {int(x) for x in args.only.split(",")} if args.only else None
    for index, (latencies, acceptance, cost) in enumerate(CONFIGS):
        if only is not None and index not in only:
            continue
        links = traces(acceptance)
        async with simulated_pipeline(latencies, links, verify_cost_per_token_ms=cost) as pipe:
            adaptive = await rate(pipe, prompts, args.tokens, args.repeats, cold=True, adaptive=True)
            warm = await rate(pipe, prompts, args.tokens, args.repeats, adaptive=True)  # carried over, as in chat
            default = await rate(pipe, prompts, args.tokens, args.repeats, adaptive=False)
        grid = {}
        for chain, lat, acc in sub_chains(latencies, links):
            async with simulated_pipeline(lat, acc, verify_cost_per_token_ms=cost) as pipe:
                for cap, ahead in (GRID if len(chain) > 1 else GRID[:1]):  # the target alone: no caps
                    grid[(chain, cap, ahead)] = await rate(pipe, prompts, args.tokens, args.repeats, adaptive=False,
                                                           verify_cap=cap, max_ahead=ahead)
        print(json.dumps({"latencies_ms": latencies, "acceptance": acceptance, "verify_cost_ms": cost,
                          **summary(adaptive, warm, default, grid)}), flush=True)


async def family(args: argparse.Namespace) -> None:
    import torch

    from pipespec import Pipeline
    from pipespec.prompts import load_prompts

    torch.set_num_threads(1)
    names = ["tiny-draft", "tiny-middle", "tiny-target"]
    prompts = load_prompts("text")[:args.prompts]

    async with Pipeline.load(names, device="cpu") as pipe:
        ids = [list(pipe.encode(p)) for p in prompts]
        adaptive = await rate(pipe, ids, args.tokens, args.repeats, cold=True, adaptive=True)
        warm = await rate(pipe, ids, args.tokens, args.repeats, adaptive=True)  # carried over, as in chat
        default = await rate(pipe, ids, args.tokens, args.repeats, adaptive=False)
    grid = {}
    for r in range(len(names)):
        for drafts in itertools.combinations(names[:-1], r):
            chain = (*drafts, names[-1])
            async with Pipeline.load(list(chain), device="cpu") as pipe:
                for cap, ahead in (GRID if len(chain) > 1 else GRID[:1]):  # the target alone: no caps
                    grid[(chain, cap, ahead)] = await rate(pipe, ids, args.tokens, args.repeats, adaptive=False,
                                                           verify_cap=cap, max_ahead=ahead)
    print(json.dumps({"chain": names, "prompts": len(prompts), "tokens": args.tokens,
                      **summary(adaptive, warm, default, grid)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", action="store_true", help="the built-in model family on the CPU")
    parser.add_argument("--prompts", type=int, default=3, help="--family: how many prompts of the text set")
    parser.add_argument("--only", default="", metavar="I,J", help="run only these CONFIGS (0-based indices)")
    ns = parser.parse_args()
    asyncio.run(family(ns) if ns.family else main(ns))
