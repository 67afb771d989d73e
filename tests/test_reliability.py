"""Reliability: bad input, faults inside a stage, long runs, the context limit.

- Bad input: the CLI prints one line (``pipespec: error: ...``), exits with code 2 and shows no traceback; the API
  raises a ``ConfigError`` whose message is that same line.
- Faults: a stage whose forward pass raises mid-generation (a fake model that fails on its N-th call) stops the
  whole pipeline within a second; the caller gets one ``PipelineError`` naming the stage; no thread or KV cache is
  left behind and the pipeline serves the next generation (or says it is closed). A simulated CUDA OOM names the
  model and device and suggests a placement.
- Long runs: 500 generations back to back with flat memory and steady throughput; a generation that fills the
  context exactly, without any stage computing a position past it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from click.testing import CliRunner

import pipespec
from conftest import noisy_copy, tiny_llama
from faults import FaultyLlama, WorkerFault, faulty, oom, own_threads, rss_mib
from helpers import byte_tokenizer, hf_greedy, limit, save_folder
from pipespec.cli import main
from pipespec.errors import ConfigError, PipelineClosed, PipelineError
from pipespec.workers.static import StaticWorker

torch.set_num_threads(1)

PROMPT = [5, 17, 33, 2, 9]

# -- bad input: the CLI and the API say the same thing ----------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    tok = byte_tokenizer(300)
    vocab = len(tok)
    target = tiny_llama(0, hidden=48, vocab=vocab, dtype=torch.float32)
    out = {"target": save_folder(target, tok, root / "target"),
           "other_vocab": save_folder(tiny_llama(5, vocab=vocab - 7), None, root / "other_vocab")}
    other_tok = byte_tokenizer(300)
    other_tok.add_tokens(["zzz_extra"])
    out["other_tokenizer"] = save_folder(tiny_llama(6, vocab=vocab), other_tok, root / "other_tokenizer")
    garbage = Path(save_folder(target, tok, root / "garbage"))
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    out["garbage"] = str(garbage)
    truncated = Path(save_folder(target, tok, root / "truncated"))
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = str(truncated)
    no_weights = Path(save_folder(target, tok, root / "no_weights"))
    (no_weights / "model.safetensors").unlink()
    out["no_weights"] = str(no_weights)
    short = tiny_llama(0, hidden=48, vocab=vocab, dtype=torch.float32)
    short.config.max_position_embeddings = 32
    out["short"] = save_folder(short, tok, root / "short")
    (root / "empty").mkdir()
    out["empty"] = str(root / "empty")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("caf\xe9 = 1".encode("latin-1"))
    out["latin1"] = str(latin1)
    return out


LONG_PROMPT = "def add(a, b):\n    return a + b\n" * 6  # 80+ tokens: longer than the 32-position "short" model

# (CLI arguments, the same request through the API or None for CLI-only input, a fragment of the message).
# Upper-case words are folder names from the fixture. The API call loads MODELS (the --models list) on the CPU
# and generates from PROMPT with OPTIONS, exactly what the CLI does with those arguments.
CASES: list[tuple[list[str], dict[str, Any] | None, str]] = [
    (["--models", "no/such/folder/here"], {"models": ["no/such/folder/here"]}, "model folder not found"),
    (["--models", "definitely-not-a-model"], {"models": ["definitely-not-a-model"]}, "unknown model"),
    (["--models", "EMPTY"], {"models": ["EMPTY"]}, "no config.json"),
    (["--models", "GARBAGE"], {"models": ["GARBAGE"]}, "could not load model"),
    (["--models", "TRUNCATED"], {"models": ["TRUNCATED"]}, "could not load model"),
    (["--models", "NO_WEIGHTS"], {"models": ["NO_WEIGHTS"]}, "could not load model"),
    (["--models", "OTHER_VOCAB,TARGET"], {"models": ["OTHER_VOCAB", "TARGET"]}, "vocabulary"),
    (["--models", "OTHER_TOKENIZER,TARGET"], {"models": ["OTHER_TOKENIZER", "TARGET"]}, "different tokenizer"),
    (["--models", "TARGET", "--prompt", "   "], {"prompt": "   "}, "the prompt is empty"),
    (["--models", "SHORT", "--prompt", LONG_PROMPT], {"models": ["SHORT"], "prompt": LONG_PROMPT},
     "the context of this chain is 32"),
    (["--models", "SHORT", "-n", "40"], {"models": ["SHORT"], "max_new_tokens": 40}, "exceeds the context"),
    (["--models", "TARGET", "-n", "0"], {"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    (["--models", "TARGET", "-n", "-5"], {"max_new_tokens": -5}, "max_new_tokens must be a positive integer"),
    (["--models", "TARGET", "-n", "100000"], {"max_new_tokens": 100000}, "exceeds the context"),
    (["--models", "TARGET", "--temperature", "-0.5"], {"temperature": -0.5}, "temperature"),
    (["--models", "TARGET", "--top-p", "0"], {"top_p": 0.0}, "top_p"),
    (["--models", "TARGET", "--top-p", "1.5"], {"top_p": 1.5}, "top_p"),
    (["--models", "TARGET", "--top-k", "-1"], {"top_k": -1}, "top_k"),
    (["--models", "TARGET", "--device", "tpu"], {"device": "tpu"}, "unknown device 'tpu'"),
    (["--models", "TARGET", "--device", "cuda:7"], {"device": "cuda:7"}, "cuda:7"),
    (["--models", "TARGET", "--placement", "x"], None, "--placement entry 'x'"),
    (["--models", "TARGET,TARGET", "--placement", "0"], None, "--placement"),
    (["--models", "a,,b"], None, "empty entry"),
    (["--models", "TARGET", "--prompt-file", "/no/such/prompt.txt"], None, "cannot read prompt file"),
    (["--models", "TARGET", "--prompt-file", "/"], None, "cannot read prompt file"),
    (["--models", "TARGET", "--prompt-file", "LATIN1"], None, "not UTF-8"),
]


def _named(folders: dict[str, str], value: str) -> str:
    return ",".join(folders.get(part.lower(), part) for part in value.split(","))


async def _api_error(folders: dict[str, str], call: dict[str, Any]) -> ConfigError:
    options = {k: v for k, v in call.items() if k not in ("models", "prompt", "device")}
    models = [_named(folders, m) for m in call.get("models", ["TARGET"])]
    async with asyncio.timeout(60):
        with pytest.raises(ConfigError) as info:
            async with pipespec.Pipeline.load(models, device=call.get("device", "cpu")) as pipe:
                await pipe.generate(call.get("prompt", "x = 1"), **options)
    return info.value


@pytest.mark.parametrize(("args", "api", "message"), CASES, ids=[c[2] + "-" + "-".join(c[0][2:]) for c in CASES])
def test_bad_input_one_line_exit_2_and_the_api_says_the_same(folders: dict[str, str], args: list[str],
                                                             api: dict[str, Any] | None, message: str) -> None:
    args = [_named(folders, a) if not a.startswith("-") else a for a in args]
    if "--prompt" not in args and "--prompt-file" not in args:
        args += ["--prompt", "x = 1"]
    result = CliRunner().invoke(main, ["run", *args, "--no-tui", "--dtype", "float32"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("pipespec: error: ") and message in lines[0], lines[0]
    assert result.stdout == ""
    if api is not None:
        err = asyncio.run(_api_error(folders, api))
        assert f"pipespec: error: {err}" == lines[0]


# -- faults: a stage that raises mid-generation -------------------------------------------------------------------

MODES_AND_STAGES = [("pipe", 0), ("pipe", 1), ("pipe", 2), ("sd", 0), ("sd", 1), ("sd", 2), ("ar", 2)]
STOP_BUDGET = 1.0  # seconds from the failing forward pass to the caller holding the error


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(0, hidden=48, layers=2)


def _chain(base: torch.nn.Module, failing: int) -> tuple[list[torch.nn.Module], FaultyLlama]:
    models = [noisy_copy(base, 0.5, 1), noisy_copy(base, 0.2, 2), base]
    bad = faulty(models[failing])
    models[failing] = bad
    return models, bad


async def _assert_clean(pipe: pipespec.Pipeline, threads_before: int) -> None:
    """Nothing left running: every runner idle, every KV cache released, no thread added."""
    for m in pipe.members:
        assert await m.runner.drain(1.0), f"{m.name} still busy"
        # HF's dynamic cache is dropped; a static cache stays allocated for the next generation and holds nothing
        assert getattr(m.worker, "cache", None) is None and m.worker.cached == [], f"{m.name} kept its KV cache"
    # a thread that is ending (a worker's helper finishing its last call) may still count for a moment: wait for it
    # briefly, and name the threads if the count stays off (one unexplained failure here under load)
    for _ in range(40):
        if threading.active_count() == threads_before:
            break
        await anyio.sleep(0.05)
    assert threading.active_count() == threads_before, [t.name for t in threading.enumerate()]


@pytest.mark.parametrize(("mode", "failing"), MODES_AND_STAGES)
@limit(90)
async def test_stage_fault_stops_everything_and_names_the_stage(mode: str, failing: int,
                                                                base: torch.nn.Module) -> None:
    models, bad = _chain(base, failing)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False) as pipe:
        await pipe.generate(PROMPT, max_new_tokens=4, mode=mode)  # warm: threads started, code paths imported
        threads = threading.active_count()
        want = hf_greedy(base, PROMPT, 40)
        for fail_at in (1, 7):  # the prefill, and a forward pass well into the generation
            bad.arm(fail_at)
            with pytest.raises(PipelineError) as info:
                # adaptive off: the adaptive runtime may take the failing stage out of the chain (it chooses by
                # timings), and then its forward 7 never comes; the fault path is the same either way
                await pipe.generate(PROMPT, max_new_tokens=200, mode=mode, adaptive=False)
            caught = time.perf_counter()
            assert bad.raised_at is not None
            print(f"\n{mode} stage {failing} fails at forward {fail_at}: error reached the caller after "
                  f"{(caught - bad.raised_at) * 1e3:.1f} ms")
            assert caught - bad.raised_at < STOP_BUDGET, f"{caught - bad.raised_at:.3f} s"
            err = info.value
            stage = failing if mode != "ar" else 0  # ar runs the target alone, as stage 0
            assert err.stage == stage
            assert str(err) == f"stage {stage} (model{failing}) failed: RuntimeError: injected fault"
            assert err.__cause__ is bad.error
            await _assert_clean(pipe, threads)
            # the pipeline serves the next generation, exactly
            g = await pipe.generate(PROMPT, max_new_tokens=40, mode=mode)
            assert list(g.token_ids) == want
    with pytest.raises(PipelineClosed, match="closed"):
        await pipe.generate(PROMPT, max_new_tokens=4)


@pytest.mark.parametrize(("mode", "failing"), [("pipe", 0), ("pipe", 2), ("sd", 1), ("ar", 2)])
@limit(90)
async def test_stage_fault_on_the_default_worker(mode: str, failing: int, base: torch.nn.Module) -> None:
    """The same, on the static-cache worker LLaMA models get by default, with the fault injected at the worker
    (its forward), since the static path never calls ``model.forward``: a runtime error and an out-of-memory error."""
    models = [noisy_copy(base, 0.5, 1), noisy_copy(base, 0.2, 2), tiny_llama(0, hidden=48, layers=2)]
    want = hf_greedy(base, PROMPT, 40)
    async with pipespec.Pipeline.load(models, device="cpu") as pipe:
        assert all(isinstance(m.worker, StaticWorker) for m in pipe.members)
        await pipe.generate(PROMPT, max_new_tokens=4, mode=mode)
        threads = threading.active_count()
        bad = WorkerFault(pipe.members[failing if mode != "ar" else -1].worker)
        stage = failing if mode != "ar" else 0
        for fail_at, error in ((1, RuntimeError("injected fault")), (7, oom())):
            bad.arm(fail_at, error)
            with pytest.raises(PipelineError) as info:
                await pipe.generate(PROMPT, max_new_tokens=200, mode=mode)
            caught = time.perf_counter()
            assert bad.raised_at is not None and caught - bad.raised_at < STOP_BUDGET
            assert info.value.stage == stage and info.value.__cause__ is error
            if fail_at == 1:
                assert str(info.value) == f"stage {stage} (model{failing}) failed: RuntimeError: injected fault"
            else:
                assert str(info.value).startswith(f"stage {stage} (model{failing}) ran out of GPU memory on cpu")
            await _assert_clean(pipe, threads)
            g = await pipe.generate(PROMPT, max_new_tokens=40, mode=mode)
            assert list(g.token_ids) == want


@pytest.mark.parametrize("mode", ["pipe", "sd"])
@limit(60)
async def test_fault_in_every_generation_never_hangs(mode: str, base: torch.nn.Module) -> None:
    """A stage that fails over and over: every generation reports it, none hangs, nothing accumulates."""
    models, bad = _chain(base, 1)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False) as pipe:
        await pipe.generate(PROMPT, max_new_tokens=4, mode=mode)
        threads = threading.active_count()
        for i in range(20):
            bad.arm(1 + i % 5)
            with pytest.raises(PipelineError, match="stage 1 \\(model1\\) failed"):
                await pipe.generate(PROMPT, max_new_tokens=100, mode=mode)
        await _assert_clean(pipe, threads)


@pytest.mark.parametrize(("mode", "failing"), [("pipe", 2), ("pipe", 0), ("sd", 1), ("ar", 2)])
@limit(60)
async def test_out_of_memory_mid_generation_names_model_device_and_placement(mode: str, failing: int,
                                                                            base: torch.nn.Module) -> None:
    models, bad = _chain(base, failing)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False) as pipe:
        bad.arm(5, oom())
        with pytest.raises(PipelineError) as info:
            await pipe.generate(PROMPT, max_new_tokens=200, mode=mode)
        message = str(info.value)
        stage = failing if mode != "ar" else 0
        assert message.startswith(f"stage {stage} (model{failing}) ran out of GPU memory on cpu")
        assert "--placement" in message and "dtype" in message and "\n" not in message
        assert info.value.__cause__ is bad.error  # the original error stays attached
        g = await pipe.generate(PROMPT, max_new_tokens=8, mode=mode)  # and the pipeline goes on
        assert g.stats.tokens == 8


# -- long runs ------------------------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


async def _rate(pipe: pipespec.Pipeline, prompt: list[int]) -> float:
    """Tokens per CPU-second of this process (every thread): less sensitive than wall-clock time to a busy
    neighbour on a shared CI host, which still shifts it by tens of percent from one minute to the next."""
    cpu = time.process_time()
    g = await pipe.generate(prompt, max_new_tokens=8, mode="pipe")
    return g.stats.tokens / max(time.process_time() - cpu, 1e-6)


@pytest.mark.slow
@limit(240)
async def test_500_generations_flat_memory_steady_throughput(record_property: Callable[..., None]) -> None:
    """500 generations on one pipeline; then that pipeline against a fresh one on the same models, alternating
    generation by generation, so host noise hits both alike: state that builds up would make the old one slower."""
    target = tiny_llama(0, hidden=32, dtype=torch.float32)
    models = [noisy_copy(target, 0.5, 1), noisy_copy(target, 0.2, 2), target]
    prompts = [[7], PROMPT, list(range(3, 40, 2))]
    async with pipespec.Pipeline.load(models, device="cpu") as pipe:
        threads = own_threads()
        rates: list[float] = []
        rss: dict[int, float] = {}
        for i in range(500):
            rates.append(await _rate(pipe, prompts[i % 3]))
            if i + 1 in (100, 300, 500):
                gc.collect()
                rss[i + 1] = round(rss_mib(), 2)
        async with pipespec.Pipeline.load(models, device="cpu") as fresh:
            ratios = [await _rate(pipe, prompts[i % 3]) / await _rate(fresh, prompts[i % 3]) for i in range(60)]
        assert own_threads() == threads  # the fresh pipeline's threads are gone with it
    first, last, paired = _median(rates[:100]), _median(rates[-100:]), _median(ratios)
    record_property("rss_mib", rss)
    record_property("tokens_per_cpu_s_first_last", (round(first), round(last)))
    record_property("after_500_vs_fresh", round(paired, 3))
    print(f"\nRSS after 100/300/500 generations: {rss} MiB; median tokens per CPU-second: first 100 = {first:.0f}, "
          f"last 100 = {last:.0f}; after 500 vs a fresh pipeline: {paired:.2f}")
    assert rss[500] - rss[100] < 8.0, rss  # MiB; keeping one KV cache per generation would be far more
    assert paired > 0.8, paired
    assert last > 0.5 * first, (first, last)  # loose: the host's load drifts over the ~30 s of the loop


@pytest.mark.parametrize("fast", [False, "auto"], ids=["hf-forward", "default-worker"])
@pytest.mark.parametrize("mode", ["pipe", "sd", "ar"])
@limit(120)
async def test_generation_up_to_the_context_limit(mode: str, fast: bool | str) -> None:
    """prompt + max_new_tokens == max_position_embeddings: the output is exact and no stage, the drafts running
    ahead included, ever computes a position past the context (probed on HF's forward, where the fake sees the
    position ids)."""
    context = 128
    target = tiny_llama(4, hidden=32)
    target.config.max_position_embeddings = context
    models = [faulty(noisy_copy(target, 0.5, 1)), faulty(noisy_copy(target, 0.2, 2)), faulty(target)]
    prompt = PROMPT + [11, 12, 13]
    n = context - len(prompt)
    async with pipespec.Pipeline.load(models, device="cpu", fast=fast) as pipe:
        g = await pipe.generate(prompt, max_new_tokens=n, mode=mode, verify_cap=16)
        assert list(g.token_ids) == hf_greedy(target, prompt, n)
        if fast is False:
            used = models if mode != "ar" else models[-1:]
            assert max(m.max_position for m in used) < context
            assert models[-1].max_position == context - 2  # the last token is output, never forwarded
        with pytest.raises(ConfigError, match=f"use at most {n} new tokens"):
            await pipe.generate(prompt, max_new_tokens=n + 1, mode=mode)
