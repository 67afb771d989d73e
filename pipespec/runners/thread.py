"""The thread backend: the worker lives in this process, on one fixed OS thread of its own.

One fixed thread per model, so per-thread torch state (the current device, the current CUDA stream, inference mode)
stays put and CUDA graphs are replayed from the thread that captured them; on CUDA the thread also has a stream of
its own. ``call`` dispatches a worker method by name (the ``Runner`` protocol); ``run`` runs any function on the
thread, for what only an in-process caller may do (loading a model object it was handed, measuring, HF baselines).
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

from ..workers.base import Worker, WorkerInfo

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["ThreadRunner"]


class ThreadRunner:
    """One fixed worker thread (and CUDA stream) for one model; implements ``runners.base.Runner``."""

    def __init__(self, name: str, device: torch.device, worker: Worker | None = None) -> None:
        self.name = name
        self.device = device
        self.worker = worker  # built on the thread by ``start``, or handed in (simulated workers, tests)
        self.stream: torch.cuda.Stream | None = None
        self._thread_id: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipespec-{name}",
                                            initializer=self._init_thread)
        self.busy_seconds = 0.0

    def _init_thread(self) -> None:
        self._thread_id = threading.get_ident()
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.stream = torch.cuda.Stream(self.device)

    def _stream(self) -> contextlib.AbstractContextManager[Any]:
        """The worker's own CUDA stream as the current one (nothing on the CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _timed(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """``fn(*args, **kwargs)``, its time added to ``busy_seconds``."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy_seconds += time.perf_counter() - start

    def _run(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        with torch.inference_mode(), self._stream():
            return self._timed(fn, args, kwargs)

    def _method(self, method: str) -> Callable[..., Any]:
        if self.worker is None:
            raise RuntimeError(f"runner {self.name} has no worker: call start() first")
        return getattr(self.worker, method)

    # -- the Runner protocol --------------------------------------------------------------------------------------

    async def start(self, factory: Callable[..., Worker], *args: Any, **kwargs: Any) -> WorkerInfo:
        self.worker = await self.run(factory, *args, **kwargs)
        return self.worker.describe()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # The worker thread settles a plain loop future through call_soon_threadsafe: no concurrent Future chained
        # to an asyncio one (wrap_future's callbacks, lock and state copy); ~25 % less event-loop CPU per call,
        # which the pipeline pays several times per token (docs/analysis.md, "Orchestrator overhead").
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._executor.submit(self._serve, loop, fut, self._method(method), args, kwargs)
        return await fut

    def _serve(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], fn: Callable[..., Any],
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if fut.cancelled():  # the caller gave up before the call started (as wrap_future would cancel it)
            return
        try:
            value, failed = self._run(fn, args, kwargs), False
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(_settle, fut, value, failed)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._executor.submit(self._run, self._method(method), args, kwargs)

    def host_loop(self, fn: Callable[[Callable[..., Any]], R]) -> Future[R]:
        """Run ``fn(call)`` on the worker thread (``runners.hosting``): ``call(method, *args)`` calls the worker
        directly, timed into ``busy_seconds`` as a runner call is, while the time ``fn`` spends between calls
        (waiting for verdicts) is not. The thread serves nothing else until ``fn`` returns."""
        worker = self.worker
        if worker is None:
            raise RuntimeError(f"runner {self.name} has no worker: call start() first")

        def call(method: str, *args: Any, **kwargs: Any) -> Any:
            return self._timed(getattr(worker, method), args, kwargs)

        def body() -> R:
            with torch.inference_mode(), self._stream():
                return fn(call)

        return self._executor.submit(body)

    async def drain(self, timeout: float = 10.0) -> bool:
        """Callers that drain during cancellation run this inside a shielded cancel scope."""
        fut = self._executor.submit(lambda: None)
        try:
            await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            return False
        return True

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    # -- in-process extras ----------------------------------------------------------------------------------------

    def submit_fn(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run any ``fn`` on the worker thread; for synchronous callers (tests, scripts)."""
        return self._executor.submit(self._run, fn, args, kwargs)

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run any ``fn`` on the worker thread and await its result."""
        return await asyncio.wrap_future(self.submit_fn(fn, *args, **kwargs))

    @property
    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread_id


def _settle(fut: asyncio.Future[Any], value: Any, failed: bool) -> None:
    """On the loop thread: hand a call's result (or error) to its awaiting coroutine, unless it was cancelled."""
    if fut.cancelled():
        return
    if failed:
        fut.set_exception(value)
    else:
        fut.set_result(value)
