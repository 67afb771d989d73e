"""Simulated models for the real orchestrator: ``SimulatedWorker`` sleeps instead of computing, and agrees with its
successor at a configured rate.

The pipeline, its stages, channels and runners are the real ones; only the model worker is fake. So what this
measures is the orchestrator itself, at real time scales, against ``analysis.predict_throughput`` (same latencies,
same acceptance) and ``simulation.simulate`` (the same chain with free coordination).

The oracle (greedy fake models of a chain, as in ``pipespec.simulation`` but over a finite vocabulary):

- the target's token at position p is a hash of (seed, the whole prefix seq[:p]), modulo ``vocab``;
- stage i's token equals stage i+1's with probability alpha_i, decided by a hash of (seed, i, prefix); otherwise it
  is a different token. With a recorded trace instead of a rate, stage i agrees at the j-th generated position iff
  ``trace[j % len(trace)]`` is 1 (j counts from the end of the prompt).

Every choice is a deterministic function of the prefix, as a real greedy model's is, so ``pipe``, ``sd`` and ``ar``
must commit identical tokens: a real losslessness check of the scheduler. A forward pass takes
``latency(tokens fed)`` seconds, spent in ``time.sleep`` on the runner thread; sleeping releases the GIL like a GPU
kernel, so the stages overlap exactly as they would on one device each.
"""

from __future__ import annotations

import asyncio
import copy
import selectors
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import ConfigError
from .models import ModelWorker, ProbRows, StepResult, common_prefix
from .runtime import Runner
from .scheduler.pipeline import Pipeline
from .scheduler.request import Member
from .types import Mode
from .verify import SamplingParams

__all__ = ["Oracle", "SimulatedWorker", "simulated_pipeline", "EventLoopClock", "simulate_report"]

_MASK = (1 << 64) - 1
_ROOT = 0x5EED5EED5EED5EED
_SALT_STAGE = 0xA24BAED4963EE407
_SALT_OTHER = 0x632BE59BD9B4E019

# A per-token acceptance: a rate alpha in [0, 1], or a recorded trace of 0/1 per generated position.
AcceptanceSpec = float | Sequence[int]
# Milliseconds per forward pass: a constant, or a function of the number of tokens the pass feeds.
LatencyMs = float | Callable[[int], float]


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Oracle:
    """The greedy choices of every model of a simulated chain; pure and deterministic given the seed.

    ``acceptance[i]`` links stage i to stage i+1 (``len(acceptance) + 1`` stages). Prefixes are named by a rolling
    hash (``root`` for the empty sequence, ``extend`` for one more token), so a choice costs O(chain length).
    """

    def __init__(self, acceptance: Sequence[AcceptanceSpec], seed: int = 0, vocab: int = 32000) -> None:
        if vocab < 2:
            raise ConfigError(f"the simulated vocabulary needs at least 2 tokens, got {vocab}")
        self.vocab = vocab
        self.stages = len(acceptance) + 1
        self._salt = _mix(seed & _MASK)
        self.root = _mix(self._salt ^ _ROOT)
        self._thresholds: list[int | None] = []
        self._traces: list[tuple[int, ...] | None] = []
        self.rates: list[float] = []  # alpha per link (a trace's mean), for the analytical model
        for i, spec in enumerate(acceptance):
            if isinstance(spec, (int, float)):
                if not 0.0 <= float(spec) <= 1.0:
                    raise ConfigError(f"acceptance[{i}] must be in [0, 1], got {spec!r}")
                # agree iff tag < alpha * 2^64; alpha = 1 must always agree (every tag is < 2^64)
                self._thresholds.append(int(float(spec) * 2.0**64))
                self._traces.append(None)
                self.rates.append(float(spec))
            else:
                trace = tuple(int(x) for x in spec)
                if not trace or any(x not in (0, 1) for x in trace):
                    raise ConfigError(f"acceptance trace {i} must be a non-empty list of 0/1")
                self._thresholds.append(None)
                self._traces.append(trace)
                self.rates.append(sum(trace) / len(trace))

    def extend(self, prefix_hash: int, token: int) -> int:
        return _mix(prefix_hash ^ _mix(token ^ self._salt))

    def choice(self, stage: int, prefix_hash: int, position: int) -> int:
        """Stage ``stage``'s greedy token after the prefix named by ``prefix_hash``; ``position`` counts generated
        tokens (0 = the first token after the prompt) and only matters to traces."""
        token = _mix(prefix_hash ^ self._salt) % self.vocab  # the target's choice
        for j in range(self.stages - 2, stage - 1, -1):  # walk down the chain: M(j) vs M(j+1)
            tag = _mix(prefix_hash ^ self._salt ^ (((j + 1) * _SALT_STAGE) & _MASK))
            trace, threshold = self._traces[j], self._thresholds[j]
            if trace is not None:
                agrees = trace[position % len(trace)] == 1
            else:
                agrees = tag < threshold  # type: ignore[operator]
            if not agrees:  # a different token: never equal to M(j+1)'s
                token = (token + 1 + _mix(tag ^ _SALT_OTHER) % (self.vocab - 1)) % self.vocab
        return token

    def with_prompt(self, prompt: Sequence[int]) -> Oracle:
        """The same models with ``root`` naming ``prompt``: what ``simulation.simulate(models=...)`` needs to replay
        the generation a real run made from that prompt."""
        view = copy.copy(self)
        view.root = self.hashes(prompt)[-1]
        return view

    def hashes(self, seq: Sequence[int]) -> list[int]:
        """hashes[p] names seq[:p], p = 0..len(seq)."""
        out = [self.root]
        for t in seq:
            out.append(self.extend(out[-1], t))
        return out


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


class SimulatedWorker(OracleChoices, ModelWorker):
    """A ``ModelWorker`` with no model: choices come from an ``Oracle``, forward passes are sleeps.

    It keeps the same bookkeeping as the real worker (``cached`` is the sequence "in the KV cache"; a call keeps the
    longest agreeing prefix and "forwards" the rest), so a forward is charged for exactly the tokens a real model
    would feed: one for a decode, 1 + n to verify n proposals, more after a rollback adopted other tokens.
    Greedy only.
    """

    contends = False  # sleeping takes nothing from the other stages

    def __init__(self, oracle: Oracle, stage: int, latency_s: Callable[[int], float], name: str) -> None:
        # No model: the base constructor would read one. Set what the scheduler and the Pipeline read.
        self.model = None
        self.name = name
        self.device = torch.device("cpu")
        self.config = None
        self.vocab_size = oracle.vocab
        self.max_positions = None
        self.cache = None
        self.cached: list[int] = []
        self.forwards = 0
        self.generator = None
        self.oracle = oracle
        self.stage = stage
        self.latency_s = latency_s
        self.fed: list[int] = []  # tokens fed per forward (for tests and stats)
        self._hashes: list[int] = [oracle.root]  # _hashes[p] names cached[:p]
        self._prompt_len: int | None = None  # learnt from the first call of a generation (see _learn_prompt)
        self._overshoot = 0.0  # running estimate of how late time.sleep wakes up, subtracted from later sleeps

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
        if start < 1 or start > len(seq):
            raise ValueError(f"start={start} must be in [1, {len(seq)}]")
        self._learn_prompt(start)
        self._forward(seq, start)
        return self._verdict(seq, start)

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        self._check(params)
        self._learn_prompt(len(seq))
        work = list(seq)
        for _ in range(n):
            self._forward(work, len(work))
            work.append(self._choice(len(work)))
        return StepResult(0, tuple(work[len(seq):]))



def _latency_s(spec: LatencyMs, verify_cost_per_token_ms: float) -> Callable[[int], float]:
    """Seconds per forward feeding n tokens: the spec (ms; a constant or a function of n) plus the per-token cost
    of every token past the first."""
    if callable(spec):
        return lambda n: (spec(n) + verify_cost_per_token_ms * (n - 1)) / 1000.0
    base = float(spec)
    if not base > 0:
        raise ConfigError(f"a forward pass must take > 0 ms, got {spec!r}")
    return lambda n: (base + verify_cost_per_token_ms * (n - 1)) / 1000.0


def simulated_pipeline(latencies_ms: Sequence[LatencyMs], acceptance: Sequence[AcceptanceSpec], *, seed: int = 0,
                       vocab: int = 32000, verify_cost_per_token_ms: float = 0.0) -> Pipeline:
    """A real ``Pipeline`` over simulated models, smallest first: real runners (one thread each, on the CPU), real
    stages and scheduler. No tokenizer: give prompts as token ids. Close it (``async with``) to stop the threads."""
    if not latencies_ms:
        raise ConfigError("a simulated chain needs at least one model (the target)")
    if len(acceptance) != len(latencies_ms) - 1:
        raise ConfigError(f"{len(latencies_ms)} models need {len(latencies_ms) - 1} acceptance values "
                          f"(one per neighbouring pair), got {len(acceptance)}")
    if verify_cost_per_token_ms < 0:
        raise ConfigError(f"verify_cost_per_token_ms must be >= 0, got {verify_cost_per_token_ms}")
    oracle = Oracle(acceptance, seed, vocab)
    latencies = [_latency_s(spec, verify_cost_per_token_ms) for spec in latencies_ms]  # validated before threads
    members = []
    for i, latency in enumerate(latencies):
        name = f"sim{i}"
        worker = SimulatedWorker(oracle, i, latency, name)
        members.append(Member(name, Runner(f"{i}-{name}", torch.device("cpu")), worker))
    return Pipeline(members, None)


# ----------------------------------------------------------------------------------------------------------------
# Measuring the orchestrator
# ----------------------------------------------------------------------------------------------------------------


class EventLoopClock(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that counts the time the event loop spends blocked in ``select`` (idle).

    Run the loop on it (``asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(clock))``); the loop's own
    work over an interval (every coroutine step, callback, channel operation, and waiting for the GIL) is the wall
    time minus the idle time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.idle = 0.0

    def select(self, timeout: float | None = None) -> Any:
        began = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle += time.perf_counter() - began


def run_on_clock(main: Callable[[EventLoopClock], Any]) -> Any:
    """Run ``main(clock)`` (a coroutine function) on an event loop instrumented by an ``EventLoopClock``."""
    clock = EventLoopClock()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(clock)) as runner:
        return runner.run(main(clock))


def _prompt(seed: int, repeat: int, length: int) -> list[int]:
    return [_mix((seed << 32) ^ (repeat << 16) ^ i) % 1000 + 3 for i in range(length)]


async def simulate_report(clock: EventLoopClock, latencies_ms: Sequence[LatencyMs],
                          acceptance: Sequence[AcceptanceSpec], *, tokens: int = 400, mode: Mode = "pipe",
                          verify_cap: int = 64, lookahead: int = 8, max_ahead: int | None = None, seed: int = 0,
                          repeats: int = 1, prompt_tokens: int = 16, draft_batch: int = 1,
                          verify_cost_per_token_ms: float = 0.0) -> dict[str, Any]:
    """Run the real orchestrator on simulated models (``repeats`` generations of ``tokens`` tokens, one prompt
    each) and compare it with the analytical model and with the discrete-event simulation of the same generations.
    Returns a JSON-able dict (fields: docs/analysis.md).

    ``simulated_tokens_per_s`` replays the very same acceptance draws (the same oracle and prompts) with free
    coordination and the configured latencies, so measured / simulated is the orchestrator's own efficiency;
    ``predicted_tokens_per_s`` is the expectation over draws, which one 400-token run misses by ~9% (one s.d.).
    """
    from .analysis import predict_throughput
    from .simulation import simulate

    if tokens < 1 or repeats < 1:
        raise ConfigError(f"tokens and repeats must be >= 1, got {tokens} and {repeats}")
    lat_fns = [_latency_s(lat, verify_cost_per_token_ms) for lat in latencies_ms]
    lat_s = [fn(1) for fn in lat_fns]
    ahead = max_ahead or max(verify_cap, lookahead)  # the Pipeline's own default
    options: dict[str, Any] = dict(mode=mode, verify_cap=verify_cap, lookahead=lookahead, max_ahead=ahead,
                                   draft_batch=draft_batch)
    prompts = [_prompt(seed, r, prompt_tokens) for r in range(repeats)]
    pipe = simulated_pipeline(latencies_ms, acceptance, seed=seed, verify_cost_per_token_ms=verify_cost_per_token_ms)
    async with pipe:
        oracle = pipe.members[0].worker.oracle  # type: ignore[attr-defined]
        # a short warm-up generation starts the runner threads, so the measurement does not pay for it
        await pipe.generate(_prompt(seed, 1 << 15, prompt_tokens), max_new_tokens=2, **options)
        runs, loop_busy = [], 0.0
        for prompt in prompts:
            idle0, wall0 = clock.idle, time.perf_counter()
            runs.append(await pipe.generate(prompt, max_new_tokens=tokens, **options))
            loop_busy += (time.perf_counter() - wall0) - (clock.idle - idle0)
    committed = sum(g.stats.tokens for g in runs)
    seconds = sum(g.stats.seconds for g in runs)
    measured = committed / seconds
    sims = [simulate(lat_fns, oracle.rates, tokens, mode, lookahead=lookahead, verify_cap=verify_cap,
                     max_ahead=ahead, models=oracle.with_prompt(p)) for p in prompts]
    simulated = sum(r.committed for r in sims) / sum(r.seconds for r in sims)
    stages = []
    for i in range(len(latencies_ms)):
        per_run = [g.stats.stages[i] for g in runs]
        merged: dict[str, Any] = {"model": per_run[0]["model"]}
        for key in ("forwards", "proposed", "accepted", "drafted", "rollbacks", "rollbacks_sent"):
            merged[key] = sum(st.get(key) or 0 for st in per_run)
        busy = sum(st["busy_seconds"] for st in per_run)
        merged["acceptance"] = round(merged["accepted"] / merged["proposed"], 4) if merged["proposed"] else None
        merged["busy_seconds"] = round(busy, 4)
        merged["busy_fraction"] = round(busy / seconds, 4)
        merged["latency_ms"] = None if callable(latencies_ms[i]) else float(latencies_ms[i])
        merged["measured_ms_per_forward"] = round(1000 * busy / merged["forwards"], 4) if merged["forwards"] else None
        merged["simulated_forwards"] = sum(r.stages[i].forwards for r in sims)
        stages.append(merged)
    measured_lat = [st["busy_seconds"] / st["forwards"] if st["forwards"] else lat_s[i] for i, st in enumerate(stages)]
    predicted = predict_throughput(lat_s, oracle.rates, mode, lookahead=lookahead, verify_cap=verify_cap)
    predicted_measured = predict_throughput(measured_lat, oracle.rates, mode, lookahead=lookahead,
                                            verify_cap=verify_cap)
    target_busy = stages[-1]["busy_seconds"]
    return {
        "mode": mode,
        "latencies_ms": [None if callable(x) else float(x) for x in latencies_ms],
        "acceptance": oracle.rates,
        "tokens": tokens,
        "repeats": repeats,
        "seconds": round(seconds, 4),
        "verify_cap": verify_cap,
        "lookahead": lookahead,
        "max_ahead": ahead,
        "seed": seed,
        "draft_batch": draft_batch,
        "measured_tokens_per_s": round(measured, 2),
        "predicted_tokens_per_s": round(predicted, 2),
        "simulated_tokens_per_s": round(simulated, 2),
        "predicted_at_measured_latencies_tokens_per_s": round(predicted_measured, 2),
        "measured_over_predicted": round(measured / predicted, 4),
        "measured_over_simulated": round(measured / simulated, 4),
        "orchestrator_overhead_us_per_token": round(1e6 * loop_busy / committed, 2),
        "event_loop_busy_fraction": round(loop_busy / seconds, 4),
        "target_idle_us_per_token": round(1e6 * max(seconds - target_busy, 0.0) / committed, 2),
        "lossless": runs[0].token_ids == tuple(sims[0].output[:tokens]),  # the replay commits the target's tokens
        "stages": stages,
    }
