"""Synthetic acceptance at real shapes: real forward passes of random-weight models of real sizes (so every stage
costs what it would on the device), with token choices decided by a seeded ``Oracle`` at a set acceptance rate.

Every figure measured this way is labelled *synthetic acceptance*: it shows what the orchestrator does at real costs
for a given alpha, not how well any real draft model agrees with any real target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .static import StaticWorker
from .base import ProbRows, StepResult
from ..analysis.oracle import Oracle
from .simulated import OracleChoices
from ..verify import SamplingParams

__all__ = ["SyntheticWorker", "SHAPES", "random_llama"]

SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {  # hidden, layers, heads, kv heads, ffn, vocab
    "68m": (768, 2, 12, 12, 3072, 32000),
    "160m": (768, 12, 12, 12, 3072, 32000),
    "1b": (2048, 16, 32, 8, 8192, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "8b": (4096, 32, 32, 8, 14336, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "70b": (8192, 80, 64, 8, 28672, 32000),
}


def random_llama(shape: str, devices: Sequence[str | torch.device], dtype: torch.dtype = torch.bfloat16) -> Any:
    """A LlamaForCausalLM of a real shape with random weights, its layers split evenly over ``devices``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # no real memory yet: weights are created on their devices
    devs = [torch.device(d) for d in devices]
    per = -(-layers // len(devs))
    placement = {"model.embed_tokens": devs[0], "model.norm": devs[-1], "lm_head": devs[-1]}
    for i in range(layers):
        placement[f"model.layers.{i}"] = devs[min(i // per, len(devs) - 1)]
    for name, device in placement.items():
        module = model.get_submodule(name)
        module.to_empty(device=device)
        for p in module.parameters():  # random, not zeros: zeros can run faster than real data
            if p.dim() > 1:
                p.data.normal_(0, 0.02)
            else:
                p.data.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(devs[0])  # meta buffers -> real ones
    model.eval()
    return model


class SyntheticWorker(OracleChoices, StaticWorker):
    """Real forward passes over the static path; token choices from the oracle (greedy only)."""

    def __init__(self, model: Any, name: str, device: torch.device, oracle: Oracle, stage: int,
                 capacity: int = 2048) -> None:
        super().__init__(model, name, device, capacity=capacity)
        self.oracle = oracle
        self.stage = stage
        self._hashes = [oracle.root]  # _hashes[p] names cached[:p]
        self._prompt_len: int | None = None

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        super().reset(seed, capacity)
        self._hashes = [self.oracle.root]
        self._prompt_len = None

    def release(self) -> None:
        super().release()
        self._hashes = [self.oracle.root]

    def rollback(self, length: int) -> None:
        super().rollback(length)
        del self._hashes[length + 1:]

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        out = super().forward(tokens, position, keep)
        h = self._hashes[-1]
        for t in tokens:
            h = self.oracle.extend(h, t)
            self._hashes.append(h)
        return out

    def _wait(self, logits: torch.Tensor) -> None:
        # the oracle does not read the logits, but the stage must not get ahead of its device: wait as the real
        # worker's .tolist() would
        logits[-1, :1].tolist()

    def prefill(self, prompt: Sequence[int]) -> bool:
        self._learn_prompt(len(prompt))
        return super().prefill(prompt)

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult:
        if params.rule != "greedy":
            raise ValueError("synthetic acceptance is greedy only")
        self._learn_prompt(start)
        self._wait(self.logits(seq, start))
        return self._verdict(seq, start)

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        self._learn_prompt(len(seq))
        work = list(seq)
        if n > 1 and self.device_draft:
            # the real multi-token draft's cost (one graph, one sync: StaticWorker._device_draft), then the
            # oracle's choices; the cache then holds K/V of the device's own tokens, which nothing reads (the
            # oracle decides), while ``cached`` and the hashes name the oracle's tokens, as after per-token drafts
            self._device_draft(seq, n, SamplingParams())  # feeds seq's missing tail via forward (hashes kept)
            work.append(self._choice(len(work)))
            for _ in range(n - 1):
                self.cached.append(work[-1])
                self._hashes.append(self.oracle.extend(self._hashes[-1], work[-1]))
                work.append(self._choice(len(work)))
            return StepResult(0, tuple(work[len(seq):]))
        for _ in range(n):
            self._wait(self.logits(work, len(work)))
            work.append(self._choice(len(work)))
        return StepResult(0, tuple(work[len(seq):]))
