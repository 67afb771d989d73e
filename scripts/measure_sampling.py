"""Acceptance of the two sampling rules at several temperatures, on the same chain and prompts (lock-step `sd`
mode, whose acceptance does not depend on timing).

    python scripts/measure_sampling.py [--models tiny-draft,tiny-middle,tiny-target] [--n 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pipespec
from pipespec.prompts import load_prompts


async def main(args: argparse.Namespace) -> None:
    prompts = load_prompts(args.prompts)[: args.n]
    rows = []
    async with pipespec.Pipeline.load(args.models.split(","), device=args.device) as pipe:
        for temperature in (0.0, 0.5, 1.0, 1.5):
            for rule in (("coupled", "rejection") if temperature else ("greedy",)):
                totals = [[0, 0] for _ in pipe.members[1:]]
                for seed, prompt in enumerate(prompts):
                    g = await pipe.generate(prompt, max_new_tokens=args.tokens, mode="sd", temperature=temperature,
                                            seed=seed, acceptance="coupled" if rule == "greedy" else rule)
                    for t, stage in zip(totals, g.stats.stages[1:]):
                        t[0] += stage["accepted"]
                        t[1] += stage["proposed"]
                row = {"temperature": temperature, "rule": rule,
                       "acceptance": [round(a / p, 3) if p else None for a, p in totals]}
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny-draft,tiny-middle,tiny-target")
    parser.add_argument("--prompts", default="text")
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    asyncio.run(main(parser.parse_args()))
