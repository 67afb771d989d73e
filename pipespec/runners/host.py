"""The far side of an out-of-process runner: one worker, served by named calls, in a process (or actor) of its own.

``WorkerHost`` is what ``runners.process``'s child process and ``runners.ray``'s actor run: it builds the worker
with the factory it is sent, dispatches ``CALLS`` by name and swaps probability rows for handles on the way out and
back (a ``RowCodec``: the backend's way of sharing a tensor between processes). A call's error comes back as the
exception itself when it pickles (a ``torch.cuda.OutOfMemoryError`` stays one), else as a ``RuntimeError`` with the
type name and first line: the caller turns either into one ``PipelineError`` line that names the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import time
from typing import Any, Protocol

import torch

from ..errors import first_line
from ..workers.base import CALLS, StepResult, Worker, WorkerInfo

__all__ = ["RowCodec", "WorkerHost", "portable_error"]


class RowCodec(Protocol):
    """How one backend shares a stage's probability rows with the next stage's process."""

    def publish(self, probs: torch.Tensor) -> Any:
        """A small picklable handle for ``probs`` ([m, vocab]), valid until the caller forgets it."""
        ...

    def resolve(self, handle: Any) -> torch.Tensor:
        """The tensor behind a handle another host published (the same object for the same handle)."""
        ...


class WorkerHost:
    """One worker where it lives, with torch set up for serving it (no autograd, its device current, and on CUDA a
    stream of its own, as the thread backend gives each worker: CUDA graphs cannot be captured on the default
    stream, so a static worker served on it fails its first capture)."""

    def __init__(self, device: str, threads: int | None, codec: RowCodec) -> None:
        self.device = torch.device(device)
        self.codec = codec
        self.worker: Worker | None = None
        torch.set_grad_enabled(False)
        if threads:
            torch.set_num_threads(threads)  # the parent's intra-op setting (several stages share the cores)
        self.stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.stream = torch.cuda.Stream(self.device)

    def _serving(self) -> contextlib.ExitStack:
        """Inference mode and the worker's stream, around everything the worker runs."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.stream is not None:
            stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def start(self, payload: bytes) -> WorkerInfo:
        """Build the worker: ``payload`` is ``pickle.dumps((factory, args, kwargs))`` (plain pickle: a model object
        handed over is copied, not moved into shared memory behind its owner's back)."""
        factory, args, kwargs = pickle.loads(payload)
        with self._serving():
            self.worker = factory(*args, **kwargs)
        return self.worker.describe()

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        """Run ``method`` on the worker; returns (its result with rows published, seconds spent)."""
        if self.worker is None:
            raise RuntimeError("no worker: start() was not called")
        # a worker may serve more calls by name (``extra_calls``: a measuring tool's, e.g. SyntheticWorker's)
        extra = getattr(self.worker, "extra_calls", ())
        if method not in CALLS and method not in extra:
            raise ValueError(f"{method!r} is not a worker call (one of {', '.join((*CALLS, *extra))})")
        started = time.perf_counter()
        if method == "step":
            args, kwargs = self._resolve_rows(args, kwargs)
        with self._serving():
            value = getattr(self.worker, method)(*args, **kwargs)
        if isinstance(value, StepResult) and value.probs is not None:
            value = dataclasses.replace(value, probs=self.codec.publish(value.probs))
        return value, time.perf_counter() - started

    def _resolve_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``step(seq, start, params, proposal_probs)``: the rows arrive as (handle, row) pairs."""
        rows = kwargs.get("proposal_probs", args[3] if len(args) > 3 else None)
        if not rows:
            return args, kwargs
        opened: dict[int, torch.Tensor] = {}  # one tensor per handle: rows of one proposal stay one slice
        resolved = []
        for handle, row in rows:
            if id(handle) not in opened:
                opened[id(handle)] = self.codec.resolve(handle)
            resolved.append((opened[id(handle)], row))
        if "proposal_probs" in kwargs:
            return args, {**kwargs, "proposal_probs": resolved}
        return (*args[:3], resolved, *args[4:]), kwargs


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (type and message intact), else a RuntimeError naming its type."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc.with_traceback(None)
    except Exception:  # noqa: BLE001 - any unpicklable error is reduced to its name and first line
        return RuntimeError(f"{type(exc).__name__}: {first_line(exc, 300)}")
