"""The general model worker: HF transformers' own forward pass over its dynamic KV cache.

Every causal LM transformers can load runs here; LLaMA-architecture models take the faster static path
(``workers.static``) by default. Decisions (verify, draft, prefill) are ``LogitsWorker``'s; this module owns only the
cache primitives.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .base import LogitsWorker

__all__ = ["HFWorker"]


class HFWorker(LogitsWorker):
    """One causal LM with HF's ``DynamicCache``. Every method runs on the model's runner thread."""

    def __init__(self, model: Any, name: str, device: torch.device) -> None:
        super().__init__(model, name, device)
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values -> cache (5.2x); accept both
        self._cache_kw = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.cache: Any = None

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.config)
        self.cached = []
        self._seed(seed)

    def release(self) -> None:
        self.cache = None
        self.cached = []

    def rollback(self, length: int) -> None:
        if length < len(self.cached):
            self.cache.crop(length - len(self.cached))  # negative: the number of entries to drop
            del self.cached[length:]

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        assert position == len(self.cached), "forward must continue the cached sequence"
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # [1, n]
        pos = torch.arange(position, position + len(tokens), device=self.device).unsqueeze(0)  # [1, n]
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True, "position_ids": pos}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, **kwargs)
        self.forwards += 1
        self.cached.extend(tokens)
        return out.logits[0, -keep:]
