"""Every backend is lossless: the same chain, its workers in processes of their own (``runners.process``) or in Ray
actors on two simulated nodes (``runners.ray``), gives the target's own greedy tokens, the ar mode's sampled tokens
seed for seed (coupled rule) and the target's distribution (rejection rule: the proposer's probability rows cross
from one worker process to the next). A worker that dies or hangs ends the generation with one ``PipelineError``
that names the stage, at once; closing leaves no process behind.

The thread backend is tested the same way by test_pipeline.py, test_sampling.py and test_reliability.py.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import hf_greedy, limit, save_folder, slow
from pipespec.errors import PipelineError
from pipespec.runners import Backend
from pipespec.verify import SamplingParams
from test_sampling import PROMPT3, assert_matches, exact_two_token_distribution, sample_pairs, vocab3_chain

PROMPT = [5, 17, 33, 2, 9, 41]


def children() -> set[int]:
    """Live (not zombie) child processes of this process, from /proc (psutil is not a dependency)."""
    me, out = str(os.getpid()), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


def target_of(folders: list[str]) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folders[-1], dtype=torch.float64).eval()


@limit(240)
async def test_process_backend_is_lossless_greedy_and_coupled(folder_chain: list[str]) -> None:
    """Model folders (conftest's, float64: window shapes cannot flip an argmax), loaded in each child."""
    expected = hf_greedy(target_of(folder_chain), PROMPT, 24)
    before = children()
    async with pipespec.Pipeline.load(folder_chain, device="cpu", dtype="float64", backend="process") as pipe:
        assert len(children() - before) == 3
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(PROMPT, max_new_tokens=24, mode=mode)
            assert list(g.token_ids) == expected, mode
        assert g.stats.stages[-1]["busy_seconds"] > 0  # the child's time inside calls comes back
        for temperature, top_k, seed in [(1.0, 0, 0), (0.7, 10, 1), (1.3, 0, 2)]:
            opts = dict(max_new_tokens=16, temperature=temperature, top_k=top_k, seed=seed)
            alone = await pipe.generate(PROMPT, mode="ar", **opts)
            for mode in ("pipe", "sd"):
                assert (await pipe.generate(PROMPT, mode=mode, **opts)).token_ids == alone.token_ids, (mode, seed)
    assert children() == before
