"""Stage bypass is lossless: whatever sub-chain the adaptive runtime switches to, and however often, the chain
commits the target's own tokens (greedy: token for token; coupled sampling: seed for seed).

``Flipping`` stands in for the policy: it switches at every look (every few milliseconds), cycling through every
sub-chain that ends at the target, so relaying, pausing, and catching up after coming back all happen many times
in one generation, at arbitrary moments.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import pipespec
from conftest import noisy_copy
from helpers import hf_greedy, limit, slow, target_alone
from pipespec.scheduler.policy import ChainMonitor
from pipespec.apps.simulate import simulated_pipeline

PROMPT = [5, 17, 33, 2, 9]


class Flipping(ChainMonitor):
    def __init__(self, stages: int, interval: float = 0.003) -> None:
        super().__init__(stages, interval=interval)
        self._cycle = itertools.cycle(self.candidates()[::-1])  # the whole chain first

    def decide(self, now: float) -> tuple[int, ...] | None:
        self.active = next(self._cycle)
        self.switches += 1
        return self.active


def bypasses(g: pipespec.Generation) -> int:
    return sum(s["bypasses"] for s in g.stats.stages)


@pytest.mark.parametrize("length", [3, 4])
@pytest.mark.parametrize("fast", [False, True], ids=["hf-forward", "static-cache"])
@limit(120)
async def test_greedy_equals_target_alone_while_the_chain_changes(length: int, fast: bool,
                                                                  target: torch.nn.Module) -> None:
    drafts = [noisy_copy(target, 0.5 - 0.15 * i, 30 + i) for i in range(length - 1)]
    want = hf_greedy(target, PROMPT, 40)
    async with pipespec.Pipeline.load([*drafts, slow(target, 0.004)], device="cpu", fast=fast) as pipe:
        pipe.monitor = Flipping(length)
        switched = 0
        for _ in range(3):
            g = await pipe.generate(PROMPT, max_new_tokens=40, mode="pipe")
            assert list(g.token_ids) == want
            switched += bypasses(g)
        assert switched > 0 and pipe.monitor.switches > 5


@limit(180)
async def test_coupled_sampling_is_seed_for_seed_the_target_while_the_chain_changes(target: torch.nn.Module) -> None:
    drafts = [noisy_copy(target, 0.5, 40), noisy_copy(target, 0.3, 41)]
    async with pipespec.Pipeline.load([*drafts, slow(target, 0.003)], device="cpu", fast=False) as pipe:
        pipe.monitor = Flipping(3)
        for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 0.9)]:
            for seed in range(4):
                opts = dict(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
                alone = await pipe.generate(PROMPT, mode="ar", **opts)
                g = await pipe.generate(PROMPT, mode="pipe", **opts)
                assert g.token_ids == alone.token_ids, (temperature, top_k, top_p, seed)


@limit(60)
async def test_simulated_chain_with_flipping_bypass_commits_the_target_alone_tokens() -> None:
    async with simulated_pipeline([0.1, 0.6, 1.5, 3.0], [0.8, 0.6, 0.7], seed=4, vocab=1000) as pipe:
        want = target_alone(pipe.members[0].worker.oracle, PROMPT, 120)  # type: ignore[attr-defined]
        pipe.monitor = Flipping(4, interval=0.002)
        for verify_cap in (4, 64):
            g = await pipe.generate(PROMPT, max_new_tokens=120, mode="pipe", verify_cap=verify_cap)
            assert list(g.token_ids) == want
            assert bypasses(g) > 0


@limit(60)
async def test_a_bypassed_stage_runs_no_forward_passes() -> None:
    """Pinned to draft -> target, the middle model relays: its only forward pass is its prefill; the target checks
    the draft's tokens itself."""
    async with simulated_pipeline([0.1, 1.0, 1.5], [1.0, 1.0], seed=4, vocab=1000) as pipe:
        pipe.monitor = ChainMonitor(3, active=(0, 2), interval=1e9)
        g = await pipe.generate(PROMPT, max_new_tokens=60, mode="pipe")
        draft, middle, tgt = g.stats.stages
        assert middle["forwards"] == 1 and middle["proposed"] == 0 and middle["bypasses"] == 1
        assert tgt["proposed"] > 0 and tgt["accepted"] == tgt["proposed"]  # identical models: all accepted
        assert draft["forwards"] > 60
        g = await pipe.generate(PROMPT, max_new_tokens=60, mode="pipe", adaptive=False)  # off: no bypass
        assert g.stats.stages[1]["forwards"] > 1 and g.stats.stages[1]["bypasses"] == 0
