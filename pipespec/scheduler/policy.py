"""The adaptive runtime's policy: how many proposals a stage checks per forward pass (its verify cap), how far
its predecessor may draft ahead, and which stages of the chain take part at all (stage bypass), from the acceptance
and latency observed so far.

Pure logic: numbers in, numbers out. The stages feed a ``ChainMonitor`` their observations; it answers their verify
caps and run-ahead limits, and a controller task asks it now and then which sub-chain to run.

With per-token acceptance ``alpha`` between a stage and its predecessor, a window of ``g`` proposals yields on
average ``W(g) = (1 - alpha^(g+1)) / (1 - alpha)`` tokens (accepted ones plus the stage's own), and costs
``t0 + t1 * g`` seconds (a fixed cost per forward pass plus a cost per token, fitted online). The best cap maximises
``W(g) / (t0 + t1 g)``. Drafts more than ``log(eps) / log(alpha)`` tokens ahead survive verification with probability
below ``eps``: the predecessor stops there instead of drafting what will almost surely be thrown away.

Stage bypass: every sub-chain of the active one that ends at the target is scored with the analytical model
(``analysis.predict_throughput``) from each stage's fitted latency and the acceptance between the stages that
would become neighbours; the monitor switches when one is predicted clearly (``margin``) faster. Acceptance between
stages that were never neighbours is estimated as the product along the chain between them (a draft token survives
both checks), until it is observed. Every switch is then judged by the throughput measured before and after it,
and neighbouring sub-chains are tried now and then, since the model cannot see stages that share a device slow
each other down (see ``ChainMonitor``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ..analysis.model import predict_throughput, window_tokens

__all__ = ["best_verify_cap", "best_block", "useful_run_ahead", "LinkEstimator", "ChainMonitor"]

CAPS = (1, 2, 4, 8, 16, 32, 64)


def best_verify_cap(alpha: float, t0: float, t1: float, ceiling: int = 64) -> int:
    """The window in CAPS (up to ``ceiling``) with the most tokens per second."""
    best, best_rate = 1, -1.0
    for cap in CAPS:
        if cap > ceiling:
            break
        rate = window_tokens(alpha, cap) / max(t0 + t1 * cap, 1e-9)
        if rate > best_rate * 1.01:  # a longer window must be clearly better: it also delays the next verdict
            best, best_rate = cap, rate
    return best


def best_block(alpha: float, t0: float, t1: float, draft_s: float, ceiling: int) -> int:
    """How many of the draft's tokens a verifier with nothing to check should wait for before its next forward.

    Waiting for ``g`` drafts costs ``g * draft_s`` (the draft's time per token) on top of the forward's
    ``t0 + t1 * (g + 1)`` and yields ``window_tokens(alpha, g)``; decoding at once (``g = 0``) yields one token. The
    ``g`` in 0..``ceiling`` with the most tokens per second of the two together: a draft much faster than its
    verifier is worth waiting for (a 0.25 ms draft before a 9 ms verifier at alpha 0.8: ~10 tokens), one as slow as
    its verifier is not (0). Without it a verifier decodes alone after every rejection, a whole forward for one
    token, while the draft restarts: on GPUs half of a target's forwards went that way (docs/benchmarks.md).

    It runs on the lock-step hand-over's critical path (the verifier computes it before the draft may go on), so it
    keeps a running power of alpha and stops past the peak: tokens per second, a concave yield over an affine cost,
    rise to one maximum and then fall (~70 -> ~9 us on a 2-vCPU VM for a 64-token ceiling)."""
    if alpha <= 0.0:
        return 0  # nothing it drafts is accepted: waiting only adds cost
    best, best_rate = 0, 1.0 / max(t0 + t1, 1e-9)
    power, last = alpha, 0.0  # power = alpha^(g+1)
    for g in range(1, ceiling + 1):
        power *= alpha
        tokens = g + 1.0 if alpha >= 1.0 else (1.0 - power) / (1.0 - alpha)
        rate = tokens / max(t0 + t1 * (g + 1) + g * draft_s, 1e-9)
        if rate > best_rate * 1.01:  # a longer wait must be clearly better: the estimates are noisy
            best, best_rate = g, rate
        elif rate < last:
            break  # past the peak: every longer wait yields less
        last = rate
    return best


# A forward more than this many times slower than the fit predicts counts as this many (once ``SETTLED`` forwards are
# seen): one slow call (a CUDA graph captured for a new context bucket, a host that had no core for the thread) must
# not set the estimate of the last ~10 forwards. A real slowdown still shows within a few forwards (each raises the
# mean by ~30 %).
OUTLIER = 4.0
SETTLED = 3.0

# In lock step, a verifier that decided on no block (drafting looked not worth waiting for) still asks for one
# token's block every ``PROBE_EVERY``-th time: only a block's call times the draft, so without it one slow block
# would keep the blocks at 0, and the target decoding alone, for the rest of a generation.
PROBE_EVERY = 4

# Lock step's first block, before the draft's and its verifier's latencies are known (one generation in, they are).
COLD_BLOCK = 4


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
    # weighted sums (of 1, n, t, n*n, n*t) for the latency fit t = t0 + t1 * n, as one tuple replaced whole: the
    # draft's loop observes its forwards on its own thread while the event loop reads, and one tuple is one snapshot
    sums: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def observe_verification(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.successes = self.successes * self.decay + accepted
        self.failures = self.failures * self.decay + (1.0 if accepted < proposed else 0.0)

    def observe_forward(self, tokens: int, seconds: float) -> None:
        d, (sw, sn, st, snn, snt) = self.decay, self.sums
        if sw >= SETTLED:
            t0, t1 = self.latency()
            seconds = min(seconds, OUTLIER * (t0 + t1 * tokens))
        self.sums = (sw * d + 1, sn * d + tokens, st * d + seconds, snn * d + tokens * tokens,
                     snt * d + tokens * seconds)

    @property
    def sw(self) -> float:
        """The weight of the forwards seen (0: none yet)."""
        return self.sums[0]

    def mean_tokens_seconds(self) -> tuple[float, float] | None:
        """(mean tokens, mean seconds) per forward seen; None before the first."""
        sw, sn, st, _, _ = self.sums
        return (sn / sw, st / sw) if sw else None

    @property
    def alpha(self) -> float:
        a = self.prior_alpha * self.prior_weight + self.successes
        return a / (self.prior_weight + self.successes + self.failures)

    def latency(self) -> tuple[float, float]:
        """(t0, t1): seconds per forward pass and per extra token; (mean, 0) until the tokens vary."""
        sw, sn, st, snn, snt = self.sums
        if sw == 0:
            return 1e-3, 0.0
        mean_n, mean_t = sn / sw, st / sw
        var_n = snn / sw - mean_n ** 2
        if var_n < 1e-6:
            return mean_t, 0.0
        t1 = max(0.0, (snt / sw - mean_n * mean_t) / var_n)
        return max(1e-6, mean_t - t1 * mean_n), t1

    def verify_cap(self, ceiling: int) -> int:
        t0, t1 = self.latency()
        return best_verify_cap(self.alpha, t0, t1, ceiling)

    def run_ahead(self, ceiling: int) -> int:
        return useful_run_ahead(self.alpha, ceiling)


@dataclass
class _Measured:
    """Committed tokens and seconds of one sub-chain over its latest time in use (clean intervals only)."""

    tokens: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 and self.tokens > 0 else None


@dataclass
class _Tentative:
    """A switch not yet confirmed by measurement: back to ``previous`` if the new chain measures worse."""

    previous: tuple[int, ...]
    predicted: bool  # the analytical model chose it (kept unless clearly slower) or a trial (kept if clearly faster)


@dataclass
class ChainMonitor:
    """What the adaptive runtime knows of a chain of ``stages`` models (index 0 the draft, the last the target).

    Per stage, a latency fit (``LinkEstimator`` latency part); per pair (proposer, verifier), an acceptance estimate
    (its alpha part); per sub-chain, the throughput measured while it ran; the sub-chain in use (``active``, always
    ending at the target). It outlives a generation (a ``Pipeline`` keeps one), so the next generation starts from
    what this one learned. Mutated from the event loop and from the stages' threads (every stage but the target
    runs its loop on its worker's thread): each stage observes its own forwards (``LinkEstimator.sums``, one tuple
    replaced whole) and the verifications it makes; readers on another thread may see an estimate one observation
    old, which is all the policy needs.

    Decisions, at most every ``interval`` seconds and ``settle`` committed tokens after the last switch:

    1. a switch not yet confirmed is judged by measured throughput, once the new chain has committed
       ``judge_tokens``: one the model predicted stays unless it measures ``margin`` slower than the chain before
       it; a trial stays only if it measures ``2 * margin`` faster (measurements over a few dozen tokens are noisy);
    2. the model: a sub-chain of the active one predicted ``margin`` faster is switched to;
    3. trials: a neighbour of the active chain (one stage more, or one fewer where that stage shares its device) that
       the model does not predict far slower (``trial_band``) is tried when its wait is over. The analytical model
       assumes that every stage has a device of its own; where stages share one (a CPU, one GPU), taking one out
       also speeds the others up, which only a measurement shows. A trial is also how a bypassed stage comes back.
       A failed trial doubles that chain's wait (``trial_after`` up to ``trial_max`` tokens), a kept one resets it.
    """

    stages: int
    interval: float = 0.1  # seconds between two looks at the chain
    margin: float = 0.05  # how much faster (predicted or measured) another sub-chain must be
    settle: int = 16  # committed tokens after a switch before the next decision (fresh observations)
    trial_after: int = 256  # committed tokens before a neighbouring sub-chain is tried (doubles when it loses)
    removal_trial_after: int = 64  # the same for taking out a stage that shares its device (where trials pay most)
    trial_max: int = 8192
    judge_tokens: int = 32  # committed tokens a new sub-chain runs (measured) before it is judged
    trial_band: float = 0.3  # only sub-chains predicted at least (1 - trial_band) x the active one are tried
    max_verify_cap: int = 64  # the verify cap the predictions assume
    memory: float = 0.97  # forgetting per verification of the acceptance estimates (about 30 verifications' worth):
    # longer than a verify cap alone would need, since a switch decided on a lucky run of tokens costs a trial
    active: tuple[int, ...] = ()
    # per stage: whether it shares its device with another working stage (empty: assume every stage does). Only
    # such a stage is taken out on trial: elsewhere the model's prediction already counts what it costs.
    contended: tuple[bool, ...] = ()
    # per stage: the CUDA devices it computes on where it contends for them (None: no such device, e.g. the CPU or a
    # synthetic stage). A draft that shares one with the stage checking its tokens runs in lock step with it.
    devices: tuple[frozenset[str] | None, ...] = ()
    tokens: int = 0  # committed tokens seen, all generations together
    switches: int = 0
    # why the last switch was made: "predicted" (the model), "trial" (a neighbour tried) or "trial lost" / "switch
    # lost" (back to the chain before, which measured faster): the trace's bypass marks say it
    why: str = ""
    _latency: list[LinkEstimator] = field(default_factory=list)
    _pairs: dict[tuple[int, int], LinkEstimator] = field(default_factory=dict)
    _measured: dict[tuple[int, ...], _Measured] = field(default_factory=dict)
    _waits: dict[tuple[int, ...], int] = field(default_factory=dict)  # trial wait per chain (tokens)
    _next_trial: dict[tuple[int, ...], int] = field(default_factory=dict)  # token count when it may be tried
    _tentative: _Tentative | None = None
    _last_look: float = -math.inf
    _look_tokens: int = 0
    _clean: bool = False  # the interval since the last look ran one chain in steady state
    _last_switch: int = 0
    _scores: dict[tuple[int, ...], float] = field(default_factory=dict)  # predictions of the current look
    _no_blocks: int = 0  # lock step's blocks of 0 in a row (``PROBE_EVERY``)

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError("a chain has at least one stage")
        self.active = self.active or tuple(range(self.stages))
        self._latency = [LinkEstimator() for _ in range(self.stages)]

    # -- observations ----------------------------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """A generation starts: its first interval (prefill, warm-up) is not a measurement."""
        self._last_look, self._look_tokens, self._clean = now, self.tokens, False

    def observe_forward(self, stage: int, tokens: int, seconds: float) -> None:
        self._latency[stage].observe_forward(tokens, seconds)

    def observe_verification(self, proposer: int, verifier: int, proposed: int, accepted: int) -> None:
        self._pair(proposer, verifier).observe_verification(proposed, accepted)

    def observe_commit(self, tokens: int) -> None:
        self.tokens += tokens

    # -- answers to the stages -------------------------------------------------------------------------------------

    def alpha(self, proposer: int, verifier: int) -> float:
        """Per-token acceptance of ``proposer``'s tokens by ``verifier``: observed, else the product along the chain
        between them (each link observed or its prior)."""
        pair = self._pairs.get((proposer, verifier))
        if pair is not None and pair.successes + pair.failures >= 1.0:
            return pair.alpha
        if verifier - proposer == 1:
            return pair.alpha if pair is not None else LinkEstimator().alpha
        return math.prod(self.alpha(i, i + 1) for i in range(proposer, verifier))

    def latency(self, stage: int) -> tuple[float, float]:
        return self._latency[stage].latency()

    def verify_cap(self, proposer: int, verifier: int, ceiling: int) -> int:
        t0, t1 = self.latency(verifier)
        return best_verify_cap(self.alpha(proposer, verifier), t0, t1, ceiling)

    def run_ahead(self, proposer: int, verifier: int, ceiling: int) -> int:
        return useful_run_ahead(self.alpha(proposer, verifier), ceiling)

    def block(self, verifier: int, ceiling: int) -> int:
        """How many drafts ``verifier`` should wait for after it rolled the draft back (``best_block``); 0 unless its
        proposer in the active chain is the draft (stage 0: a middle stage's tokens come a forward at a time). Until
        both stages' latencies have been seen: 0, or in lock step ``COLD_BLOCK`` (there the draft waits for a block
        size, and a draft left to run free beside its verifier measures its own time slowed by that verifier's
        forwards, which kept the block at 0: on two H200s the 70B chain's target decoded alone for the first 40 %
        of a generation)."""
        if verifier not in self.active or self.active.index(verifier) != 1 or self.active[0] != 0:
            return 0
        draft_s, mine = self.draft_seconds(), self._latency[verifier]
        if draft_s is None or mine.sw == 0:
            return min(COLD_BLOCK, ceiling) if self.lock_step(verifier) else 0
        t0, t1 = mine.latency()
        ceiling = min(ceiling, useful_run_ahead(self.alpha(0, verifier), ceiling))
        block = best_block(self.alpha(0, verifier), t0, t1, draft_s, ceiling)
        if block or ceiling < 1 or not self.lock_step(verifier):
            self._no_blocks = 0
            return block
        self._no_blocks += 1
        return 1 if self._no_blocks % PROBE_EVERY == 0 else 0

    def lock_step(self, verifier: int | None = None) -> bool:
        """Whether ``verifier`` checks the draft's (stage 0's) tokens on a GPU the draft also computes on. Then
        drafting while it verifies slows the verify (on an H200 a 68M draft beside a 7B costs each 7B forward 10-30 %)
        for tokens that survive only when the whole block is accepted: the draft drafts the block the verifier asks
        for and waits for its verdict, lock step inside the pipeline (two stages on one GPU measured 0.84-0.91x of
        lock-step ``sd`` otherwise; docs/benchmarks.md). ``None``: the stage after the draft in the active chain."""
        if verifier is None and len(self.active) >= 2:
            verifier = self.active[1]
        if len(self.active) < 2 or self.active[0] != 0 or self.active[1] != verifier or len(self.devices) <= verifier:
            return False
        mine, draft = self.devices[verifier], self.devices[0]
        return mine is not None and draft is not None and bool(mine & draft)

    def draft_seconds(self) -> float | None:
        """The draft's (stage 0) mean seconds per drafted token in the pipeline; None before its first call."""
        means = self._latency[0].mean_tokens_seconds()
        return means[1] if means is not None else None

    # -- which stages run --------------------------------------------------------------------------------------------

    def step_known(self, stage: int) -> bool:
        """Whether a forward pass of ``stage`` has been timed (``step_seconds`` is a default until then)."""
        return self._latency[stage].sw > 0

    def step_seconds(self, stage: int) -> float:
        """Mean seconds of one forward pass of ``stage`` at its usual number of tokens."""
        est = self._latency[stage]
        t0, t1 = est.latency()
        means = est.mean_tokens_seconds()
        return t0 + t1 * (means[0] if means is not None else 1.0)

    def predict(self, chain: tuple[int, ...]) -> float:
        """Predicted committed tokens per second of ``chain`` (stage indices, smallest first, ending at the target)."""
        lat = [self.step_seconds(i) for i in chain]
        acc = [self.alpha(a, b) for a, b in zip(chain, chain[1:])]
        return predict_throughput(lat, acc, "pipe", verify_cap=self.max_verify_cap)

    def measured(self, chain: tuple[int, ...]) -> float | None:
        """Committed tokens per second measured over ``chain``'s latest time in use (None: not measured)."""
        m = self._measured.get(chain)
        return m.rate if m is not None else None

    def candidates(self) -> list[tuple[int, ...]]:
        target = self.stages - 1
        return [(*drafts, target) for r in range(self.stages)
                for drafts in itertools.combinations(range(target), r)]

    def decide(self, now: float) -> tuple[int, ...] | None:
        """The sub-chain to switch to, or None to keep ``active``. Looks at most every ``interval`` seconds."""
        if self.stages < 2 or now - self._last_look < self.interval:
            return None
        if self._clean:
            m = self._measured.setdefault(self.active, _Measured())
            m.tokens += self.tokens - self._look_tokens
            m.seconds += now - self._last_look
        self._last_look, self._look_tokens, self._clean = now, self.tokens, True
        self._scores.clear()
        if self.tokens - self._last_switch < self.settle or self.measured(self.active) is None:
            return None
        if self._tentative is not None and self._measured[self.active].tokens < self.judge_tokens:
            return None  # commits come in bursts: judge a switch on enough tokens
        if not all(self._latency[i].sw for i in self.active):
            return None  # a stage in use has not been timed yet
        if self._tentative is not None:
            return self._judge(self._tentative)
        chain = self._best()
        if chain != self.active:
            return self._switch(chain, _Tentative(self.active, predicted=True), "predicted")
        for chain in self._neighbours():
            if self.tokens >= self._next_trial.setdefault(chain, self.tokens + self._wait(chain)):
                for stage in set(chain) - set(self.active):  # a stage coming back: measure its pairs afresh
                    # list(dict) copies in one step: a stage's thread may add a pair meanwhile (``_pair``)
                    for pair in [p for p in list(self._pairs) if stage in p]:
                        self._pairs.pop(pair, None)
                return self._switch(chain, _Tentative(self.active, predicted=False), "trial")
        return None

    def _judge(self, tentative: _Tentative) -> tuple[int, ...] | None:
        self._tentative = None
        new, old = self.measured(self.active), self.measured(tentative.previous)
        if new is None or old is None:
            return None
        lost = new < old * (1.0 - self.margin) if tentative.predicted else new <= old * (1.0 + 2 * self.margin)
        if not lost:
            self._waits.pop(self.active, None)
            self._next_trial.pop(tentative.previous, None)
            return None
        self._waits[self.active] = min(2 * self._wait(self.active), self.trial_max)
        self._next_trial[self.active] = self.tokens + self._wait(self.active)
        return self._switch(tentative.previous, None, "switch lost" if tentative.predicted else "trial lost")

    def _score(self, chain: tuple[int, ...]) -> float:
        """``predict``, computed once per look (``_best`` and ``_neighbours`` ask for the same chains)."""
        if chain not in self._scores:
            self._scores[chain] = self.predict(chain)
        return self._scores[chain]

    def _best(self) -> tuple[int, ...]:
        """The best sub-chain of the active one, by the model. Bringing a bypassed stage back is left to trials:
        its estimates are as old as its bypass, and comparing them with fresh ones made the chain flip."""
        current = self._score(self.active)
        scores = {c: self._score(c) for c in self.candidates()
                  if set(c) <= set(self.active) and all(self._latency[i].sw for i in c) and not self._lost(c)}
        best = max(scores, key=lambda c: (scores[c], -len(c)))
        return best if scores[best] > current * (1.0 + self.margin) else self.active

    def _neighbours(self) -> list[tuple[int, ...]]:
        """Sub-chains one stage away from the active one: fewest models first, then the best predicted. A stage
        comes out on trial only where it shares a device; any bypassed stage may come back."""
        shared = self.contended or (True,) * self.stages
        out = [c for c in self.candidates() if len(set(c) ^ set(self.active)) == 1
               and (len(c) > len(self.active) or shared[(set(self.active) - set(c)).pop()])]
        floor = (1.0 - self.trial_band) * self._score(self.active)  # far worse by the model: not worth a trial
        scores = {c: self._score(c) for c in out}
        return sorted((c for c in out if scores[c] >= floor), key=lambda c: (len(c), -scores[c]))

    def _lost(self, chain: tuple[int, ...]) -> bool:
        """Measured slower than the chain before it, and still waiting for its next trial."""
        return chain in self._waits and chain != self.active and self._next_trial.get(chain, 0) > self.tokens

    def _wait(self, chain: tuple[int, ...]) -> int:
        first = self.removal_trial_after if len(chain) < len(self.active) else self.trial_after
        return self._waits.get(chain, first)

    def _switch(self, chain: tuple[int, ...], tentative: _Tentative | None, why: str) -> tuple[int, ...]:
        self._measured[chain] = _Measured()  # its rate from now on
        self.why = why
        self._tentative = tentative
        self._clean = False  # the interval with the switch in it measures neither chain
        self.active = chain
        self._last_switch = self.tokens
        self.switches += 1
        return chain

    def _pair(self, proposer: int, verifier: int) -> LinkEstimator:
        pair = self._pairs.get((proposer, verifier))
        if pair is None:
            pair = self._pairs[(proposer, verifier)] = LinkEstimator(decay=self.memory)
        return pair
