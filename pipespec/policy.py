"""The adaptive runtime's policy: how many proposals a stage checks per forward pass (its verify cap) and how far
its predecessor may draft ahead, from the acceptance and latency observed so far.

Pure logic: numbers in, numbers out; the verifying stage feeds it observations and sends the resulting run-ahead
limit up with its verdicts.

With per-token acceptance ``alpha`` between a stage and its predecessor, a window of ``g`` proposals yields on
average ``W(g) = (1 - alpha^(g+1)) / (1 - alpha)`` tokens (accepted ones plus the stage's own), and costs
``t0 + t1 * g`` seconds (a fixed cost per forward pass plus a cost per token, fitted online). The best cap maximises
``W(g) / (t0 + t1 g)``. Drafts more than ``log(eps) / log(alpha)`` tokens ahead survive verification with probability
below ``eps``: the predecessor stops there instead of drafting what will almost surely be thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["window_yield", "best_verify_cap", "useful_run_ahead", "LinkEstimator"]

CAPS = (1, 2, 4, 8, 16, 32, 64)


def window_yield(alpha: float, window: int) -> float:
    """Expected tokens from verifying ``window`` proposals (accepted prefix + the verifier's own token)."""
    if alpha >= 1.0:
        return float(window + 1)
    return (1 - alpha ** (window + 1)) / (1 - alpha)


def best_verify_cap(alpha: float, t0: float, t1: float, ceiling: int = 64) -> int:
    """The window in CAPS (up to ``ceiling``) with the most tokens per second."""
    best, best_rate = 1, -1.0
    for cap in CAPS:
        if cap > ceiling:
            break
        rate = window_yield(alpha, cap) / max(t0 + t1 * cap, 1e-9)
        if rate > best_rate * 1.01:  # a longer window must be clearly better: it also delays the next verdict
            best, best_rate = cap, rate
    return best


def useful_run_ahead(alpha: float, ceiling: int, eps: float = 0.02, floor: int = 2) -> int:
    """How many tokens past the verifier's prefix are worth drafting: those that survive with probability >= eps."""
    if alpha >= 0.999:
        return ceiling
    if alpha <= 0.0:
        return floor
    return max(floor, min(ceiling, math.ceil(math.log(eps) / math.log(alpha))))


@dataclass
class LinkEstimator:
    """Online estimates for one link (predecessor -> this stage), with exponential forgetting.

    Acceptance: a verification of ``n`` proposals with ``m`` accepted is ``m`` successes and one failure if
    ``m < n``, on top of a weak prior. Latency: weighted least squares of forward time against tokens forwarded.
    """

    decay: float = 0.9
    prior_alpha: float = 0.7
    prior_weight: float = 4.0
    successes: float = 0.0
    failures: float = 0.0
    # sums for the latency fit t = t0 + t1 * n
    sw: float = 0.0
    sn: float = 0.0
    st: float = 0.0
    snn: float = 0.0
    snt: float = 0.0

    def observe_verification(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.successes = self.successes * self.decay + accepted
        self.failures = self.failures * self.decay + (1.0 if accepted < proposed else 0.0)

    def observe_forward(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.sw = self.sw * d + 1
        self.sn = self.sn * d + tokens
        self.st = self.st * d + seconds
        self.snn = self.snn * d + tokens * tokens
        self.snt = self.snt * d + tokens * seconds

    @property
    def alpha(self) -> float:
        a = self.prior_alpha * self.prior_weight + self.successes
        return a / (self.prior_weight + self.successes + self.failures)

    def latency(self) -> tuple[float, float]:
        """(t0, t1): seconds per forward pass and per extra token; (mean, 0) until the tokens vary."""
        if self.sw == 0:
            return 1e-3, 0.0
        mean_n, mean_t = self.sn / self.sw, self.st / self.sw
        var_n = self.snn / self.sw - mean_n ** 2
        if var_n < 1e-6:
            return mean_t, 0.0
        t1 = max(0.0, (self.snt / self.sw - mean_n * mean_t) / var_n)
        return max(1e-6, mean_t - t1 * mean_n), t1

    def verify_cap(self, ceiling: int) -> int:
        t0, t1 = self.latency()
        return best_verify_cap(self.alpha, t0, t1, ceiling)

    def run_ahead(self, ceiling: int) -> int:
        return useful_run_ahead(self.alpha, ceiling)
