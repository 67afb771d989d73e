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
from dataclasses import asdict, dataclass
from typing import Any

from .analysis import predict_throughput, verification_probability
from .models import ModelWorker
from .scheduler.pipeline import Pipeline
from .simulation import simulate
from .verify import SamplingParams

__all__ = ["Prediction", "PlanResult", "plan", "predict_chains", "recommend", "measure_latencies", "measure_agreement"]

SIZES = (1, 2, 4, 8, 16, 32, 64)
CAPS = (4, 8, 16, 32, 64)
CONTEXT = 128  # tokens of context before the timed forwards
_GREEDY = SamplingParams()


@dataclass(frozen=True, slots=True)
class Prediction:
    chain: tuple[str, ...]  # smallest first; the last one is the target
    verify_cap: int | None  # None for the target alone (ar)
    latencies_ms: tuple[float, ...]  # each stage's mean forward time at its expected window
    acceptance: tuple[float, ...]  # alpha between neighbours of this chain
    predicted_tokens_per_s: float
    simulated_tokens_per_s: float
    speedup: float  # predicted over the target alone


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "models": list(self.models),
            "latency_ms": {m: {str(n): round(v, 4) for n, v in t.items()} for m, t in self.latency_ms.items()},
            "acceptance": {k: round(v, 4) for k, v in self.agreement.items()},
            "predictions": [_prediction_dict(p) for p in self.predictions],
            "recommended": _prediction_dict(self.recommended),
            "measured": self.measured,
            "shared_device": self.shared_device,
        }


def _prediction_dict(p: Prediction) -> dict[str, Any]:
    d = asdict(p)
    d["chain"] = list(p.chain)
    d["latencies_ms"] = [round(x, 4) for x in p.latencies_ms]
    d["acceptance"] = [round(x, 4) for x in p.acceptance]
    for key in ("predicted_tokens_per_s", "simulated_tokens_per_s", "speedup"):
        d[key] = round(d[key], 3)
    return d


# ----------------------------------------------------------------------------------------------------------------
# Measuring (synchronous functions run on each model's runner thread)
# ----------------------------------------------------------------------------------------------------------------


def _context(prompt: Sequence[int], length: int) -> list[int]:
    """``prompt`` repeated to ``length`` tokens: realistic token ids, a fixed context length."""
    return [prompt[i % len(prompt)] for i in range(length)]


def _time_forwards(worker: ModelWorker, context: list[int], sizes: Sequence[int], reps: int) -> dict[int, float]:
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


def _greedy_choices(worker: ModelWorker, seq: list[int], first: int) -> list[int]:
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
        out[name] = await m.runner.call(_time_forwards, m.worker, context, sizes, reps)
    return out


def _greedy_continuation(worker: ModelWorker, prompt: list[int], n: int) -> list[int]:
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
        continuation = await target.runner.call(_greedy_continuation, target.worker, list(prompt), tokens)
        seq = list(prompt) + continuation
        # position p predicts seq[p] from seq[:p]; the last row (after the whole continuation) is not compared
        choices = [(await m.runner.call(_greedy_choices, m.worker, seq, len(prompt)))[:-1] for m in pipe.members]
        positions += len(continuation)
        for i, j in agree:
            agree[i, j] += sum(a == b for a, b in zip(choices[i], choices[j]))
    return {f"{names[i]}->{names[j]}": (n / positions if positions else 0.0) for (i, j), n in agree.items()}


# ----------------------------------------------------------------------------------------------------------------
# Predicting (pure)
# ----------------------------------------------------------------------------------------------------------------


def _curve(table: dict[int, float]) -> Callable[[int], float]:
    """Seconds per forward for any number of tokens: piecewise linear through the measured points, extended
    linearly past the last one, flat below the first."""
    points = sorted(table.items())

    def latency(n: float) -> float:
        if n <= points[0][0] or len(points) == 1:
            return points[0][1]
        for (n0, t0), (n1, t1) in zip(points, points[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = points[-2], points[-1]
        return max(t1 + (t1 - t0) * (n - n1) / (n1 - n0), t1)

    return latency  # type: ignore[return-value]


def _effective_latencies(curves: Sequence[Callable[[int], float]], acc: Sequence[float], cap: int) -> list[float]:
    """Each stage's mean seconds per step: decodes feed one token, verifications 1 + gamma, where gamma is what
    its predecessor publishes during one step (capped). Iterated, since gamma depends on the latencies."""
    lat = [c(1) for c in curves]
    for _ in range(4):
        for i in range(1, len(lat)):
            rate = predict_throughput(lat[:i], acc[:i - 1], "pipe", verify_cap=cap)  # what M(i-1) publishes
            gamma = min(max(rate * lat[i] - 1.0, 0.0), float(cap))
            rho = verification_probability(acc[i - 1], gamma)
            lat[i] = (1.0 - rho) * curves[i](1) + rho * curves[i](1 + round(gamma))
    return lat


def predict_chains(latency_s: dict[str, dict[int, float]], agreement: dict[str, float], models: Sequence[str],
                   caps: Sequence[int] = CAPS, sim_tokens: int = 300) -> list[Prediction]:
    """Every sub-chain of ``models`` that keeps the target (the last), with every verify cap; best first."""
    target = models[-1]
    ar = 1.0 / latency_s[target][1]
    out: list[Prediction] = []
    for r in range(len(models)):
        for drafts in itertools.combinations(models[:-1], r):
            chain = (*drafts, target)
            curves = [_curve(latency_s[m]) for m in chain]
            acc = tuple(agreement[f"{a}->{b}"] for a, b in zip(chain, chain[1:]))
            for cap in (caps if len(chain) > 1 else (None,)):
                if cap is None:
                    lat, pred, sim = [curves[0](1)], ar, ar
                else:
                    lat = _effective_latencies(curves, acc, cap)
                    pred = predict_throughput(lat, acc, "pipe", verify_cap=cap)
                    # max_ahead as the Pipeline's default (max(verify_cap, lookahead))
                    sim = simulate(curves, acc, sim_tokens, "pipe", verify_cap=cap, max_ahead=max(cap, 8)).tokens_per_s
                out.append(Prediction(chain, cap, tuple(1000 * x for x in lat), acc, pred, sim, pred / ar))
    out.sort(key=lambda p: -p.predicted_tokens_per_s)
    return out


TIE = 0.01  # predictions this close to the best count as ties: the one with fewer models wins


def recommend(predictions: Sequence[Prediction]) -> Prediction:
    """The best prediction, except that a chain with fewer models within ``TIE`` of it wins: every model added
    costs memory and coordination that the analytical model counts as free."""
    top = max(p.predicted_tokens_per_s for p in predictions)
    close = [p for p in predictions if p.predicted_tokens_per_s >= (1.0 - TIE) * top]
    return min(close, key=lambda p: (len(p.chain), -p.predicted_tokens_per_s))


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
    return PlanResult(device=pipe.target.device, models=names, latency_ms=latency_ms, agreement=agreement,
                      predictions=tuple(predictions), recommended=best, measured=measured,
                      shared_device=len(set(devices)) < len(devices))
