"""Stage 0: drafts optimistically, one token per forward pass, never waiting for verification.

It stops only when it is ``max_ahead`` tokens past its successor's verified sequence (more would be wasted work:
verification would reach those tokens only after many more rounds) or at the length limit; a rollback from its
successor replaces its sequence and it drafts on from there.
"""

from __future__ import annotations

import structlog

from ..types import Proposal
from .base import Stage

log = structlog.get_logger("pipespec.stages")  # unconfigured structlog prints every level: guarded


async def run_draft(stage: Stage) -> None:
    cfg, io, stats, worker = stage.config, stage.io, stage.stats, stage.worker
    assert io.outbox is not None and io.verdicts_in is not None, "the draft stage needs a successor"
    seq = list(cfg.prompt)
    epoch = 0  # the epoch of the last rollback adopted; tags every proposal
    successor_verified = len(cfg.prompt)
    max_ahead = cfg.max_ahead  # the successor may lower it (adaptive runtime)
    # every stage prefills at once, in its own thread, while the others prefill and draft
    stats.forwards += await stage.runner.call(worker.prefill, cfg.prompt)
    while True:
        verdict = io.verdicts_in.take()
        if verdict is not None:
            successor_verified = verdict.verified
            if verdict.ahead is not None:
                max_ahead = verdict.ahead
            if verdict.rollback is not None and verdict.epoch > epoch:
                stage.set_state("rolling back")
                seq = list(verdict.rollback)
                epoch = verdict.epoch
                stats.rollbacks += 1
                if structlog.is_configured():
                    log.debug("rollback adopted", stage=stage.index, epoch=epoch, position=len(seq))
        ahead = len(seq) - successor_verified
        room = min(cfg.max_len - len(seq), max_ahead - ahead)
        if room <= 0:
            stage.set_state("waiting")
            await io.doorbell.wait()
            continue
        stage.set_state("drafting")
        result = await stage.runner.call(worker.draft, seq, min(cfg.draft_batch, room), cfg.params)
        stats.forwards += len(result.tokens)
        stats.drafted += len(result.tokens)
        if stage.pending_rollback(epoch):
            continue  # drafted on a sequence the successor has already rejected
        start = len(seq)
        seq.extend(result.tokens)
        await io.outbox.send(Proposal(epoch, start, result.tokens, result.probs))
