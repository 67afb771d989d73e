"""What ``plan`` predicts and recommends, from measured latency curves and agreement: every sub-chain that keeps the
target, every verify cap, through the analytical model and the discrete-event simulation. Pure: the measuring is
``apps.plan``'s."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .model import predict_throughput, verification_probability
from .simulation import simulate

__all__ = ["CAPS", "TIE", "Prediction", "prediction_dict", "predict_chains", "recommend", "recommend_mode"]

CAPS = (4, 8, 16, 32, 64)


@dataclass(frozen=True, slots=True)
class Prediction:
    chain: tuple[str, ...]  # smallest first; the last one is the target
    verify_cap: int | None  # None for the target alone (ar)
    latencies_ms: tuple[float, ...]  # each stage's mean forward time at its expected window
    acceptance: tuple[float, ...]  # alpha between neighbours of this chain
    predicted_tokens_per_s: float
    simulated_tokens_per_s: float
    speedup: float  # predicted over the target alone


def prediction_dict(p: Prediction) -> dict[str, Any]:
    d = asdict(p)
    d["chain"] = list(p.chain)
    d["latencies_ms"] = [round(x, 4) for x in p.latencies_ms]
    d["acceptance"] = [round(x, 4) for x in p.acceptance]
    for key in ("predicted_tokens_per_s", "simulated_tokens_per_s", "speedup"):
        d[key] = round(d[key], 3)
    return d


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


def recommend_mode(latency_s: dict[str, dict[int, float]], best: Prediction, *, shared_device: bool,
                   lookahead: int = 8) -> dict[str, Any]:
    """Which mode to run ``best``'s chain in, by the analytical model: {"mode", "reason", "predicted_tokens_per_s"
    (per mode)}.

    ``pipe`` is predicted with every stage on a device of its own; where stages share one (``shared_device``: one
    GPU, or the CPU) their forward passes take turns, which lock step (``sd``) already does without the pipeline's
    extra drafting that gets rolled back, so there pipe is not recommended on the model's word: the better of
    ``sd`` and ``ar`` is, and the reason says to measure with ``--mode auto`` (which probes all three)."""
    chain = best.chain
    ar = 1.0 / latency_s[chain[-1]][1]
    rates = {"ar": ar, "sd": ar, "pipe": ar}
    if len(chain) > 1:
        lat = [latency_s[m][1] for m in chain]
        rates["sd"] = predict_throughput(lat, best.acceptance, "sd", lookahead=lookahead)
        rates["pipe"] = best.predicted_tokens_per_s
    listing = ", ".join(f"{m} {r:.1f}" for m, r in rates.items())
    if len(chain) == 1:
        mode, why = "ar", "the best chain is the target alone"
    elif shared_device:
        mode = "sd" if rates["sd"] > rates["ar"] else "ar"
        why = (f"the models share a device, so their forward passes take turns and pipe's prediction (one device "
               f"per stage) does not hold; {mode} predicted fastest of sd and ar; --mode auto measures all three")
    else:
        mode = max(rates, key=lambda m: rates[m])
        why = f"{mode} predicted fastest, one device per stage"
    return {"mode": mode, "reason": f"{why} (predicted tokens/s: {listing})",
            "predicted_tokens_per_s": {m: round(r, 3) for m, r in rates.items()}}
