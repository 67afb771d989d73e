"""The analytical model of PipeSpec: the paper's closed forms and ``predict_throughput`` for a whole chain.

Pure arithmetic: no threads, no torch, no logging. The discrete-event simulation, for what the closed forms do not
cover, lives in ``analysis.simulation``.

Terms (chain, alpha, gamma, c, step, verification, decode, lookahead; as in PipeSpec, McDanel et al. 2025): the
glossary in docs/architecture.md. ``latencies_s[i]`` is the time of one forward pass of M(i) in seconds, smallest
model first; the simulation also takes a function of the number of tokens the forward processes.

Units: throughputs are committed target tokens per second; speedups are relative to the target decoding alone.
"""

from __future__ import annotations

__all__ = [
    "expected_tokens_per_step",
    "lockstep_speedup",
    "pipespec_speedup",
    "predict_throughput",
    "window_tokens",
    "verification_probability",
]

import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..types import MODES, Mode


Latency = float | Callable[[int], float]



# ----------------------------------------------------------------------------------------------------------------
# Closed forms (the paper's analytical model)
# ----------------------------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    # `not (0 <= x <= 1)` also rejects NaN, which a plain `x < 0 or x > 1` would let through.
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (per-token acceptance) must be in [0, 1], got {alpha!r}")


def _check_gamma(gamma: float) -> None:
    if not gamma >= 0:
        raise ValueError(f"gamma (verify window, in tokens) must be >= 0, got {gamma!r}")


def _check_c(c: float) -> None:
    if not c >= 0:
        raise ValueError(f"c (draft/target step time ratio) must be >= 0, got {c!r}")


def window_tokens(alpha: float, gamma: float) -> float:
    """Expected tokens one verification of ``gamma`` drafts yields: sum_{j=0..gamma} alpha^j.

    Accepted drafts are min(Geometric, gamma), plus the correction or bonus token. gamma may be fractional (the
    steady-state models below use rates, not whole counts).
    """
    if alpha == 1.0:
        return gamma + 1.0  # the limit of the geometric sum
    if alpha == 0.0:
        return 1.0
    # (1 - alpha^(gamma+1)) / (1 - alpha) through expm1/log: keeps precision for alpha just below 1.
    return -math.expm1((gamma + 1.0) * math.log(alpha)) / (1.0 - alpha)


def verification_probability(alpha: float, gamma: float) -> float:
    """rho = alpha / (1 - alpha^(gamma+1) + alpha): the steady-state share of a stage's steps that verify.

    It is the stationary probability of a two-state chain: after a rejection the stage's predecessor has been
    rolled back and has nothing valid, so the next step is a decode; a decode is followed by a verification when
    the predecessor's token at the decoded position matches (probability alpha); a verification is followed by
    another one when all gamma drafts and the predecessor's token at the bonus position match (alpha^(gamma+1)).
    Equal at alpha = 1 (rho = 1) and alpha = 0 (rho = 0); no limit needed.
    """
    _check_alpha(alpha)
    _check_gamma(gamma)
    return alpha / (1.0 - math.pow(alpha, gamma + 1.0) + alpha)


def expected_tokens_per_step(alpha: float, gamma: float) -> float:
    """E[N] = (1 - rho) * 1 + rho * (1 - alpha^(gamma+1)) / (1 - alpha): tokens a stage adds per step.

    A decode adds one token; a verification adds the accepted prefix plus one. Equals 1 at alpha = 0 and gamma + 1
    at alpha = 1; greater than 1 for every 0 < alpha and gamma > 0 (the paper's never-slower-than-AR guarantee).
    """
    rho = verification_probability(alpha, gamma)
    return (1.0 - rho) + rho * window_tokens(alpha, gamma)


def lockstep_speedup(alpha: float, gamma: float, c: float) -> float:
    """SD = (1 - alpha^(gamma+1)) / ((1 - alpha) * (gamma * c + 1)): lock-step speculative decoding over AR.

    A round costs gamma draft steps (gamma * c target steps) plus one target verification and yields the window's
    expected tokens. At alpha = 1 it is (gamma + 1) / (gamma * c + 1).
    """
    _check_alpha(alpha)
    _check_gamma(gamma)
    _check_c(c)
    return window_tokens(alpha, gamma) / (gamma * c + 1.0)


def pipespec_speedup(alpha: float, gamma: float) -> float:
    """PipeSpec over AR in the paper's model: E[N] target tokens per target step, i.e. ``expected_tokens_per_step``.

    Asynchrony removes the gamma * c term of lock-step SD: the drafts for the next window are made while the target
    verifies the current one, so a target step costs one target forward, never a wait. What it pays instead is
    rollbacks: after each rejection the target's next step is a decode (one token), hence the rho mix.
    ``lockstep_speedup(alpha, gamma, 0.0)`` (the SD formula with the gamma * c term simply dropped) is the upper
    bound this reaches when every step verifies a full window (rho = 1, i.e. alpha = 1). Assumes the predecessor
    always has gamma tokens ready, i.i.d. acceptance, one device per model, free coordination, and a verification
    costing one decode step.
    """
    return expected_tokens_per_step(alpha, gamma)


# ----------------------------------------------------------------------------------------------------------------
# Throughput of a chain
# ----------------------------------------------------------------------------------------------------------------


def check_chain(latencies: Sequence[object], acceptance: Sequence[float], mode: str, verify_cap: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not latencies:
        raise ValueError("the chain needs at least one model (the target)")
    if len(acceptance) != len(latencies) - 1:
        raise ValueError(
            f"acceptance needs one value per neighbouring pair: {len(latencies)} models need "
            f"{len(latencies) - 1}, got {len(acceptance)}"
        )
    for a in acceptance:
        _check_alpha(a)
    if verify_cap < 1:
        raise ValueError(f"verify_cap must be >= 1, got {verify_cap!r}")


def _accepted_distribution(alpha: float, n: int) -> list[float]:
    """P(A = j), j = 0..n, for A = min(Geometric(alpha), n): accepted drafts out of n checked."""
    probs = [alpha**j * (1.0 - alpha) for j in range(n)]
    probs.append(alpha**n)
    return probs


def _sd_throughput(lat: Sequence[float], acc: Sequence[float], lookahead: int, verify_cap: int) -> float:
    # Renewal-reward: rounds are i.i.d., so tokens/s = E[tokens per round] / E[seconds per round], exactly.
    ahead = lookahead - 1  # each stage runs this far ahead of its successor before the successor verifies
    offered = {ahead: 1.0}  # distribution of the number of tokens the current stage offers its successor
    seconds = ahead * lat[0]
    for i in range(1, len(lat) - 1):
        nxt: dict[int, float] = {}
        for n, p in offered.items():
            for a, q in enumerate(_accepted_distribution(acc[i - 1], min(n, verify_cap))):
                # One verification pass leaves M(i) a + 1 tokens ahead; it then drafts on its own up to `ahead`.
                own = max(0, ahead - (a + 1))
                seconds += p * q * (1 + own) * lat[i]
                nxt[max(a + 1, ahead)] = nxt.get(max(a + 1, ahead), 0.0) + p * q
        offered = nxt
    tokens = sum(p * window_tokens(acc[-1], min(n, verify_cap)) for n, p in offered.items())
    return tokens / (seconds + lat[-1])


_MAX_CATCH_UP = 64  # decode steps a stage may wait for its predecessor to get ahead again; past that, it decodes alone
_MAX_STEPS = 512  # steps of a chain stepped exactly after a rollback; past that, it is at its steady rate


def _pipe_stage(
    alpha: float, latency: float, rate: float, published: Callable[[float], float], next_latency: float, cap: int,
    last: bool = False,
) -> tuple[float, Callable[[float], float]]:
    """One verifying stage of the pipeline model (see ``predict_throughput``).

    ``rate``: tokens/s its predecessor publishes in sync; ``published(t)``: tokens the predecessor has published t
    seconds after being rolled back. Returns this stage's mean tokens per step and its own ``published`` (``last``,
    the target: nobody reads it, and it is not computed, which halves a prediction's cost on the event loop).
    """
    window = min(max(rate * latency - 1.0, 0.0), float(cap))
    catch_up = next((j for j in range(1, _MAX_CATCH_UP + 1) if published(j * latency) >= j), None)
    if catch_up is None:  # the predecessor is no faster than this stage: it decodes alone, like AR
        return 1.0, lambda t: max(t / latency - 1.0, 0.0)
    first = min(published(catch_up * latency) - catch_up, float(cap))
    # Per-step transition probabilities out of the catch-up phase (G), the first verification (V1) and the others (V).
    x, p1, p = alpha**catch_up, math.pow(alpha, first + 1.0), math.pow(alpha, window + 1.0)
    w1, w = window_tokens(alpha, first), window_tokens(alpha, window)
    if p >= 1.0:  # alpha == 1: V is absorbing
        per_step = w
    else:  # semi-Markov: visits per G phase are 1 (lasting catch_up steps), x to V1, x * p1 / (1 - p) to V
        v = x * p1 / (1.0 - p)
        per_step = (catch_up + x * w1 + v * w) / (catch_up + x + v)
    if last:
        return per_step, _unused
    # Expected tokens in the first s steps after a rollback, s = 0..horizon, by stepping the chain from G's start.
    # States: G_0..G_{catch_up-1} (one decode each), V1, V.   dist: [catch_up + 2]
    horizon = min(_MAX_STEPS, math.ceil(_MAX_CATCH_UP * next_latency / latency) + 2)
    # O(1) per step, and stepped only as far as the next stage asks (its catch-up search mostly stops within a few
    # of its own steps; the adaptive runtime predicts several chains a look, on the event loop): the G states shift
    # along a deque and their total is kept, so a step's expected reward is g_total * 1 + v1 * w1 + vv * w.
    gs = collections.deque([1.0] + [0.0] * (catch_up - 1))  # G_0..G_{catch_up-1}
    state = [1.0, 0.0, 0.0]  # g_total, v1, vv
    cumulative = [0.0]

    def step_to(n: int) -> None:
        g_total, v1, vv = state
        while len(cumulative) <= n:
            cumulative.append(cumulative[-1] + g_total + v1 * w1 + vv * w)
            g = gs.pop()
            restart = g * (1.0 - x) + v1 * (1.0 - p1) + vv * (1.0 - p)
            gs.appendleft(restart)
            g_total += restart - g
            v1, vv = g * x, v1 * p1 + vv * p
        state[:] = g_total, v1, vv

    def own_published(t: float) -> float:
        # As for the draft: the forward in flight, then whole steps, t / latency - 1 of them on average; fractional
        # steps interpolate, and past the horizon the chain is at its steady rate.
        steps = max(t / latency - 1.0, 0.0)
        whole = min(int(steps), horizon - 1)
        step_to(whole + 1)
        return cumulative[whole] + (steps - whole) * (cumulative[whole + 1] - cumulative[whole])

    return per_step, own_published


def _unused(t: float) -> float:
    raise AssertionError("the target's published tokens are not part of the model")


def _pipe_throughput(lat: Sequence[float], acc: Sequence[float], verify_cap: int) -> float:
    rate = 1.0 / lat[0]  # the draft publishes one token per forward and never waits

    def draft_published(t: float) -> float:
        # It first finishes its forward in flight (a uniform share of one) and only whole forwards publish:
        # t / l_0 - 1 tokens on average over phases.
        return max(t / lat[0] - 1.0, 0.0)

    published: Callable[[float], float] = draft_published
    for i in range(1, len(lat)):
        next_latency = lat[i + 1] if i + 1 < len(lat) else lat[i]
        per_step, published = _pipe_stage(acc[i - 1], lat[i], rate, published, next_latency, verify_cap,
                                          last=i == len(lat) - 1)
        rate = per_step / lat[i]
    return rate


def predict_throughput(
    latencies_s: Sequence[float],
    acceptance: Sequence[float],
    mode: Mode,
    lookahead: int = 8,
    verify_cap: int = 64,
) -> float:
    """Predicted committed tokens per second of the target for a chain, under i.i.d. acceptance.

    ``latencies_s[i]``: seconds per forward of M(i), smallest first, the same for a decode and a verification.
    ``acceptance[i]``: alpha between M(i) and M(i+1) (``len(latencies_s) - 1`` values).

    ``ar``: 1 / latencies_s[-1].

    ``sd`` (lock step, exact under the assumptions; g = lookahead): a round starts with every stage on the target's
    sequence. M0 drafts g - 1 tokens (g - 1 forwards). Each middle stage M(i) verifies the n tokens offered by
    M(i-1) in one forward, accepting A_i = min(Geometric(alpha_{i-1}), n) and adding its own token, so it is
    A_i + 1 ahead; it then decodes max(0, g - 2 - A_i) tokens on its own to be g - 1 ahead, and offers
    n_i = max(A_i + 1, g - 1) tokens (so g - 1 or more; min(n, verify_cap) are checked). The target verifies
    n_{k-2} tokens: E[tokens] = E[sum_{j=0..n} alpha_{k-2}^j]. A middle stage replaces every token it rejects with
    its own choice, so what the target checks are M(k-2)'s tokens, accepted with alpha_{k-2} each: an M0 draft
    reaches the target with probability alpha_0 * alpha_1 (3 models), but the effective acceptance at the target
    is alpha_1, and the middle stage's effect is on the round time (its own decodes when it rejected early) and on
    n (g - 1, or more after a full acceptance). The distribution of n is carried stage by stage (a handful of
    values), and rounds are i.i.d., so throughput = E[tokens per round] / E[round time] (renewal-reward).
    For two models this is ``lockstep_speedup(alpha, g - 1, c) / latencies_s[-1]``.

    ``pipe`` (steady state, approximate): every stage runs all the time; the target never waits, so throughput =
    E[N] / latencies_s[-1], E[N] its mean tokens per step. Each verifying stage M(i) is the paper's chain of decode
    and verification steps, with the cost of a rollback made explicit (R_0 = 1 / l_0 is the draft's rate):

    - In sync, M(i-1) publishes R_{i-1} * l_i tokens per step of M(i). One of them lands where M(i) put its last
      bonus token and is checked against it, so a verification checks gamma = R_{i-1} * l_i - 1 drafts (capped at
      verify_cap) and yields W(gamma) = sum_{j=0..gamma} alpha^j tokens; the next step verifies again with
      probability alpha^(gamma+1) (all drafts and the bonus position matched).
    - After a rejection, M(i-1) first finishes its forward in flight, then restarts from M(i)'s sequence: t
      seconds later it has published P_{i-1}(t) tokens (P_0(t) = t / l_0 - 1, averaged over phases). M(i) decodes
      meanwhile; after j steps the first j of those tokens overlap M(i)'s own decodes and must all match
      (alpha^j); the rest, gamma_1 = P_{i-1}(j * l_i) - j, is the first window. j is the least with
      P_{i-1}(j * l_i) >= j (1 for a draft at least twice as fast; larger for a slow or bursty predecessor).
    - So three states: G (j decode steps, j tokens; then V1 with probability x = alpha^j, else G again), V1 (one
      verification of gamma_1: W(gamma_1) tokens; then V with probability alpha^(gamma_1+1), else G) and V (one of
      gamma: W(gamma); stays with probability alpha^(gamma+1)). Visits per G phase: 1, x, x * p1 / (1 - p), so
      E[N] = (j + x * W(gamma_1) + v * W(gamma)) / (j + x + v), v = x * p1 / (1 - p). With j = 1 and
      gamma_1 = gamma this is the paper's E[N] exactly; the paper leaves out the restart lag, which costs up to
      10% when the draft is not much faster than its verifier.
    - R_i = E[N_i] / l_i, and P_i(t) is this chain's expected output over its first t / l_i - 1 steps after a
      rollback (stepped exactly), which feeds M(i+1) the same way.

    Assumptions: i.i.d. acceptance; expected token counts stand for their distributions (a middle stage's output
    comes in bursts of a whole verification; when its step is close to its successor's this overestimates, by up
    to about 6% against ``simulate``); rollbacks cascade at once; no max_ahead stalls; latencies do not grow with
    the window. Every state yields at least one token per target step, so pipe >= ar (the paper's guarantee).
    Against ``simulate``: within 2% for two models, within 3% for 0.5/5/20 ms chains (see the tests).
    """
    check_chain(latencies_s, acceptance, mode, verify_cap)
    if any(not x > 0 for x in latencies_s):
        raise ValueError(f"latencies must be > 0 seconds, got {list(latencies_s)!r}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead!r}")
    if mode == "ar" or len(latencies_s) == 1:
        return 1.0 / latencies_s[-1]
    if mode == "sd":
        return _sd_throughput(latencies_s, acceptance, lookahead, verify_cap)
    return _pipe_throughput(latencies_s, acceptance, verify_cap)


_SIMULATION_NAMES = ("SimResult", "StageCounts", "simulate")
