"""Fakes for the reliability tests: a real tiny LLaMA that fails on cue and counts what it is asked to do.

Fakes, not mocks: the model runs real forward passes through the real runner threads; it only adds a counter, a
probe of the positions it sees and, when armed, an error raised from inside the forward pass (as a CUDA OOM or a
driver error would be).
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from typing import Any

import torch
from transformers import LlamaForCausalLM


class FaultyLlama(LlamaForCausalLM):
    """A LLaMA whose forward pass number ``fail_at`` (1-based, counted from construction or ``arm``) raises
    ``error``; every other call runs normally. ``calls`` counts forward passes, ``max_position`` is the largest
    position id it was asked to compute, ``raised_at`` the ``time.perf_counter()`` of the last injected failure."""

    fail_at: int | None = None
    error: BaseException = RuntimeError("injected fault")
    calls = 0
    max_position = -1
    raised_at: float | None = None

    def arm(self, fail_at: int | None, error: BaseException | None = None) -> None:
        self.calls, self.fail_at, self.raised_at = 0, fail_at, None
        if error is not None:
            self.error = error

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls += 1
        pos = kwargs.get("position_ids")
        if pos is not None:
            self.max_position = max(self.max_position, int(pos.max()))
        if self.fail_at is not None and self.calls == self.fail_at:
            self.raised_at = time.perf_counter()
            raise self.error
        return super().forward(*args, **kwargs)


FaultyLlama.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)  # type: ignore[attr-defined]


class WorkerFault:
    """A fault injected at the worker: wraps one worker's ``forward`` (every cache primitive of both the eager and
    the static-cache worker runs through it), so it reaches the static path, which never calls ``model.forward``.
    Same counters and semantics as ``FaultyLlama``: forward number ``fail_at`` (1-based, counted from ``arm``)
    raises ``error``."""

    def __init__(self, worker: Any, error: BaseException | None = None) -> None:
        self.worker, self.inner = worker, worker.forward
        self.error = error or RuntimeError("injected fault")
        self.calls, self.fail_at, self.raised_at = 0, None, None
        worker.forward = self.forward  # an instance attribute: the worker's own self.forward(...) calls find it

    def arm(self, fail_at: int | None, error: BaseException | None = None) -> None:
        self.calls, self.fail_at, self.raised_at = 0, fail_at, None
        if error is not None:
            self.error = error

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            self.raised_at = time.perf_counter()
            raise self.error
        return self.inner(*args, **kwargs)


def faulty(model: LlamaForCausalLM, fail_at: int | None = None,
           error: BaseException | None = None) -> FaultyLlama:
    """The same weights as ``model`` in a ``FaultyLlama``."""
    copy = FaultyLlama(model.config).to(model.dtype).eval()
    copy.load_state_dict(model.state_dict())
    copy.arm(fail_at, error)
    copy.generation_config.eos_token_id = model.generation_config.eos_token_id
    copy.generation_config.pad_token_id = None
    return copy


def oom() -> torch.OutOfMemoryError:
    """What PyTorch raises when a CUDA allocation fails (constructible without a GPU)."""
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.2 GiB total)")


def rss_mib() -> float:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def own_threads() -> int:
    """Threads other than anyio's pooled workers (idle ones linger until anyio next runs a job; not a leak)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("AnyIO worker"))
