"""``runners.hosting``: a stage's loop run beside its worker (the draft's), off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch

from helpers import limit
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
