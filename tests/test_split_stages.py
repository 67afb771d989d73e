"""A model on several devices (``--placement ...,0+1``, ``Pipeline.load(device=[..., "cuda:0+cuda:1"])``): the chain
stays lossless with its target split tensor-parallel (two gloo ranks on the CPU, spelled ``"cpu+cpu"``: rank 0 on
the stage's runner, rank 1 a follower process) on the thread and the process backends, and split layer-wise; what
cannot be split is refused with one line before anything is generated."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import pipespec
from helpers import hf_greedy, limit
from pipespec.errors import ConfigError
from test_tensor_parallel import _state

PROMPT = [5, 17, 33, 2, 9, 41]


def target_of(folder: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()


@limit(120)
async def test_tensor_parallel_target_is_lossless_in_every_mode(folder_chain: list[str]) -> None:
    """conftest's target (4 heads, 2 kv heads, MLP 96) over two ranks; float64, so no near-tie can flip an argmax."""
    chain = [folder_chain[0], folder_chain[2]]
    expected = hf_greedy(target_of(chain[-1]), PROMPT, 20)
    async with pipespec.Pipeline.load(chain, device=["cpu", "cpu+cpu"], dtype="float64") as pipe:
        target = pipe.target.worker
        assert type(target).__name__ == "TPStaticWorker" and len(target.follower_pids) == 1
        assert target.static.cache_k[0].shape[1] == 1  # rank 0 holds one of the two kv heads
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(PROMPT, max_new_tokens=20, mode=mode)
            assert list(g.token_ids) == expected, mode
        pid = target.follower_pids[0]
    # closing the pipeline ends the runner's thread, and with it the follower (PR_SET_PDEATHSIG)
    deadline = time.monotonic() + 10
    while _state(pid) not in ("Z", None) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _state(pid) in ("Z", None)


@limit(150)
async def test_tensor_parallel_target_inside_a_process_stage(folder_chain: list[str]) -> None:
    """The process backend: rank 0 is the stage's child process, which starts the follower itself."""
    chain = [folder_chain[0], folder_chain[2]]
    expected = hf_greedy(target_of(chain[-1]), PROMPT, 16)
    async with pipespec.Pipeline.load(chain, device=["cpu", "cpu+cpu"], dtype="float64", backend="process") as pipe:
        g = await pipe.generate(PROMPT, max_new_tokens=16, mode="pipe")
        assert list(g.token_ids) == expected


@limit(60)
async def test_layer_split_target_is_lossless(folder_chain: list[str]) -> None:
    """--split layers over two (CPU) devices: the layer assignment and the static forward, one process."""
    chain = [folder_chain[0], folder_chain[2]]
    expected = hf_greedy(target_of(chain[-1]), PROMPT, 16)
    async with pipespec.Pipeline.load(chain, device=["cpu", "cpu+cpu"], dtype="float64", split="layers") as pipe:
        assert type(pipe.target.worker).__name__ == "StaticWorker"
        for mode in ("pipe", "ar"):
            g = await pipe.generate(PROMPT, max_new_tokens=16, mode=mode)
            assert list(g.token_ids) == expected, mode


@limit(60)
async def test_heads_that_do_not_split_are_refused_with_a_hint() -> None:
    # the built-in target has 5 attention heads: not divisible by 2
    with pytest.raises(ConfigError, match=r"attention heads \(5\) divisible by 2.*--split layers") as info:
        await pipespec.Pipeline.load(["tiny-draft", "tiny-target"], device=["cpu", "cpu+cpu"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(split="diagonal"), "unknown split"),
    (dict(backend="ray"), "not supported with the ray backend"),
])
@limit(30)
async def test_bad_splits_fail_before_loading(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await pipespec.Pipeline.load(["tiny-draft", "tiny-target"], device=["cpu", "cpu+cpu"], **kwargs)


@limit(30)
async def test_a_loaded_model_cannot_be_split() -> None:
    from conftest import tiny_llama

    with pytest.raises(ConfigError, match="can be split over several devices"):
        await pipespec.Pipeline.load([tiny_llama(0), tiny_llama(1)], device=["cpu", "cpu+cpu"])


def test_bench_refuses_hf_baselines_for_a_split_model() -> None:
    from pipespec.apps.bench.run import BenchSettings

    settings = BenchSettings(models=("tiny-draft", "tiny-target"), devices=("cpu", "cpu+cpu"), methods=("hf", "pipe"))
    with pytest.raises(ConfigError, match="placed on several GPUs"):
        settings.validate()
    BenchSettings(models=("tiny-draft", "tiny-target"), devices=("cpu", "cpu+cpu"), methods=("pipe",)).validate()
