"""A process's one generation on a GPU, with and without ``warm_up`` (what ``pipespec run`` is): one fresh process
per run, so every graph is cold. Prints one JSON line: load, warm-up and generation seconds, tokens/s, wall.

    python scripts/gpu_warm_up.py --chain family --mode ar --tokens 256 [--warm-up]
    python scripts/gpu_warm_up.py --chain 68m,7b --alpha 0.9 --mode sd --tokens 256 [--warm-up]   # synthetic

``family``: the built-in family on cuda:0 (``Pipeline.load``). Otherwise random-weight models of real shapes with
synthetic acceptance (``workers.synthetic``, as ``gpu_pipe_probe.py``), all on cuda:0, a 128-token prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

import pipespec
from pipespec.analysis.oracle import Oracle
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline
from pipespec.workers.synthetic import build_synthetic


async def load(chain: str, alpha: float, device: str) -> tuple[Pipeline, object]:
    if chain == "family":
        pipe = await pipespec.Pipeline.load(["tiny-draft", "tiny-middle", "tiny-target"], device=device)
        return pipe, "def fibonacci(n):"
    shapes = chain.split(",")
    members = []
    for i, shape in enumerate(shapes):
        runner = ThreadRunner(f"{shape}@{device}", torch.device(device))
        info = await runner.start(build_synthetic, shape, device, Oracle([alpha] * (len(shapes) - 1)), i,
                                  capacity=1024)
        members.append(Member(shape, runner, info))
    oracle = Oracle([alpha] * (len(shapes) - 1), seed=0, vocab=members[0].info.vocab_size)
    for i, m in enumerate(members):
        await m.runner.call("configure", oracle=oracle, stage=i)
    return Pipeline(members, tokenizer=None), list(range(3, 131))


async def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    pipe, prompt = await load(args.chain, args.alpha, args.device)
    loaded = time.perf_counter()
    async with pipe:
        warmed = await pipe.warm_up(pipe.make_request(prompt, max_new_tokens=args.tokens, mode=args.mode)) \
            if args.warm_up else False
        ready = time.perf_counter()
        g = await pipe.generate(prompt, max_new_tokens=args.tokens, mode=args.mode)
        done = time.perf_counter()
    print(json.dumps({"chain": args.chain, "alpha": args.alpha, "mode": args.mode, "warm_up": args.warm_up,
                      "warmed": warmed, "load_s": round(loaded - t0, 3), "warm_up_s": round(ready - loaded, 3),
                      "generation_s": round(done - ready, 3), "tokens": g.stats.tokens,
                      "tokens_per_s": round(g.stats.tokens / (done - ready), 1),
                      "warm_up_and_generation_s": round(done - loaded, 3), "ids": hash(g.token_ids)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--chain", default="family")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--mode", default="ar")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--warm-up", action="store_true")
    parser.add_argument("--device", default="cuda:0")
    asyncio.run(main(parser.parse_args()))
