"""``runners.hosting``: a stage's loop run beside its worker (every stage's but the target's), off the event loop."""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch

from helpers import limit
from pipespec.apps.simulate import simulated_pipeline
from pipespec.runners.hosting import host_loop
from pipespec.runners.thread import ThreadRunner


class Napper:
    """A worker whose one call sleeps (like a forward pass) and says on which thread it ran."""

    def nap(self, seconds: float) -> int:
        time.sleep(seconds)
        return threading.get_ident()


class SubmitOnly:
    """A runner with no ``host_loop`` (a worker in another process, say): only named calls through ``submit``."""

    name = "remote"
    device = torch.device("cpu")
    busy_seconds = 0.0
    deadline = 5.0

    def __init__(self) -> None:
        self.worker = Napper()
        self.pool = ThreadPoolExecutor(1)
        self.calls = 0

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls += 1
        return self.pool.submit(getattr(self.worker, method), *args, **kwargs)


@limit(10)
async def test_a_thread_runner_hosts_the_loop_on_the_workers_own_thread_timing_only_the_calls() -> None:
    runner = ThreadRunner("r", torch.device("cpu"), Napper())
    try:
        worker_thread = await runner.run(threading.get_ident)

        def loop(call: Any) -> tuple[int, int, int]:
            first = call("nap", 0.02)
            time.sleep(0.05)  # waiting between calls (for a verdict) is not busy time
            return threading.get_ident(), first, call("nap", 0.02)

        here, first, second = await asyncio.wrap_future(host_loop(runner, loop))
        assert here == first == second == worker_thread
        assert 0.035 < runner.busy_seconds < 0.065, runner.busy_seconds
    finally:
        runner.close()


@limit(10)
async def test_elsewhere_the_loop_runs_on_a_thread_of_its_own_through_the_runners_calls() -> None:
    runner = SubmitOnly()
    try:
        def loop(call: Any) -> tuple[int, int]:
            return threading.get_ident(), call("nap", 0.0)

        here, worker = await asyncio.wrap_future(host_loop(runner, loop))  # type: ignore[arg-type]
        assert here not in (worker, threading.get_ident()) and runner.calls == 1
    finally:
        runner.pool.shutdown()


@limit(10)
async def test_a_loops_error_reaches_its_awaiter() -> None:
    runner = ThreadRunner("r", torch.device("cpu"), Napper())
    try:
        def loop(call: Any) -> None:
            call("missing")

        with pytest.raises(AttributeError):
            await asyncio.wrap_future(host_loop(runner, loop))
        assert await runner.call("nap", 0.0)  # the thread serves calls again
    finally:
        runner.close()


@limit(60)
async def test_only_the_target_calls_its_worker_through_the_event_loop() -> None:
    """Every stage but the target runs its loop on its worker's thread (the draft's and the middle's: ``stages``),
    so their forwards are plain calls there and cost the event loop nothing; only the target, which feeds the
    output, calls through ``Runner.call``. Lossless all the same."""
    prompt = list(range(3, 19))
    async with simulated_pipeline([0.3, 2.0, 5.0], [0.8, 0.8], seed=2, vocab=1000) as pipe:
        want = (await pipe.generate(prompt, max_new_tokens=40, mode="ar")).token_ids
        through_loop: collections.Counter[tuple[int, str]] = collections.Counter()
        for i, member in enumerate(pipe.members):
            def spy(method: str, *args: Any, _i: int = i, _real: Any = member.runner.call, **kwargs: Any) -> Any:
                through_loop[_i, method] += 1
                return _real(method, *args, **kwargs)
            member.runner.call = spy  # type: ignore[method-assign]
        g = await pipe.generate(prompt, max_new_tokens=40, mode="pipe", adaptive=False)
        assert g.token_ids == want
        # the generation's set-up resets every worker from the loop; then only the target's calls come through it
        assert {key for key in through_loop if key[0] < 2} == {(0, "reset"), (1, "reset")}, through_loop
        assert through_loop[2, "step"] >= 5 and through_loop[0, "reset"] == through_loop[1, "reset"] == 1
        assert g.stats.stages[1]["forwards"] > 1 and g.stats.stages[0]["forwards"] > 1, g.stats.stages


@limit(60)
async def test_a_middle_stage_driven_on_the_event_loop_is_lossless(monkeypatch: pytest.MonkeyPatch) -> None:
    """``stages.verifier`` writes the verifier's loop once, for two drivers: on a thread (every middle stage) and on
    the event loop (the target). A middle stage on the event loop (``build_stages(on_loop=...)``) also sends
    proposals down from there; its output is still the target's alone, and its calls come through the loop."""
    from pipespec.scheduler import pipeline, run

    prompt = list(range(3, 19))
    async with simulated_pipeline([0.3, 2.0, 5.0], [0.8, 0.8], seed=3, vocab=1000) as pipe:
        want = (await pipe.generate(prompt, max_new_tokens=40, mode="ar")).token_ids
        monkeypatch.setattr(pipeline, "build_stages", functools.partial(run.build_stages, on_loop=(1,)))
        through_loop: collections.Counter[str] = collections.Counter()
        real = pipe.members[1].runner.call

        def spy(method: str, *args: Any, **kwargs: Any) -> Any:
            through_loop[method] += 1
            return real(method, *args, **kwargs)

        pipe.members[1].runner.call = spy  # type: ignore[method-assign]
        for mode in ("pipe", "sd"):
            g = await pipe.generate(prompt, max_new_tokens=40, mode=mode, adaptive=False)
            assert g.token_ids == want, mode
            assert g.stats.stages[1]["forwards"] > 1 and g.stats.stages[2]["accepted"] > 0, g.stats.stages
        assert through_loop["verify"] + through_loop["step"] > 2, through_loop
