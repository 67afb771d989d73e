"""Acceptance math: how a stage chooses tokens and how it checks its predecessor's proposals.

Pure tensor code: no threads, no logging, no device placement of its own (tensors stay where they come from).

Notation, used in every function here:

- ``p``: the *drafter's* distribution (the stage that proposed the tokens), rows ``[n, vocab]``;
- ``q``: the *verifier's* distribution (the stage checking them), rows ``[n + 1, vocab]``: one row per proposed
  position plus one for the position after the last proposal;
- *accepted*: the proposed tokens the verifier keeps (always a prefix of the proposal);
- *correction*: the verifier's own token at the first rejected position;
- *bonus*: the verifier's own token after the last proposal when every proposed token was accepted.

Three rules decide tokens:

- ``greedy`` (temperature 0): every stage takes the argmax; verification keeps the longest prefix equal to the
  verifier's argmax. Lossless by construction.
- ``coupled`` (the default for temperature > 0): every stage samples position ``j`` by the Gumbel-max trick with
  the same noise, which depends on ``(seed, j)`` only. A stage's token at ``j`` is then a function of its own warped
  distribution and that noise, so verification is an exact match, as in greedy, and the target's output for a
  seed is exactly what the target alone samples with that seed, whatever the drafts and the timing
  (drafter-invariant speculative sampling; Daliri, Musco and Suresh 2024).
- ``rejection``: classic speculative sampling: accept a proposed ``x`` with probability ``min(1, q(x) / p(x))``; at
  the first rejection sample the correction from ``norm(max(0, q - p))``; when all are accepted sample the bonus
  from ``q``. The output at every position is distributed as ``q``, so the verifier's rows ``q`` serve as ``p`` for
  the next stage down the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Rule = Literal["greedy", "coupled", "rejection"]

__all__ = [
    "SamplingParams",
    "warp_logits",
    "gumbel_noise",
    "hashed_gumbel_noise",
    "seed_hash",
    "choose",
    "choose_on_device",
    "count_accepted",
    "rejection_verify",
    "rejection_verify_device",
    "sample",
]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How every stage of the chain turns logits into tokens. The same warping applies at every stage, so the
    output follows the target's *warped* distribution."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter
    seed: int = 0
    acceptance: Literal["coupled", "rejection"] = "coupled"

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.acceptance not in ("coupled", "rejection"):
            raise ValueError(f"acceptance must be 'coupled' or 'rejection', got {self.acceptance!r}")

    @property
    def rule(self) -> Rule:
        return "greedy" if self.temperature == 0 else self.acceptance

    @property
    def needs_probs(self) -> bool:
        """Whether proposals must carry the drafter's probability rows (only the rejection rule reads p)."""
        return self.rule == "rejection"


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order HF uses), in float32.

    logits: [n, vocab] -> [n, vocab], with filtered entries set to -inf.
    """
    x = logits.float() / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first token always stays
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors holding values < 2**32.

    The multiplier is below 2**31, so every product stays below 2**63: exact integer arithmetic, identical on
    every device and every backend, which is what makes the noise shared between stages on different GPUs.
    """
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h


def seed_hash(seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seed's part of the noise hash, [1] int64 on ``device`` (made once: building it copies from the host)."""
    return _mix32(torch.tensor([seed & _MASK32], dtype=torch.int64, device=device))


def gumbel_noise(seed: int, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise that depends only on (seed, position, token id).

    positions: [n] int64 (absolute sequence positions) -> [n, vocab] float32 on the same device.
    """
    return hashed_gumbel_noise(seed_hash(seed, positions.device), positions, vocab)


def hashed_gumbel_noise(seed_h: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """``gumbel_noise`` from the seed's hash (``seed_hash``) instead of the seed: device tensors only, no host data,
    so it can run inside a captured CUDA graph. positions: [n] int64 -> [n, vocab] float32."""
    device = positions.device
    row = _mix32((positions.to(torch.int64) * 0x2545F49 + seed_h) & _MASK32)  # [n]
    col = torch.arange(vocab, dtype=torch.int64, device=device) * 0x1B873593 & _MASK32  # [vocab]
    h = _mix32(_mix32(row[:, None] ^ col[None, :]) + 0x3C6EF372 & _MASK32)  # [n, vocab]
    # 24 high bits -> uniform in (0, 1), never 0 or 1, so both logs are finite
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def choose(logits: torch.Tensor, params: SamplingParams, positions: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A stage's own token at each position, and (rejection rule only) its probability rows.

    logits: [n, vocab] (row r predicts position positions[r]); positions: [n] int64.
    Returns tokens [n] int64 and probs [n, vocab] float32 or None.
    """
    if params.rule != "rejection":  # greedy and coupled: one definition, the device one
        return choose_on_device(logits, params, positions), None
    probs = torch.softmax(warp_logits(logits, params), dim=-1)
    return sample(probs, generator), probs


def choose_on_device(logits: torch.Tensor, params: SamplingParams, positions: torch.Tensor,
                     seed_h: torch.Tensor | None = None) -> torch.Tensor:
    """The greedy and coupled rules' tokens (``choose`` uses it for them) from device tensors only, the seed as
    ``seed_hash`` (made here from ``params.seed`` when None): what a multi-token draft inside one captured CUDA
    graph uses, so no drafted token needs a host sync. logits: [n, vocab]; positions: [n] int64 -> [n] int64."""
    if params.rule == "greedy":
        return torch.argmax(logits, dim=-1)
    if params.rule != "coupled":
        raise ValueError("the rejection rule samples with a generator on the host's schedule: use choose()")
    if seed_h is None:
        seed_h = seed_hash(params.seed, positions.device)
    warped = warp_logits(logits, params)
    return torch.argmax(warped + hashed_gumbel_noise(seed_h, positions, warped.shape[-1]), dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Independent samples, one per row. probs: [n, vocab] -> [n] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def count_accepted(proposed: Sequence[int], choices: Sequence[int]) -> int:
    """Exact-match verification (greedy and coupled rules): the length of the longest prefix of ``proposed``
    equal to the verifier's own choices at the same positions."""
    n = 0
    for drafted, own in zip(proposed, choices):
        if drafted != own:
            break
        n += 1
    return n


def rejection_verify(proposed: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """Speculative sampling over one window of proposals.

    proposed: [n] int64 drafted tokens; p: [n, vocab] drafter rows; q: [n + 1, vocab] verifier rows.
    Returns (accepted, next_token): ``accepted`` leading proposals are kept; ``next_token`` (0-dim int64) is the
    correction drawn from norm(max(0, q - p)) at the first rejected position, or the bonus drawn from q[n].
    (``rejection_verify_device`` without the read-back.)
    """
    accepted, next_token = rejection_verify_device(proposed, p, q, generator).tolist()
    return accepted, torch.tensor(next_token)


def rejection_verify_device(proposed: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                            generator: torch.Generator | None) -> torch.Tensor:
    """``rejection_verify`` decided on the device: [2] int64 (accepted, next_token), read back once by the caller.
    The same draws from ``generator`` (n uniforms, then one multinomial row) and the same rows as deciding on the
    host, so the same tokens; every choice between rows is a ``torch.where``, never a host branch on device data."""
    n = proposed.shape[0]
    if n:
        idx = proposed.view(n, 1)
        q_x = q[:n].gather(1, idx).squeeze(1)  # [n]
        p_x = p.gather(1, idx).squeeze(1)  # [n]
        u = torch.rand(n, generator=generator, device=q.device, dtype=torch.float32)
        # accept when u * p(x) <= q(x): the same as u <= min(1, q/p) without dividing by p(x)
        rejected = u * p_x > q_x  # [n]
        # the first rejected position, n where none was: the first maximum of [rejected..., True]
        accepted = torch.cat([rejected, rejected.new_ones(1)]).to(torch.int32).argmax()  # 0-dim int64
        at = accepted.clamp(max=n - 1).view(1)  # a row of p (unused when accepted == n)
        q_at = q.index_select(0, at)  # [1, vocab]
        residual = torch.clamp(q_at - p.index_select(0, at), min=0.0)  # [1, vocab]
        total = residual.sum()
        # q == p (up to rounding) leaves no residual; any rejection then came from rounding, so fall back to q
        correction = torch.where(total > 0, residual / total, q_at)
        row = torch.where(accepted < n, correction, q[n:n + 1])  # [1, vocab]
    else:
        accepted = torch.zeros((), dtype=torch.long, device=q.device)
        row = q[:1]
    next_token = sample(row, generator)  # [1]
    return torch.cat([accepted.view(1), next_token])
