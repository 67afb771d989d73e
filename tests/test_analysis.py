"""Tests of pipespec.analysis (model, simulation): hand-computed closed forms, limits, the never-slower-than-AR
guarantee, input validation, and the simulation (hand-traced runs, determinism, losslessness, agreement with the
closed forms)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import pytest

from pipespec.analysis import model as analysis
from pipespec.analysis import simulation
from pipespec.analysis.model import (
    expected_tokens_per_step,
    lockstep_speedup,
    pipespec_speedup,
    predict_throughput,
    verification_probability,
)
from pipespec.analysis.simulation import SimResult, simulate
from pipespec.types import Mode

# --- closed forms, by hand --------------------------------------------------------------------------------------

# alpha = 0.8, gamma = 4: alpha^5 = 0.32768, window sum (1 - 0.32768) / 0.2 = 3.3616,
# rho = 0.8 / (0.67232 + 0.8) = 0.8 / 1.47232, E[N] = 1 + rho * (3.3616 - 1).
RHO_08_4 = 0.8 / 1.47232


def test_verification_probability_by_hand() -> None:
    assert verification_probability(0.8, 4) == pytest.approx(RHO_08_4, rel=1e-12)
    assert verification_probability(0.8, 4) == pytest.approx(0.5433601, abs=1e-7)
    # alpha = 0.5, gamma = 1: 0.5 / (1 - 0.25 + 0.5) = 0.4
    assert verification_probability(0.5, 1) == pytest.approx(0.4, rel=1e-12)


def test_expected_tokens_per_step_by_hand() -> None:
    assert expected_tokens_per_step(0.8, 4) == pytest.approx(1 + RHO_08_4 * 2.3616, rel=1e-12)
    assert expected_tokens_per_step(0.8, 4) == pytest.approx(2.2831993, abs=1e-7)
    # alpha = 0.5, gamma = 1: 0.6 * 1 + 0.4 * 1.5 = 1.2
    assert expected_tokens_per_step(0.5, 1) == pytest.approx(1.2, rel=1e-12)
    # the paper's PipeSpec speedup is E[N]: by hand, alpha = 0.5, gamma = 1 gives 1.2 (above); alpha = 0 never
    # accepts, so every target step adds exactly one token
    assert pipespec_speedup(0.5, 1) == pytest.approx(1.2, rel=1e-12)
    assert pipespec_speedup(0.0, 4) == pytest.approx(1.0, rel=1e-12)
    assert pipespec_speedup(0.8, 4) == pytest.approx(2.2831993, abs=1e-7)


def test_lockstep_speedup_by_hand() -> None:
    assert lockstep_speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4, rel=1e-12)
    assert lockstep_speedup(0.8, 4, 0.0) == pytest.approx(3.3616, rel=1e-12)  # the "gamma*c dropped" upper bound
    assert lockstep_speedup(0.5, 1, 0.5) == pytest.approx(1.0, rel=1e-12)  # 1.5 tokens for 1.5 target steps
    # PipeSpec's steady state never beats a full window verified every step.
    assert pipespec_speedup(0.8, 4) < lockstep_speedup(0.8, 4, 0.0)


def test_alpha_zero_gives_one_token_per_step() -> None:
    assert verification_probability(0.0, 8) == 0.0
    assert expected_tokens_per_step(0.0, 8) == 1.0
    assert lockstep_speedup(0.0, 8, 0.25) == pytest.approx(1 / 3)  # one token for 8 * 0.25 + 1 target steps
    assert expected_tokens_per_step(1e-9, 8) == pytest.approx(1.0, abs=1e-8)


def test_alpha_one_limits() -> None:
    assert verification_probability(1.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert lockstep_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)
    # Continuous at the limit, without losing precision just below it.
    assert expected_tokens_per_step(1 - 1e-12, 4) == pytest.approx(5.0, rel=1e-9)
    assert lockstep_speedup(1 - 1e-12, 4, 0.0) == pytest.approx(5.0, rel=1e-9)
    assert expected_tokens_per_step(0.999999, 4) < 5.0


def test_never_slower_than_ar_over_a_grid() -> None:
    for a in (0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.999):
        for gamma in (0.5, 1, 2, 4, 8, 16, 64):
            assert expected_tokens_per_step(a, gamma) > 1.0
            assert pipespec_speedup(a, gamma) > 1.0
    for a in (0.05, 0.5, 0.9):
        for draft in (0.0003, 0.002, 0.01, 0.019, 0.03):  # up to a draft slower than the target
            for middle in ([], [0.008]):
                lat = [draft, *middle, 0.02]
                acc = [a] * (len(lat) - 1)
                assert predict_throughput(lat, acc, "pipe") >= predict_throughput(lat, acc, "ar") - 1e-9


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.1, math.nan])
def test_alpha_out_of_range(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        verification_probability(alpha, 4)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(alpha, 4)
    with pytest.raises(ValueError, match="alpha"):
        lockstep_speedup(alpha, 4, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        predict_throughput([0.001, 0.01], [alpha], "pipe")


def test_gamma_and_c_out_of_range() -> None:
    with pytest.raises(ValueError, match="gamma"):
        expected_tokens_per_step(0.8, -1)
    with pytest.raises(ValueError, match="gamma"):
        pipespec_speedup(0.8, -0.5)
    with pytest.raises(ValueError, match="c "):
        lockstep_speedup(0.8, 4, -0.1)


def test_chain_validation() -> None:
    with pytest.raises(ValueError, match="acceptance needs one value"):
        predict_throughput([0.001, 0.005, 0.02], [0.8], "pipe")
    with pytest.raises(ValueError, match="mode"):
        predict_throughput([0.001, 0.02], [0.8], "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="latencies"):
        predict_throughput([0.0, 0.02], [0.8], "sd")
    with pytest.raises(ValueError, match="lookahead"):
        predict_throughput([0.001, 0.02], [0.8], "sd", lookahead=0)
    with pytest.raises(ValueError, match="verify_cap"):
        simulate([0.001, 0.02], [0.8], 10, "pipe", verify_cap=0)
    with pytest.raises(ValueError, match="tokens"):
        simulate([0.001, 0.02], [0.8], 0, "pipe")
    with pytest.raises(ValueError, match="forward must take"):
        simulate([lambda n: 0.0, 0.02], [0.8], 10, "pipe")


# --- predict_throughput, by hand --------------------------------------------------------------------------------


def test_predict_ar() -> None:
    assert predict_throughput([0.001, 0.005, 0.02], [0.8, 0.8], "ar") == pytest.approx(50.0)
    assert predict_throughput([0.02], [], "pipe") == pytest.approx(50.0)


def test_predict_sd_two_models_is_the_lockstep_formula() -> None:
    # Lookahead 5: 4 drafts (gamma = 4) of 2 ms, then a 20 ms verification: 3.3616 tokens per 28 ms.
    assert predict_throughput([0.002, 0.02], [0.8], "sd", lookahead=5) == pytest.approx(3.3616 / 0.028)
    assert predict_throughput([0.002, 0.02], [0.8], "sd", lookahead=5) == pytest.approx(
        lockstep_speedup(0.8, 4, 0.1) / 0.02
    )


def test_predict_sd_three_models_by_hand() -> None:
    # Lookahead 3, alphas 0.5: M0 drafts 2 (2 ms). M1 checks 2: accepts 0 (p .5: 1 ahead, decodes 1 more),
    # 1 (p .25: 2 ahead) or 2 (p .25: 3 ahead with its bonus): 1.5 forwards of 4 ms. The target checks 2 tokens
    # (p .75: 1 + .5 + .25 = 1.75 tokens) or 3 (p .25: 1.875 tokens): 1.78125 tokens per 2 + 6 + 10 ms.
    assert predict_throughput([0.001, 0.004, 0.01], [0.5, 0.5], "sd", lookahead=3) == pytest.approx(1.78125 / 0.018)


def test_predict_pipe_two_models_by_hand() -> None:
    # Draft 2 ms, target 20 ms, alpha 0.8: 10 drafts per target step, one checked against the bonus -> gamma = 9.
    # After a rollback the draft finishes its forward in flight: 9 tokens in the target's decode step, one
    # overlapping it -> first window 8. States: decode (1 token), V1 (window 8), V (window 9).
    # Visits per decode: V1 x = a, V v = a * a^9 / (1 - a^10); tokens: decode 1, V1 (1 - a^9) / (1 - a), V
    # (1 - a^10) / (1 - a). The numerator telescopes: 1 + (a - a^10) / (1 - a) + a^10 / (1 - a) = 1 / (1 - a) = 5,
    # so E[N] = 5 / (1 + a + a^10 / (1 - a^10)) with a^10 = 0.1073741824:
    # 5 / (1.8 + 0.1073741824 / 0.8926258176) = 5 / 1.9202902 = 2.603773 (by hand, not by the code).
    a = 0.8
    assert predict_throughput([0.002, 0.02], [a], "pipe") * 0.02 == pytest.approx(2.603773, abs=2e-6)
    # The paper's chain (no restart lag) is a little more optimistic.
    assert predict_throughput([0.002, 0.02], [a], "pipe") < pipespec_speedup(a, 9) / 0.02


def test_predict_pipe_paper_chain_is_sensible() -> None:
    pipe = predict_throughput([0.0005, 0.005, 0.02], [0.8, 0.8], "pipe")
    sd = predict_throughput([0.0005, 0.005, 0.02], [0.8, 0.8], "sd")
    assert 100 < pipe < 150  # 2-3x over 50 tok/s AR, as the paper reports for 3-model chains
    assert 50 < sd < pipe


# --- the simulation ---------------------------------------------------------------------------------------------


def test_simulate_pipe_by_hand_full_acceptance() -> None:
    # Draft 1 s, target 4 s, alpha 1. t=4: the target decoded p0 itself (nothing to verify at t=0); the draft has
    # p0..p3 (ties go to the draft). t=8: p1..p3 verified + bonus p4 (5 tokens); t=12: p5..p7 + p8 (9 tokens).
    r = simulate([1.0, 4.0], [1.0], 9, "pipe")
    assert (r.committed, r.seconds, r.tokens_per_s) == (9, 12.0, 0.75)
    draft, target = r.stages
    assert (draft.forwards, draft.drafted, draft.rollbacks) == (12, 12, 0)
    assert (target.forwards, target.verifications, target.proposed, target.accepted) == (3, 2, 6, 6)


def test_simulate_pipe_by_hand_no_acceptance() -> None:
    # alpha 0: every draft is wrong. The target decodes alone (1 token / 4 s), rolling the draft back at t=4 and
    # t=8; the draft applies each rollback when its forward in flight ends (t=5, t=9).
    r = simulate([1.0, 4.0], [0.0], 3, "pipe")
    assert (r.committed, r.seconds) == (3, 12.0)
    draft, target = r.stages
    assert (draft.forwards, draft.rollbacks) == (12, 2)
    assert (target.forwards, target.proposed, target.rollbacks_sent) == (3, 0, 2)


def test_simulate_sd_by_hand() -> None:
    # Lookahead 3, alpha 1: 2 drafts of 1 ms, a 10 ms verification yielding 3 tokens; 2 rounds for 6 tokens.
    r = simulate([0.001, 0.01], [1.0], 6, "sd", lookahead=3)
    assert (r.committed, r.seconds, r.tokens_per_s) == pytest.approx((6, 0.024, 250.0))
    draft, target = r.stages
    assert (draft.forwards, target.forwards, target.proposed, target.accepted) == (4, 2, 4, 4)


def test_simulate_ar_and_latency_functions() -> None:
    fed: list[int] = []

    def latency(n: int) -> float:
        fed.append(n)
        return 0.01

    r = simulate([latency], [], 5, "ar")
    assert fed == [1, 1, 1, 1, 1]  # a plain decode feeds one token
    assert r.tokens_per_s == pytest.approx(100.0)
    assert simulate([0.001, 0.02], [0.8], 40, "ar").tokens_per_s == pytest.approx(50.0)


def test_simulate_is_deterministic() -> None:
    args = ([0.0005, 0.005, 0.02], [0.8, 0.8], 300)
    modes: tuple[Mode, ...] = ("pipe", "sd")
    for mode in modes:
        a, b = simulate(*args, mode, seed=7), simulate(*args, mode, seed=7)
        assert isinstance(a, SimResult) and a == b
    assert simulate(*args, "pipe", seed=7).output != simulate(*args, "pipe", seed=8).output


@pytest.mark.parametrize("latencies", [[0.002, 0.02], [0.0005, 0.005, 0.02], [0.0005, 0.002, 0.006, 0.02]])
def test_simulate_is_lossless(latencies: list[float]) -> None:
    # The fake models are deterministic functions of the prefix: every mode must commit the target's own tokens.
    acc = [0.7] * (len(latencies) - 1)
    outputs = {mode: simulate(latencies, acc, 300, mode, seed=3).output[:300] for mode in ("ar", "sd", "pipe")}
    assert outputs["pipe"] == outputs["ar"] == outputs["sd"]


def _mean_rate(
    latencies: Sequence[float | Callable[[int], float]], acc: list[float], tokens: int, mode: Mode, seeds: int,
    **kw: int,
) -> float:
    return statistics.mean(simulate(latencies, acc, tokens, mode, seed=s, **kw).tokens_per_s for s in range(seeds))


def test_simulation_matches_paper_closed_form_with_cheap_drafts() -> None:
    # A draft 200x cheaper than the target, so every window is full (verify_cap = 16) and rollbacks are instant:
    # the regime of the paper's chain, E[N](alpha, 16) per target step.
    for a in (0.9, 0.95):
        sim = _mean_rate([0.0001, 0.02], [a], 10_000, "pipe", seeds=2, verify_cap=16)
        assert sim == pytest.approx(pipespec_speedup(a, 16) / 0.02, rel=0.04)


def test_simulation_matches_predict_throughput() -> None:
    assert _mean_rate([0.002, 0.02], [0.8], 6000, "pipe", seeds=2) == pytest.approx(
        predict_throughput([0.002, 0.02], [0.8], "pipe"), rel=0.03
    )
    assert _mean_rate([0.008, 0.02], [0.8], 4000, "pipe", seeds=2) == pytest.approx(
        predict_throughput([0.008, 0.02], [0.8], "pipe"), rel=0.03
    )
    assert _mean_rate([0.0005, 0.005, 0.02], [0.8, 0.8], 3000, "pipe", seeds=1) == pytest.approx(
        predict_throughput([0.0005, 0.005, 0.02], [0.8, 0.8], "pipe"), rel=0.06
    )
    # Lock step is exact in expectation.
    assert _mean_rate([0.0005, 0.005, 0.02], [0.8, 0.8], 5000, "sd", seeds=3) == pytest.approx(
        predict_throughput([0.0005, 0.005, 0.02], [0.8, 0.8], "sd"), rel=0.03
    )


def test_sd_slower_than_pipe_when_drafts_cost_something() -> None:
    lat, acc = [0.005, 0.02], [0.8]  # c = 0.25
    pipe = _mean_rate(lat, acc, 2000, "pipe", seeds=1)
    for lookahead in (2, 4, 8):
        assert predict_throughput(lat, acc, "sd", lookahead=lookahead) < predict_throughput(lat, acc, "pipe")
        assert _mean_rate(lat, acc, 2000, "sd", seeds=1, lookahead=lookahead) < pipe
    lat3, acc3 = [0.0005, 0.005, 0.02], [0.8, 0.8]
    assert _mean_rate(lat3, acc3, 2000, "sd", seeds=1) < _mean_rate(lat3, acc3, 2000, "pipe", seeds=1)


def test_pipe_never_slower_than_ar_in_simulation() -> None:
    for lat in ([0.03, 0.02], [0.015, 0.02], [0.001, 0.019, 0.02]):
        for a in (0.1, 0.6):
            r = simulate(lat, [a] * (len(lat) - 1), 200, "pipe")
            assert r.tokens_per_s >= 50.0 - 1e-9


def test_costly_verification_favours_a_smaller_cap() -> None:
    # With a constant verify cost a bigger window only helps; at 2 ms per extra token it does not.
    def flat(n: int) -> float:
        return 0.02

    def growing(n: int) -> float:
        return 0.02 + 0.002 * (n - 1)

    lat_flat: list[float | Callable[[int], float]] = [0.0002, flat]
    lat_growing: list[float | Callable[[int], float]] = [0.0002, growing]
    assert _mean_rate(lat_flat, [0.9], 1500, "pipe", seeds=1, verify_cap=32) > _mean_rate(
        lat_flat, [0.9], 1500, "pipe", seeds=1, verify_cap=4
    )
    assert _mean_rate(lat_growing, [0.9], 1500, "pipe", seeds=1, verify_cap=8) > _mean_rate(
        lat_growing, [0.9], 1500, "pipe", seeds=1, verify_cap=64
    )


def test_four_model_chain_runs() -> None:
    lat, acc = [0.0005, 0.002, 0.006, 0.02], [0.8, 0.8, 0.8]
    r = simulate(lat, acc, 1500, "pipe")
    assert r.committed >= 1500 and len(r.stages) == 4
    assert all(s.forwards > 0 for s in r.stages)
    assert all(s.verifications > 0 and s.accepted <= s.proposed for s in r.stages[1:])
    assert all(s.rollbacks > 0 for s in r.stages[:-1])
    assert r.tokens_per_s > 50.0
    assert r.tokens_per_s == pytest.approx(predict_throughput(lat, acc, "pipe"), rel=0.08)
    assert simulate(lat, acc, 1500, "sd").tokens_per_s == pytest.approx(predict_throughput(lat, acc, "sd"), rel=0.06)


def test_the_analysis_package_exports_the_simulation_names() -> None:
    import pipespec.analysis as package
    from pipespec.analysis import SimResult as PackageSimResult
    from pipespec.analysis import StageCounts, simulate as package_simulate

    assert package_simulate is simulate and PackageSimResult is SimResult and StageCounts is simulation.StageCounts
    assert {"simulate", "SimResult", "StageCounts"} <= set(package.__all__)
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_waiting_for_a_slow_predecessor_helps_and_stays_lossless() -> None:
    # A candidate policy, simulated only: with a draft half as fast as the target, waiting for its forward in
    # flight beats decoding alone; with a cheap draft it changes nothing. The output never changes.
    lat, acc = [0.01, 0.02], [0.8]
    assert _mean_rate(lat, acc, 600, "pipe", seeds=2) < statistics.mean(
        simulate(lat, acc, 600, "pipe", seed=s, wait_fraction=0.5).tokens_per_s for s in range(2))
    waited = simulate([0.001, 0.01, 0.02], [0.8, 0.8], 300, "pipe", seed=4, wait_fraction=0.5)
    assert waited.output[:300] == simulate([0.001, 0.01, 0.02], [0.8, 0.8], 300, "ar", seed=4).output[:300]
    with pytest.raises(ValueError, match="wait_fraction"):
        simulate(lat, acc, 10, "pipe", wait_fraction=-1.0)
