"""The adaptive policy on hand-made numbers."""

from __future__ import annotations

import math

from pipespec.analysis.model import window_tokens
from pipespec.scheduler.policy import (COLD_BLOCK, PROBE_EVERY, ChainMonitor, LinkEstimator, best_block,
                                      best_verify_cap, useful_run_ahead)


def test_window_tokens() -> None:
    assert window_tokens(0.0, 8) == 1.0
    assert window_tokens(1.0, 8) == 9.0
    assert math.isclose(window_tokens(0.5, 2), 1 + 0.5 + 0.25)


def test_best_cap_is_long_when_tokens_are_free_and_short_when_they_cost() -> None:
    assert best_verify_cap(0.9, t0=10e-3, t1=0.0) == 64  # GPU-like: a window costs the same at any length
    assert best_verify_cap(0.9, t0=10e-3, t1=0.0, ceiling=16) == 16
    assert best_verify_cap(0.5, t0=1e-3, t1=1e-3) <= 2  # CPU-like: each token costs as much as the pass
    assert best_verify_cap(0.0, t0=1e-3, t1=1e-4) == 1


def test_best_block_waits_for_a_fast_draft_and_not_for_a_slow_one() -> None:
    # a 0.25 ms draft before a 9 ms target at alpha 0.81 (the H200 chains): ~9 drafts, 0.40 tokens/ms against 0.11
    g = best_block(0.81, t0=9e-3, t1=0.0, draft_s=0.25e-3, ceiling=64)
    assert 7 <= g <= 12, g
    assert window_tokens(0.81, g) / (9 + g * 0.25) > 3 * 1 / 9
    assert best_block(0.81, 9e-3, 0.0, 0.25e-3, ceiling=4) == 4  # the ceiling holds
    assert best_block(0.8, 5e-3, 0.0, 5e-3, ceiling=64) == 0  # as slow as the verifier: decode at once
    assert best_block(0.0, 9e-3, 0.0, 0.25e-3, ceiling=64) == 0  # nothing it drafts is accepted
    assert best_block(0.5, 9e-3, 0.0, 0.25e-3, 64) < best_block(0.9, 9e-3, 0.0, 0.25e-3, 64)


def test_useful_run_ahead() -> None:
    assert useful_run_ahead(0.5, 64) == 6  # 0.5^6 < 0.02 <= 0.5^5
    assert useful_run_ahead(0.99, 64) == 64
    assert useful_run_ahead(0.999, 16) == 16
    assert useful_run_ahead(0.0, 64) == 2


def test_link_estimator_learns_acceptance_and_latency() -> None:
    link = LinkEstimator()
    assert math.isclose(link.alpha, 0.7)  # the prior
    for _ in range(50):
        link.observe_verification(10, 1)  # one accepted, then a rejection: alpha about 0.5
    assert 0.4 < link.alpha < 0.6
    for n in (1, 2, 4, 8, 16) * 10:
        link.observe_forward(n, 0.002 + 0.0005 * n)
    t0, t1 = link.latency()
    assert math.isclose(t0, 0.002, rel_tol=1e-6) and math.isclose(t1, 0.0005, rel_tol=1e-6)
    assert link.verify_cap(64) <= 8
    assert link.run_ahead(64) <= 8


def test_one_slow_forward_does_not_set_the_latency() -> None:
    """A forward far slower than the fit (a CUDA graph captured mid-generation, a thread that waited for a core)
    counts as ``OUTLIER`` times the prediction; a lasting slowdown still shows within a few forwards."""
    link = LinkEstimator()
    link.observe_forward(1, 0.5)  # before it has settled, every forward counts in full (a first call may be slow)
    assert link.mean_tokens_seconds() == (1.0, 0.5)
    link = LinkEstimator()
    for _ in range(20):
        link.observe_forward(1, 0.001)
    link.observe_forward(1, 0.3)  # 300x: unclipped, the mean of the last ~10 forwards would be ~30 ms
    assert link.latency()[0] < 0.0015  # it counted as OUTLIER x 1 ms: ~1.3 ms
    for _ in range(15):
        link.observe_forward(1, 0.010)  # a real 10x slowdown
    assert link.latency()[0] > 0.007


# -- stage bypass: the ChainMonitor on hand-fed observations ---------------------------------------------------------


def fed(latencies_ms: list[float], alphas: dict[tuple[int, int], float], **options: object) -> ChainMonitor:
    """A monitor that has seen 50 one-token forwards per stage and 50 verifications per pair."""
    monitor = ChainMonitor(len(latencies_ms), **options)  # type: ignore[arg-type]
    for stage, ms in enumerate(latencies_ms):
        for _ in range(50):
            monitor.observe_forward(stage, 1, ms / 1000)
    for (a, b), alpha in alphas.items():
        accepted = round(alpha / (1 - alpha))  # `accepted` successes, then one failure: alpha = accepted / (accepted+1)
        for _ in range(50):
            monitor.observe_verification(a, b, accepted + 1, accepted)
    return monitor


class Clock:
    """Drives a monitor's looks: each ``tick`` commits ``tokens`` over ``seconds`` and asks for a decision."""

    def __init__(self, monitor: ChainMonitor) -> None:
        self.monitor, self.now = monitor, 0.0
        monitor.begin(self.now)

    def tick(self, tokens: int, seconds: float = 0.125) -> tuple[int, ...] | None:
        self.monitor.observe_commit(tokens)
        self.now += seconds
        return self.monitor.decide(self.now)


def test_monitor_bypasses_a_slow_middle_that_agrees_poorly() -> None:
    """A middle stage almost as slow as the target, which keeps half the draft's tokens: the analytical model
    predicts draft -> target (acceptance 0.8 * 0.5, never observed) clearly faster than the whole chain."""
    m = fed([1, 9, 10], {(0, 1): 0.8, (1, 2): 0.5})
    assert math.isclose(m.alpha(0, 2), m.alpha(0, 1) * m.alpha(1, 2))  # the product, until observed
    assert abs(m.alpha(0, 2) - 0.8 * 0.5) < 0.05  # (the estimates carry a weak prior)
    assert m.predict((0, 2)) > 1.1 * m.predict((0, 1, 2))
    clock = Clock(m)
    assert clock.tick(10) is None  # the generation's first interval (prefill) measures nothing
    assert clock.tick(10) == (0, 2) and m.active == (0, 2)  # measured 80 tokens/s, then switched
    assert m.why == "predicted"  # (the trace's bypass marks say why)
    assert m.decide(clock.now + 0.01) is None  # within one interval: no second look
    assert clock.tick(12) is None  # the interval with the switch in it measures nothing; settling
    assert clock.tick(12) is None and m.active == (0, 2)  # measured 96 > 80 tokens/s: confirmed
    assert m.measured((0, 2)) == 96 and m.measured((0, 1, 2)) == 80


def test_a_predicted_switch_that_measures_slower_is_undone() -> None:
    m = fed([1, 9, 10], {(0, 1): 0.8, (1, 2): 0.5}, trial_after=64)
    clock = Clock(m)
    clock.tick(10)
    assert clock.tick(10) == (0, 2)  # 80 tokens/s on the whole chain
    decisions = [clock.tick(8) for _ in range(6)]  # 64 tokens/s: judged once 32 tokens are measured (4 looks)
    assert decisions == [None] * 4 + [(0, 1, 2), None]  # back, although the model still prefers (0, 2)
    assert m.why == "switch lost"
    for _ in range(5):
        assert clock.tick(10) is None  # and the model does not propose it again until its wait is over


def test_monitor_keeps_the_chain_that_is_predicted_and_measured_best() -> None:
    m = fed([0.5, 5, 20], {(0, 1): 0.8, (1, 2): 0.8}, trial_after=10_000, removal_trial_after=10_000)
    clock = Clock(m)
    for _ in range(10):
        assert clock.tick(20) is None
    assert m.active == (0, 1, 2)


def test_trials_find_what_the_model_cannot_see() -> None:
    """Stages sharing a device: the model predicts the whole chain best, but without the draft the others run
    faster. A trial of each neighbour measures it; the faster one stays, the slower ones wait twice as long."""
    m = fed([1, 5, 20], {(0, 1): 0.9, (1, 2): 0.8}, trial_after=64)
    clock = Clock(m)
    rates = {(0, 1, 2): 10, (1, 2): 15, (0, 2): 8, (2,): 9}  # tokens per look
    seen, whys = [], []
    for _ in range(60):
        chain = clock.tick(rates[m.active])
        if chain is not None:
            seen.append(chain)
            whys.append(m.why)
    assert seen[0] in ((0, 2), (1, 2))  # the first trial (fewest models first), after 64 tokens
    assert whys[0] == "trial" and "trial lost" in whys  # (the trace's bypass marks say why)
    assert (1, 2) in seen and m.active == (1, 2)  # kept: it measured faster
    assert (0, 1, 2) in seen[seen.index((1, 2)) + 1:]  # the whole chain is tried again later, and loses


def test_monitor_answers_caps_per_pair() -> None:
    m = fed([1, 10], {(0, 1): 0.9})
    assert m.verify_cap(0, 1, 64) == 64  # one-token forwards all cost the same: long windows
    assert m.run_ahead(0, 1, 64) == useful_run_ahead(m.alpha(0, 1), 64)
    assert m.candidates() == [(1,), (0, 1)]
    assert ChainMonitor(1).decide(now=5.0) is None  # nothing to choose with one model


def test_monitor_asks_for_a_block_only_from_the_draft() -> None:
    m = fed([0.3, 6, 9], {(0, 1): 0.9, (1, 2): 0.9})
    assert m.block(1, 64) == best_block(m.alpha(0, 1), *m.latency(1), 0.3e-3, useful_run_ahead(m.alpha(0, 1), 64)) > 0
    assert m.block(2, 64) == 0  # the target's proposer is the 7B-like middle: its tokens come a forward at a time
    m.active = (0, 2)  # the middle bypassed: the target checks the draft's tokens, relayed
    assert m.block(2, 64) > 0
    assert ChainMonitor(2).block(1, 64) == 0  # no latencies seen yet
    gpu0 = frozenset({"cuda:0"})
    assert ChainMonitor(2, devices=(gpu0, gpu0)).block(1, 64) == COLD_BLOCK  # lock step names a first block at once
    assert ChainMonitor(2, devices=(gpu0, gpu0)).block(1, 2) == 2
    assert m.draft_seconds() is not None and abs(m.draft_seconds() - 0.3e-3) < 1e-9


def test_lock_step_probes_a_draft_it_stopped_waiting_for() -> None:
    """Only a block's call times the draft in lock step, so a verifier that asks for no block would never see the
    draft get fast again: every ``PROBE_EVERY``-th time it asks for one token's block anyway."""
    gpu0 = frozenset({"cuda:0"})
    locked = fed([5, 6], {(0, 1): 0.6}, devices=(gpu0, gpu0))  # a draft as slow as its target: no block is worth it
    assert [locked.block(1, 64) for _ in range(2 * PROBE_EVERY)] == ([0] * (PROBE_EVERY - 1) + [1]) * 2
    free = fed([5, 6], {(0, 1): 0.6})  # not in lock step: the draft's every call is timed, no probe is needed
    assert [free.block(1, 64) for _ in range(2 * PROBE_EVERY)] == [0] * 2 * PROBE_EVERY


def test_stages_on_devices_of_their_own_are_not_taken_out_on_trial() -> None:
    m = fed([0.5, 5, 20], {(0, 1): 0.8, (1, 2): 0.8}, trial_after=16, contended=(False, False, False))
    clock = Clock(m)
    for _ in range(20):
        assert clock.tick(20) is None  # the model keeps the whole chain, and there is nothing to try
    m = fed([1, 9, 10], {(0, 1): 0.8, (1, 2): 0.5}, trial_after=16, contended=(False, False, False))
    clock = Clock(m)
    seen = [clock.tick(20) for _ in range(20)]
    assert seen[1] == (0, 2) and (0, 1, 2) in seen  # bypassed by the model; a bypassed stage is still tried again
