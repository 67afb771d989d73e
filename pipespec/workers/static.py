"""The fast path of a model worker: a static KV cache, and on CUDA one captured graph per (tokens, context) bucket.

Forward passes are padded to a token bucket (1, 2, 4, ... 64) and attend over a context bucket (a multiple of 256
slots), so each shape is captured once and replayed: no Python per layer, no kernel-launch gaps, no allocation.
A rollback moves a length (``cached``); nothing is re-allocated. Runs on the model's runner thread, like the
eager worker it replaces.

Graphs are captured only between generations (in ``reset``), never while other stages run: a capture on one
thread while another thread launches work or allocates on the same GPU fails ("operation not permitted when
stream is capturing"). A shape first met during a generation runs eagerly (same kernels, same results) and is
captured at the next ``reset``; captures are serialised across workers by a process-wide lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .base import LogitsWorker
from .static_llama import StaticLlama

__all__ = ["StaticWorker", "TOKEN_BUCKETS"]

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXT_STEP = 256  # context buckets are multiples of this
PAD = TOKEN_BUCKETS[-1]  # slack slots past the longest sequence, where padding rows write
_CAPTURE = threading.Lock()  # one capture at a time in the process


def _bucket(n: int) -> int:
    for b in TOKEN_BUCKETS:
        if n <= b:
            return b
    return n  # longer than every bucket (a long prompt's prefill): eager, unpadded


class StaticWorker(LogitsWorker):
    """A ``LogitsWorker`` whose cache primitives run over ``StaticLlama`` (any supported family; CUDA graphs on
    CUDA)."""

    def __init__(self, model: Any, name: str, device: torch.device, *, graphs: bool | None = None,
                 capacity: int = 2048, compile: bool = False) -> None:
        super().__init__(model, name, device)
        self.static = StaticLlama(model, capacity + PAD)
        if compile:
            self.static.compile()
        # graphs are per device: a model split over GPUs runs its static path eagerly (launches overlap the GPUs);
        # PIPESPEC_CUDA_GRAPHS=0 turns them off (a safety valve: same kernels, launched one by one)
        if graphs is None:
            graphs = device.type == "cuda" and len(self.static.devices) == 1
            graphs = graphs and os.environ.get("PIPESPEC_CUDA_GRAPHS", "1") != "0"
        self.use_graphs = graphs
        pin = device.type == "cuda"
        # host staging buffers per bucket, pinned so the copies to the device are asynchronous
        self._host = {b: (torch.zeros(b, dtype=torch.long, pin_memory=pin), torch.zeros(b, dtype=torch.long,
                                                                                         pin_memory=pin))
                      for b in TOKEN_BUCKETS}
        self._copied: dict[int, Any] = {}  # bucket -> CUDA event recorded after its buffers were last copied out
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None
        self._wanted: set[tuple[int, int]] = set()  # shapes met eagerly, to capture at the next reset
        self.captures = 0  # graphs captured so far (for tests and stats)

    # -- cache primitives ---------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        self.cached = []
        if capacity is not None and self.static.ensure_capacity(capacity + PAD):
            self._wanted.update(self._graphs)
            self._graphs.clear()  # captured graphs point at the old cache tensors
            # and a fresh pool for the new ones: once its last graph is gone the old pool is released (freeable),
            # and capturing into a released pool id is not something the caching allocator supports
            self._pool = None
        if self.use_graphs and self._wanted:
            self.capture_pending()
        self._seed(seed)

    def release(self) -> None:
        self.cached = []  # the static cache stays allocated: the next generation reuses it

    def rollback(self, length: int) -> None:
        del self.cached[length:]

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        assert position == len(self.cached), "forward must continue the cached sequence"
        n = len(tokens)
        end = position + n
        if end + PAD > self.static.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds the static cache ({self.static.capacity - PAD})")
        bucket = _bucket(n)
        # attend over a multiple of CONTEXT_STEP slots that covers every (padded) position of this call
        kv_len = min(-(-(position + bucket) // CONTEXT_STEP) * CONTEXT_STEP, self.static.capacity)
        staged = bucket in self._host
        if staged:
            ids, pos = self._host[bucket]
            copied = self._copied.get(bucket)
            if copied is not None:  # the last asynchronous copy out of this pinned buffer must be done first
                copied.synchronize()
            ids[:n] = torch.tensor(list(tokens), dtype=torch.long)
            ids[n:] = 0
            torch.arange(position, position + bucket, out=pos)  # padding rows write past the end
        else:
            ids = torch.tensor(list(tokens), dtype=torch.long)
            pos = torch.arange(position, position + bucket, dtype=torch.long)
        if self.use_graphs and bucket in TOKEN_BUCKETS:
            logits = self._replay(ids, pos, kv_len)
        else:
            logits = self.static.forward(ids.to(self.device, non_blocking=True), pos.to(self.device, non_blocking=True),
                                         kv_len)
        if staged and self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[bucket] = event
        self.forwards += 1
        self.cached.extend(tokens)
        return logits[n - keep:n]

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        key = (ids.shape[0], kv_len)
        entry = self._graphs.get(key)
        if entry is None:  # not captured yet: run eagerly now, capture at the next reset
            self._wanted.add(key)
            return self.static.forward(ids.to(self.device, non_blocking=True),
                                       pos.to(self.device, non_blocking=True), kv_len)
        graph, static_ids, static_pos, out = entry
        static_ids.copy_(ids, non_blocking=True)
        static_pos.copy_(pos, non_blocking=True)
        graph.replay()
        return out

    def capture_pending(self) -> None:
        """Capture every shape met since the last reset. Call only while no generation runs (from ``reset``).

        Warm-up and capture write junk K/V at slots 0..bucket-1: harmless, the cache is logically empty here, and
        every replay copies its own call's ids and positions into the static input buffers first.
        """
        stream = torch.cuda.current_stream(self.device)
        with _CAPTURE:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            for key in sorted(self._wanted):
                bucket, kv_len = key
                if key in self._graphs or bucket + PAD > self.static.capacity:
                    continue
                static_ids = torch.zeros(bucket, dtype=torch.long, device=self.device)
                static_pos = torch.arange(bucket, dtype=torch.long, device=self.device)
                for _ in range(2):  # warm-up on the capturing stream (lazy library initialisation, workspaces)
                    self.static.forward(static_ids, static_pos, kv_len)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    out = self.static.forward(static_ids, static_pos, kv_len)
                self._graphs[key] = (graph, static_ids, static_pos, out)
                self.captures += 1
            self._wanted.clear()

    def warm_up(self, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), context: int = 2 * CONTEXT_STEP) -> None:
        """Capture the common shapes ahead of the first generation (optional; benchmarks call it)."""
        if not self.use_graphs:
            return
        for bucket in buckets:
            for kv_len in range(CONTEXT_STEP, min(context, self.static.capacity) + 1, CONTEXT_STEP):
                if bucket <= kv_len:
                    self._wanted.add((bucket, kv_len))
        self.capture_pending()
