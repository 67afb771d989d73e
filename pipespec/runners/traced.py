"""A ``Runner`` wrapper that records the host span of every call on its stage's trace track (any backend).

The span runs from the moment the stage asks for the call to the moment its coroutine resumes with the result: the
worker's own time plus the round trip (queueing behind the runner's previous call, the wake-up of the event loop).
Compare it with the same call's span on the stage's GPU track (CUDA only) to see where a stage's time goes.

Only a traced generation wraps its runners, so an untraced one pays nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..tracing import StageTrace
from ..workers.base import Worker, WorkerInfo
from .base import Runner

__all__ = ["TracedRunner"]


class TracedRunner:
    """Implements ``runners.base.Runner`` by delegating to ``inner``; anything else (``run``, ``worker``...) is the
    inner runner's."""

    def __init__(self, inner: Runner, trace: StageTrace) -> None:
        self.inner = inner
        self.trace = trace
        self.name = inner.name
        self.device = inner.device

    @property
    def busy_seconds(self) -> float:
        return self.inner.busy_seconds

    async def start(self, factory: Callable[..., Worker], *args: Any, **kwargs: Any) -> WorkerInfo:
        return await self.inner.start(factory, *args, **kwargs)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await self.inner.call(method, *args, **kwargs)
        finally:
            self.trace.span(method, began)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.inner.submit(method, *args, **kwargs)

    async def drain(self, timeout: float = 10.0) -> bool:
        return await self.inner.drain(timeout)

    def close(self, wait: bool = True) -> None:
        self.inner.close(wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
