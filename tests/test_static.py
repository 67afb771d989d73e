"""The static-cache fast path on the CPU (its CUDA-graph replay is covered by the gpu-marked tests).

The static cache must give the logits of a fresh full forward pass after any sequence of growth and rollback, and a
pipeline on it must reproduce the target decoding alone.
"""

from __future__ import annotations

import random

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import grow_or_diverge, hf_greedy, limit, slow
from pipespec.verify import SamplingParams
from pipespec.workers.static import (CAPTURE_AHEAD, CHUNKED_MAX, CONTEXT_STEP, PAD, TOKEN_BUCKETS, StaticWorker,
                                     reachable)
from pipespec.workers.static_llama import supports_static


def test_supports_static_names_the_reason() -> None:
    assert supports_static(tiny_llama(1)) is None
    assert "Linear is not one of LlamaForCausalLM" in (supports_static(torch.nn.Linear(2, 2)) or "")


@torch.inference_mode()
@pytest.mark.parametrize("prompt_len", [1, 5, 150])
def test_static_cache_matches_fresh_forward_through_rollbacks(prompt_len: int) -> None:
    model = tiny_llama(3, hidden=32)
    reference = tiny_llama(3, hidden=32)  # an untouched copy: StaticLlama re-points the weights at fused tensors
    worker = StaticWorker(model, "m", torch.device("cpu"), capacity=600)
    worker.reset(None, 600)
    rng = random.Random(prompt_len)
    seq = [rng.randrange(96) for _ in range(prompt_len)]
    worker.prefill(seq)
    for _ in range(40):
        seq = grow_or_diverge(rng, seq, 8)
        first = rng.randrange(max(1, len(seq) - 7), len(seq) + 1)
        got = worker.logits(seq, first)
        want = reference(torch.tensor([seq])).logits[0, first - 1:]
        assert torch.allclose(got.double(), want, atol=1e-8), (len(seq), first)
    # the HF model still works after its weights were re-pointed at the fused tensors
    assert torch.allclose(model(torch.tensor([seq])).logits, reference(torch.tensor([seq])).logits, atol=1e-10)


@limit(120)
async def test_pipeline_on_static_path_equals_target_alone(target: torch.nn.Module) -> None:
    models = [noisy_copy(target, 0.5, 1), noisy_copy(target, 0.2, 2), slow(target, 0.003)]
    prompt = [5, 17, 33, 2, 9]
    want = hf_greedy(target, prompt, 40)
    async with pipespec.Pipeline.load(models, device="cpu", fast=True) as pipe:
        assert all(isinstance(m.worker, StaticWorker) for m in pipe.members)
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(prompt, max_new_tokens=40, mode=mode)
            assert list(g.token_ids) == want, mode
        # sampling: coupled is still seed for seed the target alone
        alone = await pipe.generate(prompt, max_new_tokens=20, mode="ar", temperature=1.0, seed=4)
        chain = await pipe.generate(prompt, max_new_tokens=20, mode="pipe", temperature=1.0, seed=4)
        assert alone.token_ids == chain.token_ids


def test_shapes_are_captured_ahead_at_the_context_buckets_a_generation_may_reach() -> None:
    """A shape met in one context bucket is wanted at the larger ones the next generation may reach (its prompt plus
    its new tokens), at most ``CAPTURE_AHEAD`` past where it was met, never at smaller ones."""
    assert reachable({(1, 256), (8, 256)}, 384, 2176) == {(1, 512), (8, 512)}
    assert reachable({(1, 256)}, 200, 2176) == set()  # the generation stays in the bucket
    assert reachable({(4, 512, ("greedy",))}, 900, 2176) == {(4, 768, ("greedy",)), (4, 1024, ("greedy",))}
    assert reachable({(16, 2048)}, 2100, 2176) == {(16, 2176)}  # the last bucket is the cache's end
    far = reachable({(1, 256)}, 100_000, 1 << 20)
    assert far == {(1, 256 + CONTEXT_STEP * i) for i in range(1, CAPTURE_AHEAD + 1)}


@torch.inference_mode()
def test_reset_asks_for_the_shapes_met_at_the_buckets_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's side, with graphs on and the capture itself recorded (it needs CUDA): a generation that met
    shapes at context bucket 256 makes the next reset for a 600-token generation want them at 512 and 768 too,
    forwards and device drafts alike; ``PIPESPEC_CAPTURE_AHEAD=0`` turns that off."""
    def wanted_at_reset(ahead: str) -> tuple[set, set]:
        monkeypatch.setenv("PIPESPEC_CAPTURE_AHEAD", ahead)
        worker = StaticWorker(tiny_llama(3, hidden=32), "m", torch.device("cpu"), graphs=True, capacity=1000)
        seen: list[tuple[set, set]] = []

        def capture() -> None:
            seen.append((set(worker._wanted), set(worker._draft_wanted)))  # noqa: SLF001
            worker._wanted.clear()  # noqa: SLF001
            worker._draft_wanted.clear()  # noqa: SLF001

        monkeypatch.setattr(worker, "capture_pending", capture)
        worker.reset(None, 600)  # nothing met yet: nothing to capture
        assert not seen
        seq = [5, 6, 7, 8, 9]
        worker.logits(seq, 1)  # a prefill of 5 tokens: bucket 8 at context 256, eager (not captured yet)
        worker.draft(seq, 3, SamplingParams())  # a device draft of 3 tokens, 1 fed, at context 256
        worker.reset(None, 600)
        return seen[0]

    forwards, drafts = wanted_at_reset("1")
    assert {(8, k) for k in (256, 512, 768)} <= forwards
    assert {k[:3] for k in drafts} >= {(3, 256, 1), (3, 512, 1), (3, 768, 1)}
    forwards, drafts = wanted_at_reset("0")
    assert {k[1] for k in forwards} == {k[1] for k in drafts} == {256}


@torch.inference_mode()
def test_a_forward_past_the_largest_bucket_runs_in_chunks_that_graphs_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """With graphs, a forward of PAD + 1 .. CHUNKED_MAX tokens (a prompt, or lock step's first verify: the prompt and a
    block) runs as forwards of at most PAD tokens, the last holding the rows asked for: the same logits and cache as
    one forward, and shapes a graph replays once met (one eager forward of 142 tokens cost a 7B 21-56 ms on an H200).
    Longer ones, and workers without graphs, run as one forward."""
    model = tiny_llama(3, hidden=32)
    chunked = StaticWorker(model, "c", torch.device("cpu"), graphs=True, capacity=1200)
    monkeypatch.setattr(chunked, "capture_pending", lambda: None)  # capturing needs CUDA; the shapes are recorded
    whole = StaticWorker(model, "w", torch.device("cpu"), capacity=1200)
    rng = random.Random(1)
    calls: list[tuple[int, int]] = []
    one = chunked._forward_one  # noqa: SLF001

    def spy(tokens, position, keep_rows):  # noqa: ANN001, ANN202
        calls.append((len(tokens), keep_rows))
        return one(tokens, position, keep_rows)

    chunked._forward_one = spy  # noqa: SLF001
    for n, keep in ((PAD + 14, 15), (2 * PAD, 1), (PAD + 1, PAD), (3 * PAD + 5, 7), (CHUNKED_MAX + 3, 2)):
        seq = [rng.randrange(96) for _ in range(n)]
        for w in (chunked, whole):
            w.reset(None, 1200)
        calls.clear()
        got = chunked.logits(seq, n - keep + 1)
        want = whole.logits(seq, n - keep + 1)
        assert got.shape == want.shape == (keep, 96)
        assert torch.allclose(got, want, atol=1e-9), n
        assert chunked.cached == whole.cached == seq
        if n <= CHUNKED_MAX:
            assert all(size <= PAD for size, _ in calls) and sum(size for size, _ in calls) == n
            assert calls[-1][1] == keep and calls[-1][0] >= keep and all(k == 0 for _, k in calls[:-1])
        else:
            assert calls == [(n, keep)]
            assert {bucket for bucket, _ in chunked._wanted} <= set(TOKEN_BUCKETS)  # noqa: SLF001


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager() -> None:
    model = tiny_llama(3, hidden=64, dtype=torch.float32).cuda()
    reference = tiny_llama(3, hidden=64, dtype=torch.float32).cuda()
    worker = StaticWorker(model, "m", torch.device("cuda", 0), capacity=600)
    worker.reset(None, 600)
    rng = random.Random(0)
    seq = [rng.randrange(96) for _ in range(10)]
    with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
        for generation in range(3):  # shapes met in one generation are captured at the next reset
            worker.reset(None, 600)
            seq = [rng.randrange(96) for _ in range(10)]
            for _ in range(40):
                if rng.random() < 0.3:
                    seq = seq[:rng.randrange(2, len(seq))]
                seq = seq + [rng.randrange(96) for _ in range(rng.randrange(1, 9))]
                got = worker.logits(seq, len(seq) - 1)
                want = reference(torch.tensor([seq], device="cuda")).logits[0, -2:]
                assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), generation
    assert worker.captures > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_spans_sit_on_the_host_clock() -> None:
    """``gpu_trace`` pins the GPU's clock to the host's (``time.perf_counter``): a forward's GPU span lies within the
    host's call around it, give or take the anchor's error (well under a millisecond)."""
    import time

    model = tiny_llama(3, hidden=64, dtype=torch.float32).cuda()
    worker = StaticWorker(model, "m", torch.device("cuda", 0), capacity=600)
    worker.reset(None, 600)
    with torch.inference_mode():
        assert worker.gpu_trace(True)
        calls = []
        for i in range(5):
            time.sleep(0.01)  # idle between calls, so each span starts when its call launches
            before = time.perf_counter()
            worker.reader.ints(worker.logits([5, 6, 7, 8 + i], 4)[-1:].argmax(-1))
            calls.append((before, time.perf_counter()))
        spans = worker.gpu_spans()
    assert len(spans) == 5
    for (start, end, _), (before, after) in zip(spans, calls):
        assert before - 3e-4 <= start <= end <= after + 3e-4, (start - before, after - end)
