"""The seam between the orchestrator and wherever a model's worker lives: the ``Runner`` protocol.

Stage coroutines and the scheduler only ever ``await runner.call("step", ...)``: a call names a worker method (see
``workers.base.CALLS``) and passes plain data (token ids, positions, sampling parameters, probability-row handles).
That is what lets a backend put the worker in a thread of this process (``runners.thread``, the default), in a process
of its own (``runners.process``) or in a Ray actor on any machine (``runners.ray``), without the stages noticing.

A runner serves one call at a time, in order. Cancelling an ``await`` does not stop a call already running; calls
are short, and ``drain`` (awaited with a timeout) is how shutdown waits for the runner to be idle.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

import torch

from ..workers.base import Worker, WorkerInfo

__all__ = ["Runner"]


@runtime_checkable
class Runner(Protocol):
    """One model's worker, wherever it lives, served one call at a time."""

    name: str
    device: torch.device
    busy_seconds: float  # time spent inside calls, read by stats

    async def start(self, factory: Callable[..., Worker], *args: Any, **kwargs: Any) -> WorkerInfo:
        """Build the worker where it will live (``factory(*args, **kwargs)``) and describe it."""
        ...

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run the worker's ``method`` and await its result without blocking the event loop."""
        ...

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue the worker's ``method`` without awaiting it (shutdown paths, synchronous callers)."""
        ...

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every call submitted so far has finished; False on timeout."""
        ...

    def close(self, wait: bool = True) -> None:
        """Stop serving calls and free the worker."""
        ...
