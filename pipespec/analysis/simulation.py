"""A discrete-event simulation of a chain, for what the closed forms of ``pipespec.analysis.model`` do not cover.

Pure arithmetic: no threads, no torch, no logging. Deterministic given the seed: its only randomness is a seeded
hash of the prefix (greedy fake models, ``_Models``), so every mode commits the same tokens, as real greedy decoding
does. Time is simulated: a forward pass of M(i) takes ``latencies[i]`` seconds (or a function of the tokens it
feeds) and coordination is free. For the same chain run by the real orchestrator on fake models that sleep, see
``pipespec.workers.simulated``.

Terms: the glossary in docs/architecture.md.
"""

from __future__ import annotations

__all__ = ["FakeModels", "SimResult", "StageCounts", "simulate"]

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..types import Mode
from .model import Latency, check_chain
from .oracle import MASK, SALT_OTHER, SALT_STAGE, mix



@dataclass(frozen=True, slots=True)
class StageCounts:
    """What one simulated stage did (names as in ``pipespec.types.StageStats``)."""

    forwards: int  # forward passes
    proposed: int  # predecessor tokens this stage checked (verifying stages only)
    accepted: int  # of those, the ones it kept
    verifications: int  # forwards that checked at least one proposed token
    drafted: int  # tokens this stage chose itself (drafts, decodes, corrections, bonus tokens)
    rollbacks: int  # times its successor's sequence made it drop tokens
    rollbacks_sent: int  # times it told its predecessor to roll back


@dataclass(frozen=True, slots=True)
class SimResult:
    """One simulated generation."""

    mode: Mode
    committed: int  # tokens the target has verified (may pass `tokens` by the last step's surplus)
    seconds: float  # simulated time when the target committed them
    tokens_per_s: float
    stages: tuple[StageCounts, ...]  # smallest model first
    output: tuple[int, ...]  # the committed token ids; the same for every mode given the seed (lossless)


class FakeModels(Protocol):
    """What the simulation asks of its greedy fake models (``analysis.oracle.Oracle``).

    Prefixes are named by a rolling hash: ``root`` names the start (the prompt), ``extend`` appends one token.
    ``choice(stage, prefix_hash, position)`` is M(stage)'s greedy token after that prefix; ``position`` counts the
    generated tokens before it (0 = the first one after the prompt).
    """

    root: int

    def extend(self, prefix_hash: int, token: int) -> int: ...

    def choice(self, stage: int, prefix_hash: int, position: int) -> int: ...


class _Models:
    """Greedy fake models: M(i)'s choice is a function of the prefix, through a hash of it.

    The target's choice is a hash of the prefix; M(i) copies M(i+1)'s choice with probability alpha_i (a hash of
    the prefix, compared with alpha_i * 2^64) and otherwise picks a fresh 64-bit token (a collision has
    probability ~2^-64). So neighbours agree with probability alpha_i per position, i.i.d. over prefixes; a token is
    right or wrong for each stage by identity, whoever produced it (a correction M(i) adopted from M(i+1) is just
    M(i+1)'s token); and the same prefix always gives the same choice, as with a deterministic model, so the
    output can be compared token by token with the target decoding alone.
    """

    def __init__(self, acceptance: Sequence[float], seed: int) -> None:
        self._thresholds = [a * 2.0**64 for a in acceptance]
        self._salt = mix(seed & MASK)
        self.root = mix(self._salt ^ 0x5EED)  # hash of the prompt

    def extend(self, prefix_hash: int, token: int) -> int:
        return mix(prefix_hash ^ mix(token ^ self._salt))

    def choice(self, stage: int, prefix_hash: int, position: int = 0) -> int:
        token = mix(prefix_hash ^ self._salt)
        for j in range(len(self._thresholds) - 1, stage - 1, -1):
            tag = mix(prefix_hash ^ self._salt ^ (((j + 1) * SALT_STAGE) & MASK))
            if tag >= self._thresholds[j]:
                token = mix(tag ^ SALT_OTHER)  # M(j) disagrees with M(j+1) here
        return token


class _Stage:
    """One model's state: its sequence (generated tokens only), prefix hashes, KV length and counters."""

    def __init__(self, latency: Latency, root: int) -> None:
        self.latency = latency
        self.tokens: list[int] = []
        self.hashes: list[int] = [root]  # hashes[p] = hash of tokens[:p]: equal hashes <=> equal prefixes
        self.kv = 0  # tokens whose KV is cached; the next forward feeds tokens[kv:]
        self.rollback_pending = False  # set by the successor, applied at this stage's next step boundary
        self.busy = False
        self.forwards = self.proposed = self.accepted = self.verifications = 0
        self.drafted = self.rollbacks = self.rollbacks_sent = 0

    def seconds(self, fed: int) -> float:
        t = self.latency(fed) if callable(self.latency) else self.latency
        if not t > 0:
            raise ValueError(f"a forward must take > 0 seconds, got {t!r} for {fed} tokens")
        return t

    def append(self, models: FakeModels, token: int) -> None:
        self.tokens.append(token)
        self.hashes.append(models.extend(self.hashes[-1], token))

    def counts(self) -> StageCounts:
        return StageCounts(
            self.forwards, self.proposed, self.accepted, self.verifications, self.drafted, self.rollbacks,
            self.rollbacks_sent,
        )


def _divergence(a: _Stage, b: _Stage) -> int:
    """Length of the longest common prefix of a's and b's sequences (binary search over prefix hashes)."""
    lo, hi = 0, min(len(a.tokens), len(b.tokens))
    if a.hashes[hi] == b.hashes[hi]:
        return hi
    while lo + 1 < hi:  # invariant: prefixes agree at lo, differ at hi
        mid = (lo + hi) // 2
        if a.hashes[mid] == b.hashes[mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _conflicts(pred: _Stage, stage: _Stage) -> bool:
    common = min(len(pred.tokens), len(stage.tokens))
    return pred.hashes[common] != stage.hashes[common]


def _adopt(stage: _Stage, succ: _Stage, exact: bool) -> None:
    """Roll ``stage`` back onto its successor's sequence: drop what conflicts (``exact``: and what lies past it)."""
    keep = _divergence(stage, succ)
    if keep < len(stage.tokens) and (exact or keep < len(succ.tokens)):
        del stage.tokens[keep:], stage.hashes[keep + 1 :]
        stage.kv = min(stage.kv, keep)
        stage.rollbacks += 1
    if len(succ.tokens) > len(stage.tokens):  # adopted tokens are not in the KV cache: the next forward feeds them
        start = len(stage.tokens)
        stage.tokens.extend(succ.tokens[start:])
        stage.hashes.extend(succ.hashes[start + 1 :])


def _forward_seconds(stage: _Stage, proposals: int) -> float:
    # A forward feeds what is not yet in the KV cache (at least the last token) plus the proposals it verifies.
    return stage.seconds(max(1, len(stage.tokens) - stage.kv) + proposals)


def _decode(stage: _Stage, models: FakeModels, index: int) -> None:
    """One token of the stage's own choice (a draft, or a decode with nothing to verify)."""
    stage.kv = len(stage.tokens)  # the forward fed everything up to here; the new token is fed by the next one
    stage.append(models, models.choice(index, stage.hashes[-1], len(stage.tokens)))
    stage.drafted += 1


def _verify(stage: _Stage, models: FakeModels, index: int, proposals: Sequence[int], hashes: Sequence[int]) -> bool:
    """Greedy verification of ``proposals`` (``hashes[j]`` = hash of the prefix before proposal j); True if all
    were accepted. Appends the accepted prefix and the stage's own token (correction or bonus)."""
    accepted = 0
    base = len(stage.tokens)
    while accepted < len(proposals):
        if models.choice(index, hashes[accepted], base + accepted) != proposals[accepted]:
            break
        accepted += 1
    stage.kv = len(stage.tokens) + accepted  # the KV of rejected proposals is dropped
    stage.tokens.extend(proposals[:accepted])
    stage.hashes.extend(hashes[1 : accepted + 1])
    stage.append(models, models.choice(index, stage.hashes[-1], len(stage.tokens)))
    stage.drafted += 1
    if proposals:
        stage.proposed += len(proposals)
        stage.accepted += accepted
        stage.verifications += 1
    return accepted == len(proposals)


def _offer(pred: _Stage, stage: _Stage, cap: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The predecessor's tokens past ``stage``'s sequence (at most ``cap``) and their prefix hashes."""
    n = len(stage.tokens)
    proposals = tuple(pred.tokens[n : n + cap])
    return proposals, tuple(pred.hashes[n : n + len(proposals) + 1])


def _simulate_pipe(stages: list[_Stage], models: FakeModels, tokens: int, cap: int, max_ahead: int,
                   wait: float) -> float:
    k = len(stages)
    target = stages[-1]
    events: list[tuple[float, int]] = []  # (finish time, stage): ties go to the smaller model, deterministically
    offers: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())] * k
    finish = [0.0] * k  # when each stage's forward in flight ends

    def start(i: int, now: float) -> None:
        st = stages[i]
        if st.rollback_pending:
            st.rollback_pending = False
            _adopt(st, stages[i + 1], exact=False)
            if i > 0 and _conflicts(stages[i - 1], st) and not stages[i - 1].rollback_pending:
                stages[i - 1].rollback_pending = True  # the rollback cascades upstream
                st.rollbacks_sent += 1
        if i < k - 1 and len(st.tokens) - len(stages[i + 1].tokens) >= max_ahead:
            st.busy = False  # far enough ahead: wait (re-tried after every event)
            return
        offers[i] = ((), ())
        if i > 0:
            pred = stages[i - 1]
            if _conflicts(pred, st):
                if not pred.rollback_pending:  # stale proposals: ask again for a rollback, decode meanwhile
                    pred.rollback_pending = True
                    st.rollbacks_sent += 1
            else:
                offers[i] = _offer(pred, st, cap)
                if not offers[i][0] and pred.busy and finish[i - 1] - now < wait * _forward_seconds(st, 0):
                    st.busy = False  # nothing to verify, but the predecessor publishes soon: wait for it
                    return
        st.busy = True
        finish[i] = now + _forward_seconds(st, len(offers[i][0]))
        heapq.heappush(events, (finish[i], i))

    for i in range(k):
        start(i, 0.0)
    while True:
        now, i = heapq.heappop(events)
        st = stages[i]
        st.busy = False
        st.forwards += 1
        proposals, hashes = offers[i]
        if i == 0 or not proposals:
            _decode(st, models, i)
        elif not _verify(st, models, i, proposals, hashes) and not stages[i - 1].rollback_pending:
            stages[i - 1].rollback_pending = True
            st.rollbacks_sent += 1
        if len(target.tokens) >= tokens:
            return now  # forwards still in flight do not count
        start(i, now)
        for j in range(k):
            if not stages[j].busy:
                start(j, now)


def _simulate_sd(stages: list[_Stage], models: FakeModels, tokens: int, cap: int, lookahead: int) -> float:
    k = len(stages)
    target = stages[-1]
    now = 0.0
    while len(target.tokens) < tokens:
        base = len(target.tokens)  # every stage starts the round on the target's sequence
        for i, st in enumerate(stages):
            if i > 0:  # one verification pass (a decode when there is nothing to check)
                proposals, hashes = _offer(stages[i - 1], st, cap)
                now += _forward_seconds(st, len(proposals))
                st.forwards += 1
                if not _verify(st, models, i, proposals, hashes):
                    st.rollbacks_sent += 1  # carried out at the round's end, with everyone else's
            while i < k - 1 and len(st.tokens) - base < lookahead - 1:
                now += _forward_seconds(st, 0)
                st.forwards += 1
                _decode(st, models, i)
        for i in range(k - 2, -1, -1):  # the round ends: everyone takes the target's output, nothing more
            _adopt(stages[i], stages[i + 1], exact=True)
    return now


def _simulate_ar(target: _Stage, models: FakeModels, index: int, tokens: int) -> float:
    now = 0.0
    while len(target.tokens) < tokens:
        now += _forward_seconds(target, 0)
        target.forwards += 1
        _decode(target, models, index)
    return now


def simulate(
    latencies: Sequence[Latency],
    acceptance: Sequence[float],
    tokens: int,
    mode: Mode,
    lookahead: int = 8,
    verify_cap: int = 64,
    max_ahead: int | None = None,
    seed: int = 0,
    models: FakeModels | None = None,
    wait_fraction: float = 0.0,
) -> SimResult:
    """Discrete-event simulation of a chain generating ``tokens`` tokens; deterministic given ``seed``.

    ``latencies[i]``: seconds per forward of M(i), or a function of the number of tokens the forward feeds (1 for a
    plain decode; 1 + n to verify n proposals; more after adopting tokens from a rollback, whose KV is missing).
    ``acceptance[i]``: alpha between M(i) and M(i+1), realised by hash-based fake models (see ``_Models``), or by
    ``models`` when given (e.g. the ``analysis.oracle.Oracle`` a real run used, to replay the same draw of acceptances;
    ``acceptance`` is then only checked, and ``seed`` unused).

    ``pipe`` follows PipeSpec's algorithm, every stage on its own device, coordination free:
    M0 drafts one token per forward, never waiting, unless it is ``max_ahead`` tokens past its successor's
    sequence (default 2 * verify_cap: enough to keep a full window ready while the next one is verified; middle
    stages get the same bound, as any real buffer is finite). M(i), i >= 1, whenever free, takes M(i-1)'s tokens
    past its own sequence (at most ``verify_cap``) and verifies them in one forward, keeping the matching prefix
    and adding its own token; with nothing to take it decodes one token itself. A rejection flags M(i-1) for a
    rollback; a stage applies it between forwards (a forward in flight is not aborted: its result is applied and
    then cut back), adopts its successor's sequence and flags its own predecessor if that one now conflicts. A
    stage that finds its predecessor's sequence in conflict with its own (a pending rollback, or a draft at the
    position of its own bonus that does not match) flags it and decodes meanwhile.
    ``sd``: rounds in lock step as in ``predict_throughput``; ``ar``: the target alone.

    ``wait_fraction`` (pipe; 0 = the scheduler's policy, decode at once) evaluates a candidate policy: a verifying
    stage with nothing to verify waits for its predecessor's forward in flight instead of decoding, when that
    forward ends within ``wait_fraction`` of the stage's own decode time (see docs/analysis.md).

    Against the closed forms: ``sd`` matches ``predict_throughput`` in expectation (the model is exact there).
    For ``pipe``, the paper's E[N] with gamma = l_1 / l_0 - 1 is reached with a cheap draft (l_0 <= l_1 / 10) and
    high alpha, or whenever verify_cap binds; it overestimates by up to ~10% as the draft gets slower, because a
    rolled-back stage restarts only after its forward in flight (``predict_throughput`` models that, and agrees
    within ~2% for two models). What only the simulation has: a middle stage's output in bursts (the model
    overestimates by up to ~6% when a middle stage's step is close to its successor's), the start of the
    generation (nothing to verify yet), max_ahead stalls, and forwards that cost more with more tokens.
    """
    check_chain(latencies, acceptance, mode, verify_cap)
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens!r}")
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead!r}")
    ahead = 2 * verify_cap if max_ahead is None else max_ahead
    if ahead < 1:
        raise ValueError(f"max_ahead must be >= 1, got {max_ahead!r}")
    if not wait_fraction >= 0:
        raise ValueError(f"wait_fraction must be >= 0, got {wait_fraction!r}")
    if models is None:
        models = _Models(acceptance, seed)
    stages = [_Stage(lat, models.root) for lat in latencies]
    if mode == "ar" or len(stages) == 1:
        seconds = _simulate_ar(stages[-1], models, len(stages) - 1, tokens)
    elif mode == "sd":
        seconds = _simulate_sd(stages, models, tokens, verify_cap, lookahead)
    else:
        seconds = _simulate_pipe(stages, models, tokens, verify_cap, ahead, wait_fraction)
    target = stages[-1]
    return SimResult(
        mode=mode,
        committed=len(target.tokens),
        seconds=seconds,
        tokens_per_s=len(target.tokens) / seconds,
        stages=tuple(st.counts() for st in stages),
        output=tuple(target.tokens),
    )
