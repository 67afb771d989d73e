"""End to end on tiny random models: every mode and chain reproduces the target decoding alone, token for token."""

from __future__ import annotations

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import hf_greedy, limit, slow
from pipespec.errors import ConfigError

PROMPTS = [[7], [5, 17, 33, 2, 9], list(range(3, 60, 2))]


def chain(kind: str, length: int, target_model: torch.nn.Module, delay: float = 0.003) -> list[torch.nn.Module]:
    """Drafts of the given kind for the target, smallest first; the target is slowed so drafts run ahead."""
    drafts: list[torch.nn.Module] = []
    for i in range(length - 1):
        if kind == "identical":
            drafts.append(noisy_copy(target_model, 0.0, i))
        elif kind == "noisy":
            drafts.append(noisy_copy(target_model, 0.5 - 0.2 * i, 10 + i))
        else:
            drafts.append(tiny_llama(100 + i, hidden=32))
    return [*drafts, slow(target_model, delay)]


CHAINS = [("identical", 1)] + [(kind, n) for n in (2, 3, 4) for kind in ("identical", "noisy", "unrelated")]


@pytest.mark.parametrize(("kind", "length"), CHAINS)
@pytest.mark.parametrize("fast", [False, True], ids=["hf-forward", "static-cache"])
@limit(120)
async def test_greedy_equals_target_alone(kind: str, length: int, fast: bool, target: torch.nn.Module) -> None:
    """Both model paths: HF's own forward with a dynamic cache (where the slowed target makes drafts run ahead) and
    the static-cache path (which bypasses the slowing, so stages race as equals)."""
    models = chain(kind, length, target)
    async with pipespec.Pipeline.load(models, device="cpu", fast=fast) as pipe:
        for prompt in PROMPTS:
            n = 24
            want = hf_greedy(target, prompt, n)
            for mode in ("pipe", "sd", "ar"):
                g = await pipe.generate(prompt, max_new_tokens=n, mode=mode)
                assert list(g.token_ids) == want, (mode, prompt)
                assert g.stats.tokens == n
                assert len(g.stats.stages) == length
                target_stats = g.stats.stages[-1]
                # every committed token was either an accepted proposal or the target's own token
                assert target_stats["accepted"] + target_stats["drafted"] >= n
                assert target_stats["accepted"] <= target_stats["proposed"]
                if mode == "ar":
                    assert target_stats["forwards"] == n + (len(prompt) > 1) and target_stats["proposed"] == 0


@limit(120)
async def test_acceptance_reflects_draft_quality(target: torch.nn.Module) -> None:
    """Identical drafts are always accepted and never rolled back; unrelated ones almost never accepted."""
    prompt = PROMPTS[1]
    async with pipespec.Pipeline.load(chain("identical", 2, target, delay=0.01), device="cpu", fast=False) as pipe:
        g = await pipe.generate(prompt, max_new_tokens=40, mode="pipe")
        draft, tgt = g.stats.stages
        assert tgt["proposed"] > 0 and tgt["accepted"] == tgt["proposed"]
        assert draft["rollbacks"] == 0 and tgt["rollbacks_sent"] == 0
        g = await pipe.generate(prompt, max_new_tokens=40, mode="sd", lookahead=5)
        assert g.stats.stages[1]["accepted"] == g.stats.stages[1]["proposed"] > 0
    async with pipespec.Pipeline.load(chain("unrelated", 2, target, delay=0.01), device="cpu", fast=False) as pipe:
        g = await pipe.generate(prompt, max_new_tokens=40, mode="sd")
        tgt = g.stats.stages[1]
        assert tgt["proposed"] > 0 and tgt["accepted"] / tgt["proposed"] < 0.3
        assert g.stats.stages[0]["rollbacks"] > 0


@limit(60)
async def test_eos_stops_and_is_kept(target: torch.nn.Module) -> None:
    prompt = PROMPTS[1]
    want = hf_greedy(target, prompt, 30)
    eos = want[9]
    stop_at = want.index(eos)
    models = chain("noisy", 3, target)
    models[-1].generation_config.eos_token_id = eos
    async with pipespec.Pipeline.load(models, device="cpu") as pipe:
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(prompt, max_new_tokens=30, mode=mode)
            assert list(g.token_ids) == want[:stop_at + 1]
            assert g.stats.stop_reason == "eos"


@limit(60)
async def test_generations_in_sequence_and_stream(target: torch.nn.Module) -> None:
    models = chain("noisy", 2, target)
    async with pipespec.Pipeline.load(models, device="cpu") as pipe:
        first = await pipe.generate(PROMPTS[1], max_new_tokens=16)
        second = await pipe.generate(PROMPTS[2], max_new_tokens=16)
        again = await pipe.generate(PROMPTS[1], max_new_tokens=16)
        assert first.token_ids == again.token_ids
        assert list(second.token_ids) == hf_greedy(target, PROMPTS[2], 16)
        # no tokenizer: stream yields no text, but the generation still runs to completion
        pieces = [p async for p in pipe.stream(PROMPTS[1], max_new_tokens=8)]
        assert pieces == []
        assert pipe.snapshot() is not None and pipe.snapshot().committed == 8


@limit(30)
async def test_bad_requests_raise_config_errors(target: torch.nn.Module) -> None:
    async with pipespec.Pipeline.load([target], device="cpu") as pipe:
        for kwargs, match in [({"max_new_tokens": 0}, "max_new_tokens"), ({"mode": "fast"}, "mode"),
                              ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                              ({"top_k": -3}, "top_k"), ({"max_new_tokens": 10_000}, "context")]:
            with pytest.raises(ConfigError, match=match):
                await pipe.generate([1, 2], **kwargs)
        with pytest.raises(ConfigError, match="empty"):
            await pipe.generate([])
        with pytest.raises(ConfigError, match="vocabulary"):
            await pipe.generate([1000])
        with pytest.raises(ConfigError, match="tokenizer"):
            await pipe.generate("text needs a tokenizer")


@limit(30)
async def test_mismatched_vocabularies_are_refused(target: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="vocabulary"):
        await pipespec.Pipeline.load([tiny_llama(1, vocab=80), target], device="cpu")
