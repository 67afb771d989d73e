"""A model of the chain as its worker thread sees it: weights, KV cache, forward passes and the stage's token choices.

Synchronous code, always run through the model's ``Runner`` (one fixed thread per model). The event loop never
calls into this module directly and never reads a tensor.

The KV cache always holds exactly the keys and values of ``self.cached`` (a token list). A call names the whole
sequence it wants logits for; the worker keeps the longest cached prefix that agrees with it, crops the rest (that
is the rollback: the entries past the divergence point are dropped), and forwards only the new tokens. So a
rollback costs nothing until the next forward, and a stale cache cannot survive a change of sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .verify import SamplingParams, choose, count_accepted, rejection_verify

__all__ = ["ModelWorker", "StepResult", "ProbRows", "common_prefix", "make_worker"]

# Rows of a proposer's probabilities: (tensor [m, vocab], row index) per proposed position.
ProbRows = Sequence[tuple[torch.Tensor, int]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case: one extends the other; a C-speed comparison
        return n
    lo, hi = 0, n  # binary search on prefix equality keeps it O(n) C work with O(log n) Python steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one forward pass of a stage decided.

    ``accepted`` leading proposals were kept; ``tokens`` are the kept proposals followed by the stage's own next
    token (correction or bonus), so ``len(tokens) == accepted + 1``. ``probs`` (rejection rule only) holds the
    stage's own rows q for those positions, ``[len(tokens), vocab]``: the p of the next stage down the chain.
    """

    accepted: int
    tokens: tuple[int, ...]
    probs: torch.Tensor | None = None


class ModelWorker:
    """One causal LM with its KV cache. Every method runs on the model's runner thread."""

    # Whether its forward passes compete for its device with other stages placed there (a simulated worker sleeps).
    contends = True

    def __init__(self, model: Any, name: str, device: torch.device) -> None:
        self.model = model
        self.name = name
        self.device = device
        self.config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0) or None
        params = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values -> cache (5.2x); accept both
        self._cache_kw = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.cache: Any = None
        self.cached: list[int] = []
        self.forwards = 0
        self.generator: torch.Generator | None = None

    # -- KV cache primitives -------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        """Forget the cache (start of a generation); seed this stage's generator for the rejection rule.
        ``capacity`` (the longest sequence of the generation) matters only to static caches."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.config)
        self.cached = []
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)

    def release(self) -> None:
        """Free the KV cache between generations (memory stays flat across many generations)."""
        self.cache = None
        self.cached = []

    def rollback(self, length: int) -> None:
        """Drop cache entries past ``length`` tokens."""
        if length < len(self.cached):
            self.cache.crop(length - len(self.cached))  # negative: the number of entries to drop
            del self.cached[length:]

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        """Forward ``tokens`` at ``position`` (== cache length) and return logits of the last ``keep`` of them.

        Returns [keep, vocab] float logits.
        """
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

    def prefill(self, prompt: Sequence[int]) -> bool:
        """Fill the cache with all but the last prompt token, so the first decision forwards a short window.
        Returns whether a forward pass ran (not for a one-token prompt)."""
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)
        self.rollback(keep)
        if keep < len(prompt) - 1:
            self.forward(prompt[keep:-1], keep, 1)
            return True
        return False

    def logits(self, seq: Sequence[int], first: int) -> torch.Tensor:
        """Logits predicting positions ``first .. len(seq)`` of ``seq`` (the last row predicts the next token).

        Returns [len(seq) - first + 1, vocab]. Reuses the cache for the longest agreeing prefix.
        """
        if first < 1 or first > len(seq):
            raise ValueError(f"first={first} must be in [1, {len(seq)}]")
        keep_cache = min(common_prefix(self.cached, seq), first - 1)
        self.rollback(keep_cache)
        return self.forward(seq[keep_cache:], keep_cache, len(seq) - first + 1)

    # -- stage decisions ----------------------------------------------------------------------------------------

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult:
        """Verify ``seq[start:]`` (proposals, possibly none) in one forward pass and choose the next token.

        With no proposals this is one ordinary decoding step.
        """
        n = len(seq) - start
        logits = self.logits(seq, start)  # [n + 1, vocab]
        positions = torch.arange(start, len(seq) + 1, device=logits.device)  # [n + 1]
        if params.rule != "rejection" or n == 0:
            own, q = choose(logits, params, positions, self.generator)  # [n + 1], [n + 1, vocab] | None
            choices = own.tolist()
            accepted = count_accepted(seq[start:], choices)
            tokens = tuple(seq[start:start + accepted]) + (choices[accepted],)
            rows = q[: accepted + 1] if q is not None else None
            return StepResult(accepted, tokens, rows)
        assert proposal_probs is not None and len(proposal_probs) == n, "rejection needs the proposer's rows"
        _, q = choose(logits, params, positions, self.generator)  # q: [n + 1, vocab]
        assert q is not None
        p = gather_rows(proposal_probs, self.device)  # [n, vocab]
        proposed = torch.tensor(list(seq[start:]), dtype=torch.long, device=self.device)
        accepted, nxt = rejection_verify(proposed, p, q, self.generator)
        tokens = tuple(seq[start:start + accepted]) + (int(nxt),)
        return StepResult(accepted, tokens, q[: accepted + 1])

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        """Draft ``n`` tokens after ``seq``, one forward pass each (``accepted`` is 0: nothing was proposed)."""
        work = list(seq)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(n):
            logits = self.logits(work, len(work))  # [1, vocab]
            positions = torch.tensor([len(work)], device=logits.device)
            own, q = choose(logits, params, positions, self.generator)
            token = int(own[0])
            tokens.append(token)
            work.append(token)
            if q is not None:
                rows.append(q)
        return StepResult(0, tuple(tokens), torch.cat(rows) if rows else None)


def gather_rows(rows: ProbRows, device: torch.device) -> torch.Tensor:
    """Stack per-position probability rows (views into the proposer's tensors) on ``device``: [n, vocab]."""
    pieces: list[torch.Tensor] = []
    i = 0
    while i < len(rows):
        tensor, first = rows[i]
        j = i + 1
        # consecutive rows of one proposal tensor become one slice instead of n single-row copies
        while j < len(rows) and rows[j][0] is tensor and rows[j][1] == first + (j - i):
            j += 1
        pieces.append(tensor[first:first + (j - i)])
        i = j
    out = torch.cat([piece.to(device, non_blocking=False) for piece in pieces])
    return out.float()


def make_worker(model: Any, name: str, device: torch.device, fast: bool | str = "auto") -> ModelWorker:
    """The fast static-cache worker where it applies (``fast="auto"``: LLaMA models), else HF's eager forward.

    ``fast=True`` asks for the static path on any device (CUDA graphs only on CUDA) and fails if the model does
    not support it; ``fast="compile"`` adds torch.compile; ``fast=False`` always uses HF's own forward.
    """
    from .static_llama import supports_static

    if fast == "auto":  # LLaMA-architecture models take the static path anywhere (on the CPU too: ~25% faster)
        fast = supports_static(model) is None
    if not fast:
        return ModelWorker(model, name, device)
    from .fastworker import StaticWorker

    # "compile": also fuse each layer's element-wise work with torch.compile (slower start, faster steps)
    return StaticWorker(model, name, device, compile=fast == "compile")
