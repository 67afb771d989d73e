"""``pipespec plan``: measure a loaded chain on its device, predict every configuration, recommend one.

What it measures, with the pipeline's own workers through their runners:

- *latency*: each model's forward pass for n = 1, 2, 4, ... 64 tokens after a 128-token context (median of a few
  repetitions of ``worker.step``, i.e. the forward plus the greedy choice and its host sync, as a stage pays it;
  one model at a time, so on a shared device the models do not disturb each other's timings);
- *agreement*: for every pair of models, the share of positions where their greedy choices agree, teacher-forced on
  the target's own greedy continuation of a few prompts (decoded past EOS, so every prompt gives ``tokens``
  positions; then one forward per model per prompt). Between the models a sub-chain makes neighbours, this is
  the alpha of ``analysis``.

What it predicts: for every sub-chain that ends at the target (the target alone is ``ar``) and every verify cap,
``analysis.predict_throughput`` with each stage's latency taken at its expected window (a verification feeds
1 + gamma tokens, a decode one; gamma follows from its predecessor's rate, so this is iterated to a fixed point),
and the discrete-event simulation of the same chain with the measured latency curves. The best prediction is the
recommendation (a chain with fewer models wins a near tie); ``run=True`` also generates with it (a ``Pipeline``
over the chosen members of the loaded one). The predictions assume one device per model: models sharing a device
(all of them on one CPU, say) contend for it, and measured rates fall short (``shared_device`` says so).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..analysis.plan import CAPS, Prediction, prediction_dict, predict_chains, recommend, recommend_mode
from ..errors import ConfigError
from ..scheduler.pipeline import Pipeline
from ..verify import SamplingParams
from ..workers.base import LogitsWorker

__all__ = ["CAPS", "SIZES", "Prediction", "PlanResult", "plan", "print_tables", "predict_chains", "recommend", "measure_latencies",
           "measure_agreement"]

SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT = 128  # tokens of context before the timed forwards
_GREEDY = SamplingParams()


@dataclass(frozen=True, slots=True)
class PlanResult:
    device: str
    models: tuple[str, ...]
    latency_ms: dict[str, dict[int, float]]  # model -> tokens fed -> median ms per forward
    agreement: dict[str, float]  # "a->b" -> share of positions where a's greedy choice equals b's
    predictions: tuple[Prediction, ...]  # best first
    recommended: Prediction
    measured: dict[str, Any] | None = None  # with run=True: the recommended chain (and ar) generated for real
    shared_device: bool = False  # several models on one device: the predictions assume one device each
    mode: dict[str, Any] | None = None  # the recommended mode and why (analysis.plan.recommend_mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "models": list(self.models),
            "latency_ms": {m: {str(n): round(v, 4) for n, v in t.items()} for m, t in self.latency_ms.items()},
            "acceptance": {k: round(v, 4) for k, v in self.agreement.items()},
            "predictions": [prediction_dict(p) for p in self.predictions],
            "recommended": prediction_dict(self.recommended),
            "measured": self.measured,
            "shared_device": self.shared_device,
            "mode": self.mode,
        }


# ----------------------------------------------------------------------------------------------------------------
# Measuring (synchronous functions run on each model's runner thread)
# ----------------------------------------------------------------------------------------------------------------


def _context(prompt: Sequence[int], length: int) -> list[int]:
    """``prompt`` repeated to ``length`` tokens: realistic token ids, a fixed context length."""
    return [prompt[i % len(prompt)] for i in range(length)]


def _time_forwards(worker: LogitsWorker, context: list[int], sizes: Sequence[int], reps: int) -> dict[int, float]:
    """Median seconds of ``worker.step`` feeding n tokens after ``context`` (cached), for each n in ``sizes``.

    Sizes are interleaved (``reps`` rounds over all of them, after one warm-up round), so a burst of load on a
    shared machine disturbs every size alike; a size never costs more than a larger one (suffix minimum), since
    the medians of small forwards are the noisiest.
    """
    worker.reset(None, len(context) + max(sizes) + 1)
    try:
        worker.step(context, len(context), _GREEDY)  # fills the cache with the context (and warms up)
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for r in range(reps + 1):
            for n in sizes:
                extra = [context[(7 * j + 3 * r + 1) % len(context)] for j in range(n)]
                began = time.perf_counter()
                # the cache keeps `context` and feeds the n new tokens: a verification of n - 1 proposals
                worker.step(context + extra, len(context) + 1, _GREEDY)
                if r:
                    times[n].append(time.perf_counter() - began)
        out: dict[int, float] = {}
        smallest = float("inf")
        for n in sorted(sizes, reverse=True):
            smallest = min(smallest, statistics.median(times[n]))
            out[n] = smallest
        return dict(sorted(out.items()))
    finally:
        worker.release()


def _greedy_choices(worker: LogitsWorker, seq: list[int], first: int) -> list[int]:
    """The worker's greedy token at positions first..len(seq) given seq's prefixes, in one forward pass."""
    worker.reset(None, len(seq) + 1)
    try:
        logits = worker.logits(seq, first)  # [len(seq) - first + 1, vocab]
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    finally:
        worker.release()


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    """Model names as keys: a repeated name gets its stage index appended."""
    return tuple(n if list(names).count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names))


async def measure_latencies(pipe: Pipeline, prompt: Sequence[int], sizes: Sequence[int] = SIZES,
                            reps: int = 5) -> dict[str, dict[int, float]]:
    """Seconds per forward pass of every model of ``pipe`` for each number of tokens fed (median of ``reps``)."""
    context = _context(prompt, CONTEXT)
    out: dict[str, dict[int, float]] = {}
    for m, name in zip(pipe.members, _unique(pipe.names)):  # one at a time: concurrent timings disturb each other
        out[name] = await m.runner.run(_time_forwards, m.worker, context, sizes, reps)
    return out


def _greedy_continuation(worker: LogitsWorker, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, one decoding step each, past any EOS: every position is one more
    sample of agreement (a prompt the target would end at once must not leave the measurement empty)."""
    worker.reset(None, len(prompt) + n + 1)
    try:
        seq = list(prompt)
        worker.prefill(seq)
        for _ in range(n):
            seq.append(worker.step(seq, len(seq), _GREEDY).tokens[-1])
        return seq[len(prompt):]
    finally:
        worker.release()


async def measure_agreement(pipe: Pipeline, prompts: Sequence[Sequence[int]], tokens: int = 48) -> dict[str, float]:
    """Share of positions where model a's greedy choice equals model b's, for every pair a before b, on the
    target's greedy continuations of ``prompts`` (teacher-forced: every model sees the target's prefixes)."""
    names = _unique(pipe.names)
    target = pipe.target
    agree = {(i, j): 0 for i, j in itertools.combinations(range(len(names)), 2)}
    positions = 0
    for prompt in prompts:
        continuation = await target.runner.run(_greedy_continuation, target.worker, list(prompt), tokens)
        seq = list(prompt) + continuation
        # position p predicts seq[p] from seq[:p]; the last row (after the whole continuation) is not compared
        choices = [(await m.runner.run(_greedy_choices, m.worker, seq, len(prompt)))[:-1] for m in pipe.members]
        positions += len(continuation)
        for i, j in agree:
            agree[i, j] += sum(a == b for a, b in zip(choices[i], choices[j]))
    return {f"{names[i]}->{names[j]}": (n / positions if positions else 0.0) for (i, j), n in agree.items()}


# ----------------------------------------------------------------------------------------------------------------
# The whole plan
# ----------------------------------------------------------------------------------------------------------------


async def _generate_rate(pipe: Pipeline, prompts: Sequence[Sequence[int]], tokens: int,
                         **options: Any) -> tuple[float, int]:
    """Committed tokens per second over ``prompts`` (after one warm-up generation: first calls capture graphs,
    allocate caches), and the tokens generated (fewer than asked when the target ends at EOS)."""
    await pipe.generate(list(prompts[0]), max_new_tokens=min(tokens, 8), **options)
    committed, seconds = 0, 0.0
    for prompt in prompts:
        g = await pipe.generate(list(prompt), max_new_tokens=tokens, **options)
        committed += g.stats.tokens
        seconds += g.stats.seconds
    return (committed / seconds if seconds > 0 else 0.0), committed


async def plan(pipe: Pipeline, prompts: Sequence[str | Sequence[int]], *, tokens: int = 48, run: bool = False,
               caps: Sequence[int] = CAPS, reps: int = 5,
               on_progress: Callable[[str], None] | None = None) -> PlanResult:
    """Measure ``pipe``'s models, predict every sub-chain and verify cap, recommend the best; with ``run``, also
    generate ``tokens`` tokens per prompt with the recommendation (and with the target alone, for reference)."""
    say = on_progress or (lambda _msg: None)
    if any(m.worker is None for m in pipe.members):  # it times the worker objects themselves, on their threads
        raise ConfigError("plan measures the models in this process: load the chain with backend='thread'")
    ids = [pipe.encode(p) for p in prompts]
    if not ids:
        raise ValueError("plan needs at least one prompt")
    names = _unique(pipe.names)
    say("timing forward passes")
    latency_s = await measure_latencies(pipe, ids[0], reps=reps)
    say("measuring agreement between models")
    agreement = await measure_agreement(pipe, ids, tokens) if len(names) > 1 else {}
    say("predicting")
    predictions = predict_chains(latency_s, agreement, names, caps)
    best = recommend(predictions)
    measured = None
    if run:
        say(f"running {','.join(best.chain)}" + (f" with verify cap {best.verify_cap}" if best.verify_cap else ""))
        members = [m for m, name in zip(pipe.members, names) if name in best.chain]
        chosen = Pipeline(members, pipe.tokenizer)  # shares the loaded runners and workers; not closed here
        if best.verify_cap is None:
            rate, generated = await _generate_rate(chosen, ids, tokens, mode="ar")
        else:
            rate, generated = await _generate_rate(chosen, ids, tokens, mode="pipe", verify_cap=best.verify_cap)
        ar, _ = await _generate_rate(pipe, ids, tokens, mode="ar")
        ar_pred = next(p for p in predictions if p.verify_cap is None)
        measured = {"chain": list(best.chain), "verify_cap": best.verify_cap, "tokens": tokens, "prompts": len(ids),
                    "generated_tokens": generated,
                    "predicted_tokens_per_s": round(best.predicted_tokens_per_s, 3),
                    "measured_tokens_per_s": round(rate, 3),
                    "ar_predicted_tokens_per_s": round(ar_pred.predicted_tokens_per_s, 3),
                    "ar_measured_tokens_per_s": round(ar, 3)}
    latency_ms = {m: {n: 1000 * t for n, t in table.items()} for m, table in latency_s.items()}
    devices = [m.device for m in pipe.members]
    shared = len(set(devices)) < len(devices)
    return PlanResult(device=pipe.target.device, models=names, latency_ms=latency_ms, agreement=agreement,
                      predictions=tuple(predictions), recommended=best, measured=measured,
                      shared_device=shared, mode=recommend_mode(latency_s, best, shared_device=shared))


def print_tables(result: dict[str, Any]) -> None:
    """A plan's result (``PlanResult.to_dict()``) as Rich tables on stdout."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    lat = Table(title=f"forward pass, ms (device {result['device']})")
    lat.add_column("model")
    sizes = list(next(iter(result["latency_ms"].values())))
    for n in sizes:
        lat.add_column(f"{n} tok", justify="right")
    for model, row in result["latency_ms"].items():
        lat.add_row(model, *(f"{row[n]:.2f}" for n in sizes))
    console.print(lat)
    if result["acceptance"]:
        console.print("greedy agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in result["acceptance"].items()))
    preds = Table(title="predicted throughput, best first")
    for col in ("chain", "verify cap", "predicted tok/s", "simulated tok/s", "speedup"):
        preds.add_column(col, justify="right" if col != "chain" else "left")
    for p in result["predictions"]:
        preds.add_row(",".join(p["chain"]), "-" if p["verify_cap"] is None else str(p["verify_cap"]),
                      f"{p['predicted_tokens_per_s']:.1f}", f"{p['simulated_tokens_per_s']:.1f}",
                      f"{p['speedup']:.2f}x")
    console.print(preds)
    best = result["recommended"]
    cap = "" if best["verify_cap"] is None else f" --verify-cap {best['verify_cap']}"
    chosen = (result.get("mode") or {}).get("mode", "ar" if best["verify_cap"] is None else "pipe")
    mode = "" if chosen == "pipe" else f" --mode {chosen}"
    console.print(f"recommended: pipespec run --models {','.join(best['chain'])}{cap}{mode}")
    if result.get("mode"):
        console.print(f"mode {chosen}: {result['mode']['reason']}")
    if result.get("shared_device"):
        console.print("note: these models share one device; the predictions assume one device per model, so "
                      "chains of several models will measure slower than predicted")
    run = result.get("measured")
    if run:
        console.print(f"measured: {run['measured_tokens_per_s']:.1f} tok/s (predicted "
                      f"{run['predicted_tokens_per_s']:.1f}); target alone {run['ar_measured_tokens_per_s']:.1f} "
                      f"(predicted {run['ar_predicted_tokens_per_s']:.1f})")
