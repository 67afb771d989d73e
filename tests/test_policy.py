"""The adaptive policy on hand-made numbers."""

from __future__ import annotations

import math

from pipespec.policy import LinkEstimator, best_verify_cap, useful_run_ahead, window_yield


def test_window_yield() -> None:
    assert window_yield(0.0, 8) == 1.0
    assert window_yield(1.0, 8) == 9.0
    assert math.isclose(window_yield(0.5, 2), 1 + 0.5 + 0.25)


def test_best_cap_is_long_when_tokens_are_free_and_short_when_they_cost() -> None:
    assert best_verify_cap(0.9, t0=10e-3, t1=0.0) == 64  # GPU-like: a window costs the same at any length
    assert best_verify_cap(0.9, t0=10e-3, t1=0.0, ceiling=16) == 16
    assert best_verify_cap(0.5, t0=1e-3, t1=1e-3) <= 2  # CPU-like: each token costs as much as the pass
    assert best_verify_cap(0.0, t0=1e-3, t1=1e-4) == 1


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
