"""The fast path of a model worker: a static KV cache, and on CUDA one captured graph per (tokens, context) bucket.

Forward passes are padded to a token bucket (1, 2, 4, ... 64) and attend over a context bucket (a multiple of 256
slots), so each shape is captured once and replayed: no Python per layer, no kernel-launch gaps, no allocation.
A rollback moves a length (``cached``); nothing is re-allocated. Runs on the model's runner thread, like the
eager worker it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .models import ModelWorker
from .static_llama import StaticLlama

__all__ = ["StaticWorker", "TOKEN_BUCKETS"]

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXT_STEP = 256  # context buckets are multiples of this
PAD = TOKEN_BUCKETS[-1]  # slack slots past the longest sequence, where padding rows write


def _bucket(n: int) -> int:
    for b in TOKEN_BUCKETS:
        if n <= b:
            return b
    return n  # longer than every bucket (a long prompt's prefill): eager, unpadded


class StaticWorker(ModelWorker):
    """A ``ModelWorker`` whose cache primitives run over ``StaticLlama`` (and CUDA graphs on CUDA)."""

    def __init__(self, model: Any, name: str, device: torch.device, *, graphs: bool | None = None,
                 capacity: int = 2048, compile: bool = False) -> None:
        super().__init__(model, name, device)
        self.static = StaticLlama(model, capacity + PAD)
        if compile:
            self.static.compile()
        # graphs are per device: a model split over GPUs runs its static path eagerly (launches overlap the GPUs)
        self.use_graphs = (device.type == "cuda" and len(self.static.devices) == 1) if graphs is None else graphs
        pin = device.type == "cuda"
        # host staging buffers per bucket, pinned so the copies to the device are asynchronous
        self._host = {b: (torch.zeros(b, dtype=torch.long, pin_memory=pin), torch.zeros(b, dtype=torch.long,
                                                                                         pin_memory=pin))
                      for b in TOKEN_BUCKETS}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None
        self.captures = 0  # graphs captured so far (for tests and stats)

    # -- cache primitives ---------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        self.cached = []
        if capacity is not None and self.static.ensure_capacity(capacity + PAD):
            self._graphs.clear()  # captured graphs point at the old cache tensors
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)

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
        if bucket in self._host:
            ids, pos = self._host[bucket]
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
        self.forwards += 1
        self.cached.extend(tokens)
        return logits[n - keep:n]

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        key = (ids.shape[0], kv_len)
        entry = self._graphs.get(key)
        if entry is None:
            return self._capture(key, ids, pos)
        graph, static_ids, static_pos, out = entry
        static_ids.copy_(ids, non_blocking=True)
        static_pos.copy_(pos, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, key: tuple[int, int], ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """First use of a shape: run it eagerly (its result is this call's answer), then capture it for later.

        The capture replays the same inputs' writes to the cache when it is next replayed, never stale ones: every
        replay first copies that call's own ids and positions into the static input buffers.
        """
        static_ids = ids.to(self.device, copy=True)
        static_pos = pos.to(self.device, copy=True)
        stream = torch.cuda.current_stream(self.device)
        result = self.static.forward(static_ids, static_pos, key[1]).clone()  # eager warm-up: real K/V, real logits
        stream.synchronize()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            out = self.static.forward(static_ids, static_pos, key[1])
        self._graphs[key] = (graph, static_ids, static_pos, out)
        self.captures += 1
        return result
