"""Simulated models for the real orchestrator: ``SimulatedWorker`` sleeps instead of computing, and agrees with its
successor at a configured rate (its choices come from ``analysis.oracle.Oracle``).

The pipeline, its stages, channels and runners are the real ones; only the model worker is fake. So what it
measures is the orchestrator itself, at real time scales (``apps.simulate`` compares that with the analytical
model and the discrete-event simulation of the same chain).

Every choice is a deterministic function of the prefix, as a real greedy model's is, so ``pipe``, ``sd`` and ``ar``
must commit identical tokens: a real losslessness check of the scheduler. A forward pass takes
``latency(tokens fed)`` seconds, spent in ``time.sleep`` on the runner thread; sleeping releases the GIL like a GPU
kernel, so the stages overlap exactly as they would on one device each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from ..analysis.oracle import Oracle
from ..errors import ConfigError
from ..verify import SamplingParams
from .base import ProbRows, StepResult, WorkerInfo, common_prefix

__all__ = ["OracleChoices", "SimulatedWorker"]


class OracleChoices:
    """Greedy choices from an ``Oracle``, for a worker whose ``_hashes[p]`` names ``cached[:p]``: shared by the
    sleeping ``SimulatedWorker`` here and the real-shape ``synthetic.SyntheticWorker``."""

    oracle: Oracle
    stage: int
    _hashes: list[int]
    _prompt_len: int | None

    def _learn_prompt(self, length: int) -> None:
        # Traces are indexed from the end of the prompt. Every mode's first call after ``reset`` names it:
        # ``prefill(prompt)`` (pipe, ar), ``draft(prompt, n)`` (sd's stage 0) or ``step(seq, len(prompt))`` (sd).
        if self._prompt_len is None:
            self._prompt_len = length

    def _choice(self, position: int) -> int:
        assert self._prompt_len is not None
        return self.oracle.choice(self.stage, self._hashes[position], position - self._prompt_len)

    def _verdict(self, seq: Sequence[int], start: int) -> StepResult:
        """After ``seq`` was fed: the longest prefix of ``seq[start:]`` equal to this model's own choices, then its
        choice at the first mismatch (or the bonus). ``seq[:start + accepted]`` was fed, so the hashes cover it."""
        accepted = 0
        while start + accepted < len(seq) and self._choice(start + accepted) == seq[start + accepted]:
            accepted += 1
        return StepResult(accepted, tuple(seq[start:start + accepted]) + (self._choice(start + accepted),))


class SimulatedWorker(OracleChoices):
    """A ``Worker`` with no model: choices come from an ``Oracle``, forward passes are sleeps.

    It keeps the same bookkeeping as the real worker (``cached`` is the sequence "in the KV cache"; a call keeps the
    longest agreeing prefix and "forwards" the rest), so a forward is charged for exactly the tokens a real model
    would feed: one for a decode, 1 + n to verify n proposals, more after a rollback adopted other tokens.
    Greedy only.
    """

    contends = False  # sleeping takes nothing from the other stages

    def __init__(self, oracle: Oracle, stage: int, latency_s: Callable[[int], float], name: str, *,
                 max_window: int | None = None) -> None:
        self.name = name
        self.max_window = max_window  # reported by ``describe``: stands in for a quantized model's kernel limit
        self.device = torch.device("cpu")
        self.cached: list[int] = []
        self.forwards = 0
        self.calls = 0  # calls served (prefill, step, draft): what the orchestrator paid a round trip for
        self.oracle = oracle
        self.stage = stage
        self.latency_s = latency_s
        self.fed: list[int] = []  # tokens fed per forward (for tests and stats)
        self._hashes: list[int] = [oracle.root]  # _hashes[p] names cached[:p]
        self._prompt_len: int | None = None  # learnt from the first call of a generation (see _learn_prompt)
        self._overshoot = 0.0  # running estimate of how late time.sleep wakes up, subtracted from later sleeps

    def describe(self) -> WorkerInfo:
        return WorkerInfo(self.name, str(self.device), self.oracle.vocab, None, self.contends,
                          max_window=self.max_window)

    # -- cache primitives ---------------------------------------------------------------------------------------

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        self.cached = []
        self.fed = []
        self._hashes = [self.oracle.root]
        self._prompt_len = None

    def release(self) -> None:
        self.reset()

    def rollback(self, length: int) -> None:
        del self.cached[length:]
        del self._hashes[length + 1:]

    def _forward(self, seq: Sequence[int], first: int) -> None:
        """Feed ``seq`` as the real worker's ``logits(seq, first)`` would, and take as long as that forward."""
        began = time.perf_counter()
        common = common_prefix(self.cached, seq)
        fed = len(seq) - min(common, first - 1)  # the real worker re-feeds at least the last token
        self.rollback(common)
        h = self._hashes[-1]
        for t in seq[common:]:
            h = self.oracle.extend(h, t)
            self._hashes.append(h)
        self.cached.extend(seq[common:])
        self.forwards += 1
        self.fed.append(fed)
        self._sleep_until(began + self.latency_s(fed))

    def _sleep_until(self, deadline: float) -> None:
        # time.sleep wakes up ~50-100 us late on Linux: subtract a running estimate of the overshoot so the mean
        # forward time is the configured one, without spinning (a spin would hold a core and the GIL).
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return
        time.sleep(max(remaining - self._overshoot, 0.0))
        late = time.perf_counter() - deadline
        self._overshoot = min(max(self._overshoot + 0.1 * late, 0.0), 0.0005)

    @staticmethod
    def _check(params: SamplingParams) -> None:
        if params.rule != "greedy":
            raise ConfigError(f"simulated models are greedy only: temperature must be 0, got {params.temperature}")

    # -- stage decisions ----------------------------------------------------------------------------------------

    def prefill(self, prompt: Sequence[int]) -> bool:
        self.calls += 1
        self._learn_prompt(len(prompt))
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)
        self.rollback(keep)
        if keep < len(prompt) - 1:
            self._forward(prompt[:-1], keep + 1)
            return True
        return False

    def logits(self, seq: Sequence[int], first: int) -> torch.Tensor:
        raise ConfigError("a simulated model has no logits; use step() or draft()")

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult:
        """Verify ``seq[start:]`` like a real greedy model: its own choice at every position start..len(seq) given
        seq[:position]; accept the longest agreeing prefix, then its choice at the first mismatch (or the bonus)."""
        self._check(params)
        self.calls += 1
        if start < 1 or start > len(seq):
            raise ValueError(f"start={start} must be in [1, {len(seq)}]")
        self._learn_prompt(start)
        self._forward(seq, start)
        return self._verdict(seq, start)

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        self._check(params)
        self.calls += 1
        self._learn_prompt(len(seq))
        work = list(seq)
        for _ in range(n):
            self._forward(work, len(work))
            work.append(self._choice(len(work)))
        return StepResult(0, tuple(work[len(seq):]))
