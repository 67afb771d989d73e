"""Simulated models in the real scheduler: the oracle, the worker's verification semantics, losslessness of every
mode on simulated stages, and measured throughput against the analytical model."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from helpers import limit, target_alone
from pipespec.analysis.model import predict_throughput
from pipespec.cli import main
from pipespec.errors import ConfigError, PipelineError
from pipespec.analysis.simulation import simulate
from pipespec.analysis.oracle import Oracle
from pipespec.apps.simulate import run_on_clock, simulate_report, simulated_pipeline
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline
from pipespec.workers.simulated import SimulatedWorker
from pipespec.verify import SamplingParams

torch.set_num_threads(1)

GREEDY = SamplingParams()
PROMPT = [5, 17, 33, 2, 9, 11]


def instant(oracle: Oracle, stage: int) -> SimulatedWorker:
    return SimulatedWorker(oracle, stage, lambda n: 0.0, f"sim{stage}")


# --- the oracle ---------------------------------------------------------------------------------------------------


def test_oracle_is_deterministic_and_seeded() -> None:
    a, b, c = Oracle([0.7, 0.7], seed=1), Oracle([0.7, 0.7], seed=1), Oracle([0.7, 0.7], seed=2)
    assert target_alone(a, PROMPT, 50) == target_alone(b, PROMPT, 50)
    assert target_alone(a, PROMPT, 50) != target_alone(c, PROMPT, 50)
    hashes = a.hashes(PROMPT)
    assert [a.choice(0, h, 0) for h in hashes] == [b.choice(0, h, 0) for h in hashes]
    assert all(0 <= a.choice(s, h, 0) < a.vocab for s in range(3) for h in hashes)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_oracle_agreement_rate(alpha: float) -> None:
    oracle = Oracle([alpha, 0.5], seed=3, vocab=50)
    prefixes = oracle.hashes(list(range(4000)))
    same = sum(oracle.choice(0, h, 0) == oracle.choice(1, h, 0) for h in prefixes) / len(prefixes)
    assert same == pytest.approx(alpha, abs=0.03)
    # a disagreement is never the successor's token, even with a tiny vocabulary
    if alpha == 0.0:
        assert same == 0.0


def test_oracle_trace() -> None:
    trace = [1, 1, 0, 1, 0]
    oracle = Oracle([trace], seed=0)
    h = oracle.root
    for j in range(12):
        assert (oracle.choice(0, h, j) == oracle.choice(1, h, j)) == bool(trace[j % len(trace)])
    assert oracle.rates == [0.6]
    with pytest.raises(ConfigError, match="0/1"):
        Oracle([[1, 2]])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Oracle([1.5])


# --- the worker: exactly what a real greedy model would decide ---------------------------------------------------


def test_step_accepts_the_longest_agreeing_prefix_then_its_own_token() -> None:
    oracle = Oracle([0.5], seed=4)
    target = instant(oracle, 1)
    target.reset()
    assert target.prefill(PROMPT) is True
    own = target_alone(oracle, PROMPT, 6)  # the target's own choices
    start = len(PROMPT)
    r = target.step(PROMPT + own[:5], start, GREEDY)  # all five agree: accepted + bonus
    assert (r.accepted, r.tokens) == (5, tuple(own[:6]))
    wrong = (own[2] + 1) % oracle.vocab
    r = target.step(PROMPT + own[:2] + [wrong, own[3]], start, GREEDY)
    assert (r.accepted, r.tokens) == (2, tuple(own[:3]))  # the correction replaces the first mismatch
    r = target.step(PROMPT, start, GREEDY)  # nothing proposed: one decoding step
    assert (r.accepted, r.tokens) == (0, (own[0],))


def test_forwards_feed_what_a_real_kv_cache_would() -> None:
    oracle = Oracle([0.5], seed=4)
    w = instant(oracle, 1)
    w.reset()
    w.prefill(PROMPT)  # all but the last prompt token
    n = len(PROMPT)
    w.step(PROMPT, n, GREEDY)  # the last prompt token
    w.step(PROMPT + [1, 2, 3], n + 1, GREEDY)  # verifies 2 proposals after token 1: feeds 3
    w.step(PROMPT + [1, 7], n + 2, GREEDY)  # rolled back past 2: re-feeds from position n + 1
    assert w.fed == [n - 1, 1, 3, 1]
    d = instant(oracle, 0)
    d.reset()
    r = d.draft(PROMPT, 3, GREEDY)
    assert d.fed == [n, 1, 1] and len(r.tokens) == 3 and r.accepted == 0


def test_latency_is_spent_in_the_forward() -> None:
    w = SimulatedWorker(Oracle([]), 0, lambda n: 0.002 * n, "sim0")
    w.reset()
    began = time.perf_counter()
    w.step(PROMPT, 2, GREEDY)  # a cold cache: feeds all 6 tokens, 12 ms
    assert time.perf_counter() - began >= 0.009


def test_sampling_is_refused() -> None:
    w = instant(Oracle([0.5]), 0)
    w.reset()
    with pytest.raises(ConfigError, match="greedy only"):
        w.draft(PROMPT, 1, SamplingParams(temperature=0.7))
    with pytest.raises(ConfigError, match="no logits"):
        w.logits(PROMPT, 1)


# --- the real scheduler on simulated stages ----------------------------------------------------------------------


@limit(60)
async def test_every_mode_commits_the_target_alone_tokens() -> None:
    oracle_check = None
    async with simulated_pipeline([0.1, 0.5, 1.5], [0.7, 0.6], seed=9, vocab=1000) as pipe:
        oracle_check = pipe.members[0].worker.oracle  # type: ignore[attr-defined]
        want = target_alone(oracle_check, PROMPT, 80)
        for mode in ("pipe", "sd", "ar"):
            for lookahead in (3, 8):
                g = await pipe.generate(PROMPT, max_new_tokens=80, mode=mode, lookahead=lookahead, verify_cap=16)
                assert list(g.token_ids) == want, (mode, lookahead)
        g = await pipe.generate(PROMPT, max_new_tokens=80, mode="pipe", verify_cap=4, max_ahead=6)
        assert list(g.token_ids) == want
        stats = g.stats.stages
        assert stats[1]["proposed"] > 0 and stats[2]["proposed"] > 0
        assert stats[0]["rollbacks"] > 0  # alpha < 1: the draft was rolled back
        with pytest.raises(PipelineError, match="greedy only"):
            await pipe.generate(PROMPT, max_new_tokens=5, temperature=0.5)
    # the discrete-event simulation replays the same models: same tokens
    sim = simulate([1e-4, 5e-4, 1.5e-3], [0.7, 0.6], 80, "pipe", models=oracle_check.with_prompt(PROMPT))
    assert list(sim.output[:80]) == want


@limit(60)
async def test_a_stage_never_verifies_more_than_its_workers_fast_window() -> None:
    """A worker that says its forwards past 1 + max_window tokens are slow (a quantized model: its GEMV kernel serves
    16 rows) is never given a bigger verification, whatever the request's cap or lookahead, in pipe with and without
    the adaptive runtime and in sd; the tokens are still the target's. The first of those real forwards (the draft ran ahead
    during the target's prefill) once taught the adaptive runtime a 10x cost per token, and it kept the windows at 3
    or 4 for the rest of a 70B generation (docs/benchmarks.md)."""
    oracle = Oracle([0.95], seed=5, vocab=1000)
    draft = SimulatedWorker(oracle, 0, lambda n: 1e-4, "sim0")
    target = SimulatedWorker(oracle, 1, lambda n: 2e-3, "sim1", max_window=5)
    members = [Member(w.name, ThreadRunner(f"{i}-{w.name}", torch.device("cpu"), w), w.describe())
               for i, w in enumerate((draft, target))]
    want = target_alone(oracle, PROMPT, 60)
    async with Pipeline(members, None) as pipe:
        for adaptive in (True, False):
            g = await pipe.generate(PROMPT, max_new_tokens=60, mode="pipe", verify_cap=64, adaptive=adaptive)
            assert list(g.token_ids) == want
            assert g.stats.stages[1]["proposed"] > 0
            assert max(target.fed[1:]) <= 6, target.fed  # after the prefill: 1 + at most 5 proposals per forward
            if not adaptive:  # the draft (20x faster, alpha 0.95) would fill ~20 (the adaptive cap: 4 after a start at 5)
                assert max(target.fed[1:]) == 6, target.fed
        # sd's rounds too: lookahead 16 would feed 16 tokens a round; the window stays within 5 proposals
        g = await pipe.generate(PROMPT, max_new_tokens=60, mode="sd", lookahead=16)
        assert list(g.token_ids) == want
        assert max(target.fed[1:]) == 6, target.fed  # after the first round's forward, which feeds the prompt too


@limit(60)
async def test_recorded_traces_drive_acceptance() -> None:
    async with simulated_pipeline([0.1, 1.0], [[1]], seed=2) as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=60, mode="pipe")
        target = g.stats.stages[1]
        assert target["proposed"] > 0 and target["accepted"] == target["proposed"]
        assert g.stats.stages[0]["rollbacks"] == 0
    async with simulated_pipeline([0.1, 1.0], [[0]], seed=2) as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=30, mode="sd")
        assert g.stats.stages[1]["accepted"] == 0 and g.stats.stages[1]["proposed"] > 0
        ar = await pipe.generate(PROMPT, max_new_tokens=30, mode="ar")
        assert ar.token_ids == g.token_ids


def test_pipeline_validation() -> None:
    with pytest.raises(ConfigError, match="acceptance values"):
        simulated_pipeline([1, 2, 3], [0.5])
    with pytest.raises(ConfigError, match="> 0 ms"):
        simulated_pipeline([0, 2], [0.5])


def test_measured_throughput_matches_the_model() -> None:
    """A fast chain (0.2, 2, 8 ms): the real orchestrator reaches the predicted rate and asynchrony beats lock step
    on the same stages.

    The prediction (analysis.py's formula) is checked against the event simulation of the same acceptance draws
    (simulation.py: another computation, no clock). The wall-clock figures run on sleeps, so a loaded 2-core host
    slows them: each attempt runs pipe and sd back to back (paired: a busy minute hits both alike), and the test
    passes at the first of up to 3 attempts that meets both bounds. A real regression (pipe no faster than sd, or
    an orchestrator that misses the predicted rate by 40 %) fails all three; a chance stall fails one."""
    options = dict(tokens=200, repeats=2, seed=1)
    predicted = predict_throughput([0.0002, 0.002, 0.008], [0.8, 0.8], "pipe")
    attempts = []
    for _ in range(3):
        pipe = run_on_clock(lambda clock: simulate_report(clock, [0.2, 2, 8], [0.8, 0.8], mode="pipe", **options))
        sd = run_on_clock(lambda clock: simulate_report(clock, [0.2, 2, 8], [0.8, 0.8], mode="sd", **options))
        assert pipe["lossless"] and sd["lossless"]
        measured, ratio = pipe["measured_tokens_per_s"], pipe["measured_tokens_per_s"] / sd["measured_tokens_per_s"]
        attempts.append((round(measured / predicted, 3), round(ratio, 3)))
        if 0.6 * predicted < measured < 1.3 * predicted and ratio > 1.1:
            break
    else:
        raise AssertionError(f"(measured / predicted, pipe / sd) in 3 paired attempts: {attempts}")
    print(f"\n(measured / predicted, pipe / sd) per attempt: {attempts}")
    # the formula against the simulation of the same draws (one 200-token run misses the expectation by ~10 %),
    # and, in that simulation, asynchrony wins by more than the 1.1 asked of the wall clock
    assert pipe["predicted_tokens_per_s"] == pytest.approx(pipe["simulated_tokens_per_s"], rel=0.15)
    assert pipe["simulated_tokens_per_s"] > 1.2 * sd["simulated_tokens_per_s"]
    assert pipe["orchestrator_overhead_us_per_token"] > 0
    assert [st["forwards"] > 0 for st in pipe["stages"]] == [True, True, True]


def test_simulate_cli_json() -> None:
    result = CliRunner().invoke(main, ["simulate", "--latencies-ms", "0.2,1", "--acceptance", "0.9",
                                       "--tokens", "40", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("measured_tokens_per_s", "predicted_tokens_per_s", "simulated_tokens_per_s", "mode",
                "orchestrator_overhead_us_per_token", "stages"):
        assert key in report
    assert report["mode"] == "pipe" and len(report["stages"]) == 2 and report["tokens"] == 40
    bad = CliRunner().invoke(main, ["simulate", "--latencies-ms", "1,2,3", "--acceptance", "0.5"])
    assert bad.exit_code == 2 and "acceptance values" in bad.output
