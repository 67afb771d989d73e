"""``sd`` mode: lock-step chain speculative decoding, the baseline the paper compares PipeSpec with.

One round: stage 0 drafts until it is ``lookahead - 1`` tokens past the target's output; each middle stage verifies
its predecessor's tokens in one forward pass, then drafts on its own until it is ``lookahead - 1`` tokens ahead; the
target verifies; every stage then restarts from the target's output. Nothing runs concurrently: each stage waits
for the others. Same runners, same workers and the same acceptance math as ``pipe``.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import PipelineError
from ..workers.base import StepResult
from ..stages import Stage
from .run import LiveRun, stage_failed


def _rows(probs: Any, count: int) -> list[tuple[Any, int]]:
    return [(probs, i) for i in range(count)] if probs is not None else []


async def run_lockstep(stages: list[Stage], live: LiveRun, lookahead: int) -> None:
    try:
        await _lockstep(stages, live, lookahead)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in pipe mode, one PipelineError that names the failed stage
        # one stage works at a time; the target stays "verifying" between rounds, so the first busy one failed
        failed = next((s for s in stages if s.stats.state in ("drafting", "verifying")), stages[-1])
        raise stage_failed(failed, exc) from exc


async def _verify(stage: Stage, previous: Stage, seq: list[int], base: int, rows: list[tuple[Any, int]],
                  params: Any) -> StepResult:
    """One verification of ``seq[base:]`` by ``stage``; a rejection counts as a rollback of ``previous``."""
    stage.set_state("verifying")
    proposed = len(seq) - base
    result = await stage.runner.call("step", seq, base, params, rows if proposed and rows else None)
    stage.stats.forwards += 1
    stage.stats.drafted += 1
    stage.stats.record_verification(proposed, result.accepted)
    if result.accepted < proposed:
        previous.stats.rollbacks += 1
        stage.stats.rollbacks_sent += 1
    return result


async def _lockstep(stages: list[Stage], live: LiveRun, lookahead: int) -> None:
    request = live.request
    params = request.params
    verified = list(request.prompt)
    draft, middles, target = stages[0], stages[1:-1], stages[-1]
    assert target.io.commit is not None
    # every verifying stage checks the round's window in one forward: keep it within each one's fast window (a
    # quantized model on CUDA: 15 proposals, 16 rows per GEMV launch; past it a forward costs another launch)
    fast = min((s.max_window for s in stages[1:] if s.max_window), default=lookahead - 1)
    while True:
        base = len(verified)
        window = min(lookahead - 1, fast, request.max_len - base - 1)  # proposals the target may check this round
        seq, rows = list(verified), []
        if window > 0:
            draft.set_state("drafting")
            result = await draft.runner.call("draft", verified, window, params)
            draft.set_state("idle")
            draft.stats.forwards += len(result.tokens)
            draft.stats.drafted += len(result.tokens)
            seq += result.tokens
            rows = _rows(result.probs, len(result.tokens))
        previous = draft
        for stage in middles:
            result = await _verify(stage, previous, seq, base, rows, params)
            seq = verified + list(result.tokens)
            rows = _rows(result.probs, len(result.tokens))
            extra = window - (len(seq) - base)
            if extra > 0:
                stage.set_state("drafting")
                more = await stage.runner.call("draft", seq, extra, params)
                stage.stats.forwards += len(more.tokens)
                stage.stats.drafted += len(more.tokens)
                seq += more.tokens
                rows += _rows(more.probs, len(more.tokens))
            del seq[base + max(window, 0):]
            del rows[max(window, 0):]
            stage.set_state("idle")
            previous = stage
        result = await _verify(target, previous, seq, base, rows, params)
        verified += result.tokens
        if await target.io.commit(result.tokens):
            live.finished = time.perf_counter()
            for stage in stages:
                stage.set_state("done")
            return
