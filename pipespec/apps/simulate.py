"""``pipespec simulate``: the real orchestrator (pipeline, stages, channels, runners) on simulated models that sleep
(``workers.simulated``), measured against the analytical model and the discrete-event simulation of the same chain.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..analysis.model import predict_throughput
from ..analysis.oracle import AcceptanceSpec, Oracle, mix
from ..analysis.simulation import simulate
from ..errors import ConfigError
from ..runners.thread import ThreadRunner
from ..scheduler.pipeline import Pipeline
from ..scheduler.request import Member
from ..types import STAGE_COUNTERS, Mode
from ..workers.simulated import SimulatedWorker

__all__ = ["EventLoopClock", "LatencyMs", "print_report", "run_on_clock", "simulate_report", "simulated_pipeline"]

# Milliseconds per forward pass: a constant, or a function of the number of tokens the pass feeds.
LatencyMs = float | Callable[[int], float]


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
        members.append(Member(name, ThreadRunner(f"{i}-{name}", torch.device("cpu"), worker), worker.describe()))
    return Pipeline(members, None)


# ----------------------------------------------------------------------------------------------------------------
# Measuring the orchestrator
# ----------------------------------------------------------------------------------------------------------------


class EventLoopClock(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that counts the time the event loop spends blocked in ``select`` (idle).

    Run the loop on it (``asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(clock))``); the loop's own
    work over an interval (every coroutine step, callback, channel operation, and waiting for the GIL) is the wall
    time minus the idle time. Its CPU time over the interval (``cpu()`` before and after, minus ``idle_cpu``) is
    the same work without the waits for the GIL or for a core: what a loaded machine cannot inflate.
    """

    def __init__(self) -> None:
        super().__init__()
        self.idle = 0.0
        self.idle_cpu = 0.0  # CPU time of the loop's thread spent inside select (the syscall itself)
        self.wakeups = 0  # selects that returned events: the loop was woken (a runner's result, mostly)

    def select(self, timeout: float | None = None) -> Any:
        began, began_cpu = time.perf_counter(), time.thread_time()
        events = []
        try:
            events = super().select(timeout)
            return events
        finally:
            self.idle += time.perf_counter() - began
            self.idle_cpu += time.thread_time() - began_cpu
            self.wakeups += bool(events)

    @staticmethod
    def cpu() -> float:
        """CPU time of the calling thread (call it on the loop's thread). Busy CPU = cpu() - idle_cpu: the loop's
        own work only, not the time it waited for the GIL or for a core, so a loaded machine does not inflate it."""
        return time.thread_time()


def run_on_clock(main: Callable[[EventLoopClock], Any]) -> Any:
    """Run ``main(clock)`` (a coroutine function) on an event loop instrumented by an ``EventLoopClock``."""
    clock = EventLoopClock()
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(clock)) as runner:
        return runner.run(main(clock))


def _prompt(seed: int, repeat: int, length: int) -> list[int]:
    return [mix((seed << 32) ^ (repeat << 16) ^ i) % 1000 + 3 for i in range(length)]


async def simulate_report(clock: EventLoopClock, latencies_ms: Sequence[LatencyMs],
                          acceptance: Sequence[AcceptanceSpec], *, tokens: int = 400, mode: Mode = "pipe",
                          verify_cap: int = 64, lookahead: int = 8, max_ahead: int | None = None, seed: int = 0,
                          repeats: int = 1, prompt_tokens: int = 16, draft_batch: int = 0,
                          verify_cost_per_token_ms: float = 0.0) -> dict[str, Any]:
    """Run the real orchestrator on simulated models (``repeats`` generations of ``tokens`` tokens, one prompt
    each) and compare it with the analytical model and with the discrete-event simulation of the same generations.
    Returns a JSON-able dict (fields: docs/analysis.md).

    ``simulated_tokens_per_s`` replays the very same acceptance draws (the same oracle and prompts) with free
    coordination and the configured latencies, so measured / simulated is the orchestrator's own efficiency;
    ``predicted_tokens_per_s`` is the expectation over draws, which one 400-token run misses by ~9% (one s.d.).
    """

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
        runs, loop_busy, loop_cpu = [], 0.0, 0.0
        calls0 = sum(m.worker.calls for m in pipe.members)  # type: ignore[attr-defined]
        wakeups0 = clock.wakeups
        for prompt in prompts:
            idle0, wall0, idle_cpu0, cpu0 = clock.idle, time.perf_counter(), clock.idle_cpu, clock.cpu()
            runs.append(await pipe.generate(prompt, max_new_tokens=tokens, **options))
            loop_busy += (time.perf_counter() - wall0) - (clock.idle - idle0)
            loop_cpu += (clock.cpu() - cpu0) - (clock.idle_cpu - idle_cpu0)
        calls = sum(m.worker.calls for m in pipe.members) - calls0  # type: ignore[attr-defined]
        wakeups = clock.wakeups - wakeups0
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
        for key in (k for k in STAGE_COUNTERS if k != "busy_seconds"):
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
        "orchestrator_cpu_us_per_token": round(1e6 * loop_cpu / committed, 2),
        "runner_calls_per_token": round(calls / committed, 3),
        "loop_wakeups_per_token": round(wakeups / committed, 3),
        "event_loop_busy_fraction": round(loop_busy / seconds, 4),
        "target_idle_us_per_token": round(1e6 * max(seconds - target_busy, 0.0) / committed, 2),
        "lossless": runs[0].token_ids == tuple(sims[0].output[:tokens]),  # the replay commits the target's tokens
        "stages": stages,
    }


def print_report(report: dict[str, Any]) -> None:
    """The report as Rich tables on stdout."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    head = Table(title=f"pipespec simulate: {report['mode']}, latencies {report['latencies_ms']} ms, "
                       f"acceptance {[round(a, 3) for a in report['acceptance']]}")
    head.add_column("tokens/s", justify="left")
    head.add_column("value", justify="right")
    head.add_row("measured (real orchestrator, simulated models)", f"{report['measured_tokens_per_s']:.1f}")
    head.add_row("predicted (analysis.predict_throughput)", f"{report['predicted_tokens_per_s']:.1f}")
    head.add_row("simulated (same draws, free coordination)", f"{report['simulated_tokens_per_s']:.1f}")
    at_measured = report["predicted_at_measured_latencies_tokens_per_s"]
    head.add_row("predicted at the measured forward times", f"{at_measured:.1f}")
    head.add_row("measured / predicted", f"{report['measured_over_predicted']:.3f}")
    head.add_row("measured / simulated", f"{report['measured_over_simulated']:.3f}")
    console.print(head)
    stages = Table(title="stages")
    for col in ("stage", "forwards", "sim. forwards", "proposed", "accepted", "rollbacks", "busy", "ms/forward"):
        stages.add_column(col, justify="right")
    for i, st in enumerate(report["stages"]):
        stages.add_row(str(i), str(st["forwards"]), str(st["simulated_forwards"]), str(st["proposed"]),
                       str(st["accepted"]), str(st["rollbacks"]), f"{100 * st['busy_fraction']:.0f}%",
                       "-" if st["measured_ms_per_forward"] is None else f"{st['measured_ms_per_forward']:.3f}")
    console.print(stages)
    console.print(f"orchestrator overhead: {report['orchestrator_overhead_us_per_token']:.0f} us of event-loop time "
                  f"per committed token ({100 * report['event_loop_busy_fraction']:.1f}% of the wall time; "
                  f"{report['orchestrator_cpu_us_per_token']:.0f} us of its CPU time; "
                  f"{report['runner_calls_per_token']:.2f} runner calls and "
                  f"{report['loop_wakeups_per_token']:.2f} loop wake-ups per token); "
                  f"target idle {report['target_idle_us_per_token']:.0f} us per token; "
                  f"{report['tokens']} tokens x {report['repeats']} in {report['seconds']:.2f} s")
    for mode, row in report.get("compare", {}).items():
        console.print(f"{mode}: measured {row['measured_tokens_per_s']:.1f}, predicted "
                      f"{row['predicted_tokens_per_s']:.1f}, simulated {row['simulated_tokens_per_s']:.1f} tokens/s")
