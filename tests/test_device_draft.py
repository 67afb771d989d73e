"""Multi-token drafts on the device (``StaticWorker.draft``): the code path a CUDA graph captures, run eagerly on
the CPU, gives exactly the tokens of one forward and one host sync per drafted token, and leaves the cache where
the per-token path leaves it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from pipespec.analysis.oracle import Oracle
from pipespec.verify import SamplingParams
from pipespec.workers.base import common_prefix
from pipespec.workers.static import FUSED_FEED, StaticWorker
from pipespec.workers.synthetic import SyntheticWorker


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, seed=7),
                                    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)],
                         ids=["greedy", "coupled", "coupled-topk-topp"])
def test_device_draft_matches_per_token_drafting(params: SamplingParams) -> None:
    model = tiny_llama(4, scale=3.0)
    fast = StaticWorker(model, "d", torch.device("cpu"), capacity=300)
    slow = StaticWorker(model, "d", torch.device("cpu"), capacity=300)
    slow.device_draft = False
    for w in (fast, slow):
        w.reset(0, 300)
    seq = [5, 17, 2, 40, 8, 9, 11]
    for n in (1, 2, 6, 9):
        a, b = fast.draft(seq, n, params), slow.draft(seq, n, params)
        assert a.tokens == b.tokens and len(a.tokens) == n, (n, a.tokens, b.tokens)
        assert fast.cached == slow.cached == seq + list(a.tokens[:-1])
        # the cache holds the right keys and values: the next verification agrees
        probe = seq + list(a.tokens) + [3]
        assert fast.step(probe, len(seq), params).tokens == slow.step(probe, len(seq), params).tokens
        seq = seq + list(a.tokens[: n // 2 + 1]) + [n]  # partly accepted, then a correction: a rollback next


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, seed=7)],
                         ids=["greedy", "coupled"])
def test_a_device_draft_feeds_what_the_cache_lacks_inside_its_own_forwards(params: SamplingParams) -> None:
    """The tokens a verdict leaves uncached go into the draft's first forward (one graph on CUDA): one after a
    correction, two after a whole block was accepted (its last draft, never fed, and the bonus); more (a prompt's
    tail, a catch-up) take an ordinary forward first. Each case matches one forward per token."""
    model = tiny_llama(4, scale=3.0)
    fast = StaticWorker(model, "d", torch.device("cpu"), capacity=300)
    slow = StaticWorker(model, "d", torch.device("cpu"), capacity=300)
    slow.device_draft = False
    fed: list[int] = []
    feed_input = fast._feed_input  # noqa: SLF001
    fast._feed_input = lambda m, tokens, position: fed.append(m) or feed_input(m, tokens, position)  # noqa: SLF001
    for w in (fast, slow):
        w.reset(0, 300)
    seq = [5, 17, 2, 40, 8, 9, 11]
    # (tokens drafted, of them accepted, the verdict's own tokens after them; then what the next call lacks)
    cases = ((4, 4, [1]),  # the prompt's tail (7 lacked: a forward of 6 first, then 1 fed); next: 2 lacked
             (3, 1, [7]),  # 2 fed (the last draft and the bonus); next: the correction, 1 lacked
             (1, 1, [2]),  # 1 fed; a one-token draft is never fed itself, so next: 2 lacked
             (5, 5, [3, 4, 6]),  # 2 fed; next: 4 lacked (a catch-up: a forward of 3 first, then 1 fed)
             (2, 0, [9]))  # 1 fed
    for n, accepted, extra in cases:
        forwards, lacked = fast.forwards, len(seq) - common_prefix(fast.cached, seq)
        a, b = fast.draft(seq, n, params), slow.draft(seq, n, params)
        assert a.tokens == b.tokens and len(a.tokens) == n, (n, a.tokens, b.tokens)
        assert fast.cached == slow.cached == seq + list(a.tokens[:-1])
        assert fast.forwards - forwards == n + (lacked > FUSED_FEED)  # one more forward only for a long tail
        seq = seq + list(a.tokens[:accepted]) + extra
    assert fed == [1, 2, 1, 2, 1]


def test_rejection_rule_keeps_the_per_token_path() -> None:
    worker = StaticWorker(tiny_llama(4), "d", torch.device("cpu"), capacity=300)
    worker.reset(1, 300)
    out = worker.draft([5, 6, 7], 4, SamplingParams(temperature=1.0, acceptance="rejection", seed=1))
    assert len(out.tokens) == 4 and out.probs is not None and out.probs.shape[0] == 4


def test_synthetic_worker_multi_draft_keeps_oracle_choices() -> None:
    oracle = Oracle([0.8], seed=1, vocab=96)
    model = tiny_llama(2)
    a = SyntheticWorker(model, "a", torch.device("cpu"), oracle, 0, capacity=300)
    b = SyntheticWorker(model, "b", torch.device("cpu"), oracle, 0, capacity=300)
    b.device_draft = False
    for w in (a, b):
        w.reset(None, 300)
        w.prefill([5, 6, 7, 8])
    ta, tb = a.draft([5, 6, 7, 8], 5, SamplingParams()), b.draft([5, 6, 7, 8], 5, SamplingParams())
    assert ta.tokens == tb.tokens and a.cached == b.cached and a._hashes == b._hashes


def test_a_device_draft_across_a_context_bucket_boundary_matches() -> None:
    """The device draft attends every step over the context bucket of its LAST position; one forward per token uses
    each position's own bucket. Masking makes them equal: checked where a 9-token draft crosses slot 256."""
    model = tiny_llama(4, scale=3.0)
    fast = StaticWorker(model, "d", torch.device("cpu"), capacity=600)
    slow = StaticWorker(model, "d", torch.device("cpu"), capacity=600)
    slow.device_draft = False
    params = SamplingParams()
    seq = [(7 * i + 3) % 90 + 2 for i in range(250)]
    for w in (fast, slow):
        w.reset(0, 600)
        w.prefill(seq)
    a, b = fast.draft(seq, 9, params), slow.draft(seq, 9, params)
    assert a.tokens == b.tokens and fast.cached == slow.cached == seq + list(a.tokens[:-1])


def test_synthetic_worker_drafts_greedy_only() -> None:
    """Its tokens are the oracle's whatever the rule says: a sampling rule is refused, as in ``step``, instead of
    drafting the random model's own samples."""
    worker = SyntheticWorker(tiny_llama(2), "a", torch.device("cpu"), Oracle([0.8], seed=1, vocab=96), 0,
                             capacity=300)
    worker.reset(None, 300)
    with pytest.raises(ValueError, match="greedy only"):
        worker.draft([5, 6, 7], 4, SamplingParams(temperature=1.0, acceptance="rejection", seed=1))


class _Event:
    """Stands in for torch.cuda.Event on the CPU: what a trace records, without timing anything."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.recorded = False

    def record(self, stream: object = None) -> None:
        self.recorded = True


def test_a_device_draft_is_one_gpu_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace's GPU track sees a multi-token draft as ONE span of its n tokens (its forwards replay inside one
    graph, where ``_timed_forward`` cannot see them), and the per-token path as one span per forward."""
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    model = tiny_llama(4)
    for device_draft, spans in ((True, [6]), (False, [7, 1, 1, 1, 1, 1])):  # per token: seq's tail, then 1 each
        worker = StaticWorker(model, "d", torch.device("cpu"), capacity=300)
        worker.device_draft = device_draft
        worker.reset(0, 300)
        worker._gpu_events = []  # as gpu_trace(True) leaves it on CUDA (it syncs a real event first)
        worker.draft([5, 17, 2, 40, 8, 9, 11], 6, SamplingParams())
        assert [n for _, _, n in worker._gpu_events] == spans
        assert all(a.recorded and b.recorded for a, b, _ in worker._gpu_events)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.9, seed=7)],
                         ids=["greedy", "coupled"])
def test_device_drafts_replayed_as_graphs_match_per_token_drafting(params: SamplingParams) -> None:
    """On CUDA the device draft is one captured graph per (tokens, context bucket, fed tokens, rule): met eagerly in
    one generation, replayed in the next. Both give the per-token path's tokens (float32, so no near-tie flips)."""
    import random

    model = tiny_llama(4, hidden=64, dtype=torch.float32, scale=3.0).cuda()
    fast = StaticWorker(model, "d", torch.device("cuda", 0), capacity=600)
    slow = StaticWorker(model, "d", torch.device("cuda", 0), capacity=600, graphs=False)
    slow.device_draft = False
    rng = random.Random(0)
    with torch.inference_mode(), torch.cuda.stream(torch.cuda.Stream()):
        for generation in range(3):  # shapes met in one generation are captured at the next reset
            for w in (fast, slow):
                w.reset(0, 600)
            seq = [rng.randrange(2, 96) for _ in range(9)]
            for _ in range(25):
                n = rng.randrange(1, 7)
                a, b = fast.draft(seq, n, params), slow.draft(seq, n, params)
                assert a.tokens == b.tokens, (generation, n, a.tokens, b.tokens)
                accepted = rng.randrange(0, n + 1)
                seq = seq + list(a.tokens[:accepted]) + [rng.randrange(2, 96)]
    assert fast.captures > 0 and len(fast._draft_graphs) > 0  # noqa: SLF001
