"""Synthetic acceptance at real shapes, on the CPU: real forward passes (a small real shape), oracle choices; every
mode commits the same tokens, and acceptance follows the configured rate."""

from __future__ import annotations

import asyncio

import pytest
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


TINY = {"tiny-d": (64, 1, 4, 4, 128, 512), "tiny-t": (128, 2, 4, 4, 256, 512)}


@limit(120)
async def test_synthetic_workers_in_processes_serve_named_calls_and_match_threads() -> None:
    """What the GPU probe does on every backend: build the worker where it lives (``build_synthetic``, pickled into
    a worker process), then set it up and measure it only through named calls (``configure``, ``warm_up``,
    ``standalone_ms``). The process chain commits the thread chain's tokens for each oracle it is configured with."""
    from pipespec.runners.process import ProcessRunner
    from pipespec.workers.synthetic import build_synthetic

    prompt = list(range(10, 26))
    outs: dict[str, list[tuple[int, ...]]] = {}
    for backend in ("thread", "process"):
        runners = [ThreadRunner(f"t{i}", torch.device("cpu")) if backend == "thread"
                   else ProcessRunner(f"p{i}", torch.device("cpu"), threads=1) for i in range(2)]
        try:
            infos = await asyncio.gather(*(  # the worker processes import and build at once
                r.start(build_synthetic, shape, "cpu", Oracle([0.5], seed=1, vocab=512), 0, dims=dims, capacity=128)
                for r, (shape, dims) in zip(runners, TINY.items())))
            members = [Member(info.name, r, info) for r, info in zip(runners, infos)]
            for i in range(2):
                await runners[i].call("configure", stage=i)
                assert await runners[i].call("warm_up") == 0  # no graphs on the CPU: the count, by name
                one, eight = await runners[i].call("standalone_ms", prompt, repeats=2)
                assert 0 < one and 0 < eight
            pipe = Pipeline(members, tokenizer=None)
            outs[backend] = []
            for alpha in (0.2, 0.9):
                for r in runners:
                    await r.call("configure", oracle=Oracle([alpha], seed=int(10 * alpha), vocab=512))
                await runners[0].call("configure", device_draft=alpha > 0.5)
                g = await pipe.generate(prompt, max_new_tokens=12, mode="pipe")
                assert g.token_ids == (await pipe.generate(prompt, max_new_tokens=12, mode="ar")).token_ids
                outs[backend].append(g.token_ids)
        finally:
            for r in runners:
                r.close()
    assert outs["thread"] == outs["process"]
    assert outs["thread"][0] != outs["thread"][1]  # the oracle (its seed) was swapped: other target tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@limit(300)
async def test_synthetic_worker_in_a_process_captures_graphs_on_cuda() -> None:
    """A worker process serves its static worker on a stream of its own (``WorkerHost``): on the default stream
    the first graph capture fails. Graphs captured, multi-token drafts replayed, pipe commits ar's tokens."""
    from pipespec.runners.process import ProcessRunner
    from pipespec.workers.synthetic import build_synthetic

    runners = [ProcessRunner(f"g{i}", torch.device("cuda", 0)) for i in range(2)]
    try:
        infos = await asyncio.gather(*(
            r.start(build_synthetic, shape, "cuda:0", Oracle([0.8], seed=2, vocab=512), i, dims=dims, capacity=256)
            for i, (r, (shape, dims)) in enumerate(zip(runners, TINY.items()))))
        assert await runners[0].call("warm_up", (1, 2, 4, 8), 256, draft_sizes=(1, 3, 7)) > 0
        assert await runners[1].call("warm_up", (1, 2, 4, 8), 256) > 0
        pipe = Pipeline([Member(info.name, r, info) for r, info in zip(runners, infos)], tokenizer=None)
        prompt = list(range(10, 26))
        ar = await pipe.generate(prompt, max_new_tokens=24, mode="ar")
        assert (await pipe.generate(prompt, max_new_tokens=24, mode="pipe")).token_ids == ar.token_ids
        assert (await pipe.generate(prompt, max_new_tokens=24, mode="sd")).token_ids == ar.token_ids
    finally:
        for r in runners:
            r.close()
