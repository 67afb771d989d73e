"""Cancellation: Ctrl-C during ``pipespec run``, and cancelling whoever consumes ``stream()`` / ``generate()``.

- Ctrl-C (SIGINT) on a long generation: what was generated so far stays on stdout, exit code 130, within 2 s.
- Leaving a ``stream()`` loop early (break, a timeout, cancelling the consumer's task) stops every stage: no
  forward pass runs afterwards, no thread is added, and the pipeline serves the next generation exactly.
- 1,000 cancellations at random points (every mode, every way of cancelling): no hang, no leaked thread, flat RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from faults import rss_mib
from helpers import byte_tokenizer, hf_greedy, limit, sigint_default

torch.set_num_threads(1)

PROMPT = [5, 17, 33, 2, 9]
EXIT_BUDGET = 2.0  # seconds from SIGINT to the process having exited


# -- Ctrl-C on the command line ------------------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[bytes], n_bytes: int, timeout: float) -> bytes:
    assert proc.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n_bytes and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.slow
def test_ctrl_c_keeps_the_text_and_exits_130_within_2s() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipespec", "run", "--prompt", "def add(a, b):", "-n", "2000",
                             "--no-tui"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=sigint_default)
    try:
        before = _read_until(proc, 40, timeout=120)  # startup (imports, loading) may be slow on a busy CI host
        assert len(before) >= 40, ("no streamed text", before, proc.poll())
        time.sleep(0.3)  # well into the generation
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nSIGINT -> exit: {took:.2f} s")
    assert proc.returncode == 130, err.decode()
    assert took < EXIT_BUDGET, took
    stdout = (before + out).decode()
    assert stdout.startswith(before.decode()) and len(stdout.strip()) >= 20 and stdout.endswith("\n")
    stderr = err.decode()
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "pipespec: interrupted"


# -- cancelling the consumer of stream() / generate() -------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer(300)


def _chain(tok: Any) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """Three tiny models (drafts of varying quality, the target last); pipespec's default worker runs them."""
    target = tiny_llama(0, hidden=32, vocab=len(tok))
    return [noisy_copy(target, 0.5, 1), noisy_copy(target, 0.2, 2), target], target


def _forwards(pipe: pipespec.Pipeline) -> int:
    """Forward passes run so far by every model of the chain (the workers count them, whichever path runs)."""
    return sum(m.worker.forwards for m in pipe.members)


async def _assert_stopped(pipe: pipespec.Pipeline, threads: int) -> None:
    """Every stage has stopped: no forward pass starts after the consumer got control back."""
    before = _forwards(pipe)
    await asyncio.sleep(0.2)
    assert _forwards(pipe) == before, "a stage kept running after cancellation"
    for m in pipe.members:
        assert await m.runner.drain(0.5), f"{m.name} still busy"
    assert threading.active_count() == threads


async def _next_generation_is_exact(pipe: pipespec.Pipeline, target: torch.nn.Module, mode: str = "pipe") -> None:
    g = await pipe.generate(PROMPT, max_new_tokens=16, mode=mode)
    got = list(g.token_ids)  # 16 tokens, or fewer ending at the tokenizer's EOS
    assert got and got == hf_greedy(target, PROMPT, 16)[:len(got)]
    assert len(got) == 16 or g.stats.stop_reason == "eos"
    if g.stats.stop_reason == "eos":  # it stopped because the target chose EOS, not for another reason
        assert got[-1] == pipe.tokenizer.eos_token_id, (got, pipe.tokenizer.eos_token_id)


@pytest.mark.parametrize("fast", ["auto", False], ids=["default-worker", "hf-forward"])
@pytest.mark.parametrize("mode", ["pipe", "sd", "ar"])
@limit(60)
async def test_leaving_a_stream_early_stops_every_stage(mode: str, fast: bool | str, tok: Any) -> None:
    models, target = _chain(tok)
    async with pipespec.Pipeline.load(models, device="cpu", tokenizer=tok, fast=fast) as pipe:
        await pipe.generate(PROMPT, max_new_tokens=4, mode=mode)
        threads = threading.active_count()

        # break out of the loop (aclosing: the generator is closed right there)
        async with contextlib.aclosing(pipe.stream(PROMPT, max_new_tokens=400, mode=mode)) as pieces:
            async for _ in pieces:
                break
        await _assert_stopped(pipe, threads)
        await _next_generation_is_exact(pipe, target, mode)

        # break without aclosing: the event loop finalises the abandoned generator; the next call waits for it
        async for _ in pipe.stream(PROMPT, max_new_tokens=400, mode=mode):
            break
        await _next_generation_is_exact(pipe, target, mode)
        await _assert_stopped(pipe, threads)

        # a timeout around the consumer
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                async for _ in pipe.stream(PROMPT, max_new_tokens=400, mode=mode):
                    pass
        await _assert_stopped(pipe, threads)
        await _next_generation_is_exact(pipe, target, mode)


@pytest.mark.parametrize("mode", ["pipe", "sd", "ar"])
@limit(60)
async def test_cancelling_the_consumer_task_stops_every_stage(mode: str, tok: Any) -> None:
    models, target = _chain(tok)
    async with pipespec.Pipeline.load(models, device="cpu", tokenizer=tok) as pipe:
        await pipe.generate(PROMPT, max_new_tokens=4, mode=mode)
        threads = threading.active_count()

        async def consume_stream() -> None:
            async for _ in pipe.stream(PROMPT, max_new_tokens=400, mode=mode):
                pass

        for consumer in (pipe.generate(PROMPT, max_new_tokens=400, mode=mode), consume_stream()):
            task = asyncio.ensure_future(consumer)
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):  # the cancellation is re-raised, not swallowed
                await task
            await _assert_stopped(pipe, threads)
            await _next_generation_is_exact(pipe, target, mode)


# -- 1,000 cancellations at random points -------------------------------------------------------------------------


async def _cancel_once(pipe: pipespec.Pipeline, rng: random.Random, latencies: list[float]) -> None:
    """One generation, cancelled after a random delay in one of three ways; records how long the stop took."""
    mode = rng.choice(["pipe", "pipe", "sd", "ar"])
    delay = rng.uniform(0.0, 0.025)  # from "before the first forward pass" to "a dozen tokens in"
    way = rng.choice(["timeout-generate", "timeout-stream", "task-cancel"])
    loop = asyncio.get_running_loop()
    if way == "task-cancel":
        task = asyncio.ensure_future(pipe.generate(PROMPT, max_new_tokens=300, mode=mode))
        await asyncio.sleep(delay)
        cancelled_at = loop.time()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        cm = asyncio.timeout(delay)
        with contextlib.suppress(TimeoutError):
            async with cm:
                if way == "timeout-generate":
                    await pipe.generate(PROMPT, max_new_tokens=300, mode=mode)
                else:
                    async for _ in pipe.stream(PROMPT, max_new_tokens=300, mode=mode):
                        pass
        cancelled_at = cm.when() or loop.time()
    latencies.append(max(0.0, loop.time() - cancelled_at))


@pytest.mark.slow
@limit(180)
async def test_1000_random_cancellations(tok: Any, record_property: Callable[..., None]) -> None:
    models, target = _chain(tok)
    rng = random.Random(8)
    async with pipespec.Pipeline.load(models, device="cpu", tokenizer=tok) as pipe:
        warmup: list[float] = []
        for _ in range(100):
            await _cancel_once(pipe, rng, warmup)
        gc.collect()
        threads, rss_before = threading.active_count(), rss_mib()
        latencies: list[float] = []
        started = time.perf_counter()
        for _ in range(1000):
            await _cancel_once(pipe, rng, latencies)
        took = time.perf_counter() - started
        await _assert_stopped(pipe, threads)
        gc.collect()
        rss_after = rss_mib()
        await _next_generation_is_exact(pipe, target)
    latencies.sort()
    p50, p99, worst = latencies[500], latencies[990], latencies[-1]
    record_property("cancel_latency_ms", (round(p50 * 1e3, 1), round(p99 * 1e3, 1), round(worst * 1e3, 1)))
    record_property("rss_mib", (round(rss_before, 1), round(rss_after, 1)))
    print(f"\n1000 cancellations in {took:.1f} s; stop latency p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
          f"max {worst * 1e3:.1f} ms; RSS {rss_before:.1f} -> {rss_after:.1f} MiB; threads {threads}")
    # No hang: every cancellation returned (the time limit) and within 5 s. Promptness, robust to a loaded host: the
    # 99th percentile under 0.25 s, and at most 2 of the 1,000 over 1 s (a chance stall of a shared 2-core CI host
    # can delay one; a stage that keeps running after the cancel delays them all and moves the p99).
    assert worst < 5.0, worst
    assert p99 < 0.25, p99
    assert sum(lat > 1.0 for lat in latencies) <= 2, latencies[-5:]
    assert rss_after - rss_before < 8.0, (rss_before, rss_after)
