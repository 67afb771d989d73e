"""The one place that owns threads and devices.

A ``Runner`` is one model's worker: a single fixed OS thread (so per-thread torch state such as the current device,
the current CUDA stream and inference mode stays put, and CUDA graphs are replayed from the thread that captured
them) and, on CUDA, one stream of its own. Stage coroutines hand it synchronous functions with
``await runner.call(fn, ...)`` and never block the event loop themselves.

Cancelling the ``await`` does not stop a forward pass already running in the thread; calls are short and the thread
runs one call at a time, so ``drain`` (awaited with a timeout) is how shutdown waits for the thread to be idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["Runner", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; anything else is checked, not trusted."""
    from .errors import ConfigError

    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!s} was asked for but CUDA is not available on this machine")
        index = dev.index if dev.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!s} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!s}: use auto, cpu, cuda or cuda:N")
    return dev


class Runner:
    """One fixed worker thread (and CUDA stream) for one model."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        self._thread_id: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipespec-{name}",
                                            initializer=self._init_thread)
        self.busy_seconds = 0.0  # time spent inside calls, read by stats

    def _init_thread(self) -> None:
        self._thread_id = threading.get_ident()
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.stream = torch.cuda.Stream(self.device)

    def _run(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        stream_ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        start = time.perf_counter()
        try:
            with torch.inference_mode(), stream_ctx:
                return fn(*args, **kwargs)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def submit(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn`` on the worker thread; for synchronous callers (loading, tests)."""
        return self._executor.submit(self._run, fn, args, kwargs)

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn`` on the worker thread and await its result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every call submitted so far has finished (a no-op queued behind them). False on timeout.

        Callers that drain during cancellation run this inside a shielded cancel scope."""
        fut = self._executor.submit(lambda: None)
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            return False
        return True

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    @property
    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread_id
