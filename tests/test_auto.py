"""Mode "auto": the pipeline probes ar, sd and pipe on its own placement once, runs the fastest, remembers it, and
says what it chose and why.

The rule checked (paired, on simulated stages that sleep, so the timing is the chain's own): after the choice, a
generation in mode auto IS a generation of the chosen mode (asserted: same mode in its stats, same tokens), so its
speed is that mode's; the chosen mode's median rate is at least 0.95x the best mode's, all measured in the same
rounds (ar, sd, pipe, auto in turn; 5 rounds, pooled with 5 more up to twice while the bound is missed: see
``_check_choice``). Auto's own median is reported in the failure message but not compared directly: it is a second sample of the chosen mode, and at these short generations two samples of one mode
differ by up to ~8 % on this loaded machine."""

from __future__ import annotations

import re
import statistics

import pytest

from helpers import limit
from pipespec.analysis.model import predict_throughput
from pipespec.apps.simulate import simulated_pipeline
from pipespec.scheduler import pipeline as pipeline_module
from pipespec.scheduler.pipeline import runoff_modes, runoff_settled, tune_lookahead
from pipespec.errors import ConfigError

PROMPT = list(range(3, 19))


async def _rounds(pipe, tokens: int, rates: dict[str, list[float]], rounds: int = 5, **options) -> dict[str, float]:
    """``rounds`` more paired rounds (ar, sd, pipe, auto in turn) added to ``rates``; the medians of all so far."""
    for _ in range(rounds):
        for mode in ("ar", "sd", "pipe", "auto"):
            g = await pipe.generate(PROMPT, max_new_tokens=tokens, mode=mode, **options)
            rates.setdefault(mode, []).append(g.stats.tokens_per_second)
            if mode == "auto":
                assert g.stats.mode == g.stats.mode_chosen == pipe.auto_choice[0]
    return {m: statistics.median(r) for m, r in rates.items()}


async def _check_choice(pipe, tokens: int, **options) -> dict[str, float]:
    """What auto runs (its own generations' median: the chosen mode, at the lookahead it tuned for sd) is at least
    0.95x the best of ar, sd and pipe at the request's settings. Stated rule for a loaded 2-core machine: 5 paired
    rounds, and if the bound is missed, 5 more twice, the medians taken over every round so far (a near-tie between
    sd and pipe moved one 5-round median by more than 5 % in CI; a wrong choice stays below the bound however many
    rounds are pooled). Returns the medians that decided. (Not the chosen mode's own row: since auto tunes sd's
    lookahead, "sd" at the request's lookahead is not what auto runs; CI saw sd:16 chosen, the sd:8 row at 0.949x.)"""
    rates: dict[str, list[float]] = {}
    for _ in range(3):
        medians = await _rounds(pipe, tokens, rates, **options)
        best = max(medians[m] for m in ("ar", "sd", "pipe"))
        if medians["auto"] >= 0.95 * best:
            return medians
    raise AssertionError((pipe.auto_choice, medians, {m: len(r) for m, r in rates.items()}))


@limit(240)
async def test_auto_picks_the_target_alone_when_the_draft_is_slow() -> None:
    # the draft is slower than the target and agrees rarely: drafting cannot pay; sd is far behind
    async with simulated_pipeline([8.0, 4.0], [0.2], seed=5, vocab=1000) as pipe:
        first = await pipe.generate(PROMPT, max_new_tokens=48, mode="auto", lookahead=4)
        assert first.token_ids == (await pipe.generate(PROMPT, max_new_tokens=48, mode="ar")).token_ids
        assert first.stats.mode_chosen in ("ar", "pipe") and first.stats.mode == first.stats.mode_chosen
        assert "probes" in (first.stats.reason or "") and "sd" in (first.stats.reason or "")
        medians = await _check_choice(pipe, 48, lookahead=4)
        assert medians["sd"] < 0.8 * medians["ar"]  # the case is what it claims to be


@limit(240)
async def test_auto_speculates_when_the_draft_is_fast_and_agrees() -> None:
    async with simulated_pipeline([0.3, 6.0], [0.9], seed=5, vocab=1000) as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=96, mode="auto")
        assert g.stats.mode_chosen in ("sd", "pipe")
        d = g.stats.to_dict()
        assert d["mode_chosen"] == g.stats.mode_chosen and d["reason"] == g.stats.reason
        medians = await _check_choice(pipe, 96)
        assert medians["ar"] < 0.6 * max(medians.values())


@limit(60)
async def test_auto_is_remembered_and_lossless() -> None:
    async with simulated_pipeline([0.3, 2.0, 5.0], [0.8, 0.8], seed=2, vocab=1000) as pipe:
        want = (await pipe.generate(PROMPT, max_new_tokens=40, mode="ar")).token_ids
        g1 = await pipe.generate(PROMPT, max_new_tokens=40, mode="auto")
        choice = pipe.auto_choice
        g2 = await pipe.generate(PROMPT, max_new_tokens=40, mode="auto")
        assert pipe.auto_choice is choice and g2.stats.reason == g1.stats.reason
        assert g1.token_ids == want and g2.token_ids == want
        assert "mode_chosen" not in (await pipe.generate(PROMPT, max_new_tokens=5)).stats.to_dict()
    async with simulated_pipeline([2.0], [], seed=2) as single:
        g = await single.generate(PROMPT, max_new_tokens=5, mode="auto")
        assert g.stats.mode_chosen == "ar" and "one model" in (g.stats.reason or "")
        with pytest.raises(ConfigError, match="auto, pipe, sd, ar"):
            single.make_request(PROMPT, mode="fast")


@limit(10)
async def test_tune_lookahead_follows_the_analytical_model() -> None:
    # deterministic: the "probe" is the analytical model's sd rate, so the search itself is checked, not the clock
    measured: list[int] = []

    def model(lat_ms: list[float], alpha: float):
        async def measure(lookahead: int) -> float:
            measured.append(lookahead)
            return predict_throughput([x / 1000 for x in lat_ms], [alpha], "sd", lookahead=lookahead)
        return measure

    cheap, dear, flat = model([0.3, 15.0], 0.97), model([2.0, 6.0], 0.7), model([1.0, 10.0], 0.5)
    # (model, start, best, probed in order): twice first, on while it wins; half only where twice lost, on while
    # halving wins (dear: 4 beats 8 and 2 beats 4 by a hair, 212.5 vs 211.1; flat from 16: 8, 4 win, 2 loses)
    for measure, start, want, probed in ((cheap, 8, 16, [16]), (dear, 8, 2, [16, 4, 2]), (flat, 16, 4, [8, 4, 2])):
        measured.clear()
        rates = {start: await measure(start)}
        measured.clear()
        assert await tune_lookahead(measure, start, rates) == want
        assert measured == probed
        assert max(rates.values()) == rates[want]
    measured.clear()
    assert await tune_lookahead(cheap, 16, {16: 1.0}) == 8 and measured == [8, 4]  # capped at 16: no 32
    measured.clear()
    assert await tune_lookahead(dear, 2, {2: 1.0}) == 4 and measured == [4, 8]  # never below one draft per round


@limit(120)
async def test_auto_tunes_the_lookahead_where_sd_leads(monkeypatch) -> None:
    # A very cheap draft that agrees 97 % of the time: `pipespec simulate --latencies-ms 0.3,15 --acceptance 0.97
    # --tokens 96 --mode sd` measured sd:8 352, sd:16 574 tokens/s on this loaded machine (1.6x). Simulated stages
    # never contend, so pipe (sd's asynchronous form) would win here; verify_cap/max_ahead 2 without adaptation
    # stand in for the shared GPU that holds pipe back on the H200 (pipe 89 tokens/s in the same simulate run).
    ran: list[int] = []
    real = pipeline_module.run_lockstep

    async def spy(stages, live, lookahead):
        ran.append(lookahead)
        await real(stages, live, lookahead)

    monkeypatch.setattr(pipeline_module, "run_lockstep", spy)
    slow_pipe = dict(verify_cap=2, max_ahead=2, adaptive=False)
    async with simulated_pipeline([0.3, 15.0], [0.97], seed=5, vocab=1000) as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=96, mode="auto", **slow_pipe)
        assert pipe.auto_choice.mode == "sd" and pipe.auto_choice.lookahead == 16, pipe.auto_choice
        assert g.stats.mode == g.stats.mode_chosen == "sd"
        assert g.stats.reason.startswith("sd (lookahead 16)") and "sd:8 " in g.stats.reason, g.stats.reason
        assert ran[-1] == 16 and sorted(set(ran)) == [8, 16]  # probed 8 and 16 (16 won: 4 not probed); 16 ran
        want = await pipe.generate(PROMPT, max_new_tokens=96, mode="sd", lookahead=16)
        assert g.token_ids == want.token_ids
        # the same sd rounds as an explicit lookahead 16: forwards are counted, not timed
        assert [s["forwards"] for s in g.stats.stages] == [s["forwards"] for s in want.stats.stages]
        # a lookahead the caller gives is respected (the remembered choice is not re-probed)
        ran.clear()
        g4 = await pipe.generate(PROMPT, max_new_tokens=96, mode="auto", lookahead=4, **slow_pipe)
        assert ran == [4] and g4.stats.reason.endswith("lookahead 4 as requested")
        # ... and is the only one probed
        pipe.auto_choice = None
        ran.clear()
        await pipe.generate(PROMPT, max_new_tokens=16, mode="auto", lookahead=4, **slow_pipe)
        assert set(ran) == {4} and "sd:8" not in pipe.auto_choice.reason


@limit(120)
async def test_auto_tunes_down_where_sd_trails_at_its_default_lookahead() -> None:
    # The H200 case that a 0.8 band missed ({68m,7b,13b} on one GPU, alpha 0.7: sd:8 at 0.75x ar, sd:4 1.08x ar):
    # a 2 ms draft before a 5 ms target at alpha 0.65, where the analytical model has sd:8 at 0.73x ar and sd:2 at
    # 1.18x. Pipe is held back as in the test above. Auto must climb down from 8 and choose sd at a lookahead <= 4.
    slow_pipe = dict(verify_cap=2, max_ahead=2, adaptive=False)
    async with simulated_pipeline([2.0, 5.0], [0.65], seed=5, vocab=1000) as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=64, mode="auto", **slow_pipe)
        choice = pipe.auto_choice
        assert "sd:16 " in choice.reason and "sd:4 " in choice.reason, choice  # twice lost, then half was probed
        # sd at its best probed lookahead is a lookahead <= 4, and ar (what the 0.8 band left) is not chosen; pipe,
        # even held back, can come within a few % of sd here (CI: pipe 248.7, sd:4 245.3 tokens/s), so either may win
        probes = choice.reason.split("; runoff")[0]  # the runoff's "sd:4 173.1" is another measure, over 128 tokens
        sd_rates = {int(la): float(r) for la, r in re.findall(r"sd:(\d+) ([\d.]+)", probes)}
        assert max(sd_rates, key=sd_rates.get) <= 4, choice
        assert choice.mode in ("sd", "pipe"), choice
        if choice.mode == "sd":
            assert choice.lookahead <= 4, choice
        want = await pipe.generate(PROMPT, max_new_tokens=64, mode="ar")
        assert g.token_ids == want.token_ids



def test_runoff_takes_the_modes_near_the_leader() -> None:
    assert runoff_modes({"ar": 108.0, "sd": 107.4, "pipe": 105.0}) == ["ar", "sd", "pipe"]
    assert runoff_modes({"ar": 109.5, "sd": 166.6, "pipe": 161.4}) == ["sd", "pipe"]
    assert runoff_modes({"ar": 170.0, "sd": 700.0, "pipe": 550.0}) == ["sd"]  # no runoff: pipe is 0.79x
    assert runoff_modes({"ar": 1.0, "sd": 2.0, "pipe": 3.0}, band=0.0) == ["pipe", "ar", "sd"]


def test_a_runoff_settles_when_its_leader_is_clear() -> None:
    assert runoff_settled({"sd": 572.0, "pipe": 629.3})  # 1.10x
    assert not runoff_settled({"sd": 572.0, "pipe": 565.8})  # CI's single-run near tie that chose wrong
    assert not runoff_settled({"ar": 100.0, "sd": 200.0, "pipe": 190.0})  # every other mode, not just the last
    assert runoff_settled({"ar": 100.0, "sd": 200.0, "pipe": 190.0}, clear=1.05)


@limit(90)
@pytest.mark.parametrize("clear, runs", [(0.0, pipeline_module.RUNOFF_MIN_ROUNDS),
                                         (100.0, pipeline_module.RUNOFF_ROUNDS)])
async def test_a_near_tie_is_decided_by_longer_runs(monkeypatch, clear: float, runs: int) -> None:
    # every mode is "near" (all three run off); each runs RUNOFF_MIN_ROUNDS times, interleaved, and once more where
    # no lead is clear; the best run of each decides
    monkeypatch.setattr(pipeline_module, "RUNOFF_BAND", 0.0)
    monkeypatch.setattr(pipeline_module, "RUNOFF_CLEAR", clear)
    async with simulated_pipeline([0.3, 3.0], [0.9], seed=5, vocab=1000) as pipe:
        real, longer = pipe._run, []

        async def spy(request, on_piece, trace=None, **kwargs):
            if request.max_new_tokens == 128:
                longer.append(request.mode)
            return await real(request, on_piece, trace, **kwargs)

        monkeypatch.setattr(pipe, "_run", spy)
        g = await pipe.generate(PROMPT, max_new_tokens=32, mode="auto")
        choice = pipe.auto_choice
        assert len(longer) == 3 * runs, longer  # each round runs every mode once, the leader first
        assert all(set(longer[i:i + 3]) == {"ar", "sd", "pipe"} for i in range(0, 3 * runs, 3)), longer
        runoff = choice.reason.split(f"runoff over 128 tokens, best of {runs}: ")[1]
        rates = dict(re.findall(r"(ar|sd|pipe)(?::\d+)? ([\d.]+)", runoff))
        assert set(rates) == {"ar", "sd", "pipe"}, choice
        assert choice.mode == max(rates, key=lambda m: float(rates[m])), choice  # the runoff decides
        assert g.token_ids == (await pipe.generate(PROMPT, max_new_tokens=32, mode="ar")).token_ids
