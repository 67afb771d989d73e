"""Synthetic acceptance at real shapes, on the CPU: real forward passes (a small real shape), oracle choices; every
mode commits the same tokens, and acceptance follows the configured rate."""

from __future__ import annotations

import torch

from helpers import limit
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline
from pipespec.analysis.oracle import Oracle
from pipespec.workers.synthetic import SyntheticWorker, random_llama


@limit(120)
async def test_synthetic_chain_is_lossless_and_accepts_at_the_rate() -> None:
    oracle = Oracle([0.8], seed=3)
    members = []
    for i in range(2):
        model = random_llama("68m", ["cpu", "cpu"] if i else ["cpu"], dtype=torch.float32)
        worker = SyntheticWorker(model, f"m{i}", torch.device("cpu"), oracle, i, capacity=256)
        members.append(Member(f"m{i}", ThreadRunner(f"s{i}", torch.device("cpu"), worker), worker.describe()))
    pipe = Pipeline(members, tokenizer=None)
    prompt = list(range(10, 30))
    outs = {}
    for mode in ("ar", "sd", "pipe"):
        g = await pipe.generate(prompt, max_new_tokens=40, mode=mode)
        outs[mode] = g.token_ids
        if mode == "sd":
            # per-token acceptance: accepted tokens over accepted plus rejected ones (one rejection per window at most)
            target = g.stats.stages[-1]
            alpha = target["accepted"] / (target["accepted"] + target["rollbacks_sent"])
            assert 0.6 < alpha < 0.95, alpha
    assert outs["ar"] == outs["sd"] == outs["pipe"]
    await pipe.aclose()
