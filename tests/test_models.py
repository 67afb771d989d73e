"""The model worker: KV-cache reuse and rollback give the same logits as a fresh forward pass."""

from __future__ import annotations

import random

import torch

from conftest import tiny_llama
from helpers import grow_or_diverge
from pipespec.workers.base import common_prefix
from pipespec.workers.hf import HFWorker
from pipespec.verify import SamplingParams


def fresh_logits(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    return model(torch.tensor([seq])).logits[0]  # [len(seq), vocab]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix([], [1]) == 0
    assert common_prefix([5, 6, 7, 8, 9], [5, 6, 7, 8, 0]) == 4


@torch.inference_mode()
def test_cache_rollback_matches_fresh_forward() -> None:
    model = tiny_llama(3)
    worker = HFWorker(model, "m", torch.device("cpu"))
    worker.reset()
    rng = random.Random(0)
    seq = [rng.randrange(96) for _ in range(6)]
    for _ in range(30):
        # grow, or diverge at a random point (a rollback), then ask for the last few positions' logits
        seq = grow_or_diverge(rng, seq, 4)
        first = rng.randrange(max(1, len(seq) - 5), len(seq) + 1)
        got = worker.logits(seq, first)
        want = fresh_logits(model, seq)[first - 1:]
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-9)
        assert worker.cached == seq
        assert worker.cache.get_seq_length() == len(seq)


@torch.inference_mode()
def test_step_accepts_own_choices_and_corrects_the_rest() -> None:
    model = tiny_llama(4)
    worker = HFWorker(model, "m", torch.device("cpu"))
    worker.reset()
    params = SamplingParams()
    prompt = [1, 2, 3]
    own = worker.draft(prompt, 4, params).tokens  # the model's own greedy continuation
    assert len(own) == 4
    result = worker.step(prompt + list(own), len(prompt), params)
    assert result.accepted == 4 and result.tokens[:4] == own and len(result.tokens) == 5
    wrong = (own[0], (own[1] + 1) % 96, own[2])
    result = worker.step(prompt + list(wrong), len(prompt), params)
    assert result.accepted == 1
    assert result.tokens == (own[0], own[1])  # the correction is the model's own token
    result = worker.step(prompt, len(prompt), params)  # nothing proposed: one plain decoding step
    assert result.accepted == 0 and result.tokens == (own[0],)
    worker.release()
    assert worker.cache is None
