"""``pipespec plan``: the predictions from hand-made measurements, a plan of tiny random models end to end, and the
``--json`` shape of the command with the built-in family."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import pipespec
from conftest import noisy_copy
from helpers import limit, slow
from pipespec.analysis.model import predict_throughput
from pipespec.cli import main
from pipespec.apps.plan import CAPS, SIZES, Prediction, plan, predict_chains, recommend
from pipespec.analysis.plan import recommend_mode

torch.set_num_threads(1)


def flat(seconds: float) -> dict[int, float]:
    return {n: seconds for n in SIZES}


def growing(base: float, per_token: float) -> dict[int, float]:
    return {n: base + per_token * (n - 1) for n in SIZES}


def by_config(predictions: list[Prediction]) -> dict[tuple[tuple[str, ...], int | None], Prediction]:
    return {(p.chain, p.verify_cap): p for p in predictions}


def test_every_sub_chain_keeps_the_target() -> None:
    latency = {"a": flat(0.0005), "b": flat(0.005), "c": flat(0.02)}
    agreement = {"a->b": 0.8, "a->c": 0.7, "b->c": 0.8}
    preds = predict_chains(latency, agreement, ["a", "b", "c"], sim_tokens=100)
    chains = {p.chain for p in preds}
    assert chains == {("c",), ("a", "c"), ("b", "c"), ("a", "b", "c")}
    assert len(preds) == 1 + 3 * len(CAPS)
    table = by_config(preds)
    assert table[("c",), None].predicted_tokens_per_s == pytest.approx(50.0)
    # flat latencies: the effective latency is the measured one, so this is predict_throughput itself
    assert table[("a", "b", "c"), 64].predicted_tokens_per_s == pytest.approx(
        predict_throughput([0.0005, 0.005, 0.02], [0.8, 0.8], "pipe", verify_cap=64))
    assert table[("a", "c"), 16].acceptance == (0.7,)  # a sub-chain uses the agreement of its own neighbours
    assert preds == sorted(preds, key=lambda p: -p.predicted_tokens_per_s)
    best = recommend(preds)
    assert len(best.chain) > 1 and best.speedup > 1.5


def test_costly_verification_favours_a_small_cap() -> None:
    latency = {"a": flat(0.0001), "c": growing(0.02, 0.002)}
    table = by_config(predict_chains(latency, {"a->c": 0.9}, ["a", "c"], sim_tokens=200))
    assert table[("a", "c"), 8].predicted_tokens_per_s > table[("a", "c"), 64].predicted_tokens_per_s
    # the cap-64 stage verifies long windows, so its mean forward is far above its 20 ms decode
    assert table[("a", "c"), 64].latencies_ms[1] > 40


def test_plan_recommends_a_mode() -> None:
    latency = {"a": flat(0.0005), "c": flat(0.02)}
    best = recommend(predict_chains(latency, {"a->c": 0.9}, ["a", "c"], sim_tokens=100))
    own = recommend_mode(latency, best, shared_device=False)
    assert own["mode"] == "pipe" and own["predicted_tokens_per_s"]["pipe"] > own["predicted_tokens_per_s"]["ar"]
    # one device for both: the pipeline's prediction assumes a device each, so lock step (or ar) is recommended
    shared = recommend_mode(latency, best, shared_device=True)
    assert shared["mode"] == "sd" and "share a device" in shared["reason"] and "--mode auto" in shared["reason"]
    alone = recommend(predict_chains({"a": flat(0.02), "c": flat(0.02)}, {"a->c": 0.0}, ["a", "c"], sim_tokens=50))
    assert recommend_mode({"a": flat(0.02), "c": flat(0.02)}, alone, shared_device=False)["mode"] == "ar"


def test_a_useless_draft_is_not_recommended() -> None:
    # A draft as slow as the target that never agrees: every chain ties with the target alone at best.
    latency = {"a": flat(0.02), "c": flat(0.02)}
    best = recommend(predict_chains(latency, {"a->c": 0.0}, ["a", "c"], sim_tokens=50))
    assert best.chain == ("c",) and best.verify_cap is None


@limit(90)
async def test_plan_on_tiny_models(target: torch.nn.Module) -> None:
    models = [noisy_copy(target, 0.4, 1), noisy_copy(target, 0.0, 2), slow(target, 0.002)]
    prompts = [[5, 17, 33, 2, 9], list(range(3, 40, 3))]
    async with pipespec.Pipeline.load(models, device="cpu") as pipe:
        result = await plan(pipe, prompts, tokens=12, run=True, reps=1)
        # the loaded pipeline still works after the plan ran a sub-chain of it
        g = await pipe.generate(prompts[0], max_new_tokens=5)
        assert g.stats.tokens == 5
    names = result.models
    assert len(names) == 3 and len(set(names)) == 3
    assert all(list(t) == list(SIZES) and all(v > 0 for v in t.values()) for t in result.latency_ms.values())
    assert set(result.agreement) == {f"{a}->{b}" for a, b in [names[:2], names[::2], names[1:]]}
    assert result.agreement[f"{names[1]}->{names[2]}"] == 1.0  # an exact copy of the target always agrees
    assert all(0.0 <= v <= 1.0 for v in result.agreement.values())
    assert len(result.predictions) == 1 + 3 * len(CAPS)
    assert result.recommended in result.predictions
    assert result.shared_device
    assert result.measured is not None and result.measured["measured_tokens_per_s"] > 0
    assert result.measured["chain"] == list(result.recommended.chain)
    d = result.to_dict()
    json.dumps(d)
    assert d["recommended"]["chain"] == list(result.recommended.chain)


def test_plan_cli_json() -> None:
    result = CliRunner().invoke(main, ["plan", "--device", "cpu", "--num-prompts", "1", "--tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["models"] == ["tiny-draft", "tiny-middle", "tiny-target"]
    assert set(d["latency_ms"]) == set(d["models"]) and list(d["latency_ms"]["tiny-target"]) == [str(n) for n in SIZES]
    assert set(d["acceptance"]) == {"tiny-draft->tiny-middle", "tiny-draft->tiny-target", "tiny-middle->tiny-target"}
    assert len(d["predictions"]) == 1 + 3 * len(CAPS)
    for p in d["predictions"]:
        assert p["chain"][-1] == "tiny-target" and p["predicted_tokens_per_s"] > 0
    assert d["recommended"] in d["predictions"] and d["measured"] is None
    assert d["mode"]["mode"] in ("ar", "sd") and d["shared_device"]  # every model on the CPU: no pipe on the model's word
    bad = CliRunner().invoke(main, ["plan", "--prompts", "no-such-set", "--json"])
    assert bad.exit_code == 2 and "unknown prompt set" in bad.output

