"""Stage 0: drafts optimistically, one token per forward pass, never waiting for verification.

It stops only when it is ``max_ahead`` tokens past its successor's verified sequence (more would be wasted work:
verification would reach those tokens only after many more rounds) or at the length limit; a rollback from its
successor replaces its sequence and it drafts on from there. Bypassed by the adaptive runtime, it pauses (its
successor then drafts on its own) until it is brought back.
"""

from __future__ import annotations

import time

from ..types import Proposal
from .base import Stage, SuccessorView


async def run_draft(stage: Stage) -> None:
    cfg, io, stats = stage.config, stage.io, stage.stats
    assert io.outbox is not None and io.verdicts_in is not None, "the draft stage needs a successor"
    seq = list(cfg.prompt)
    successor = SuccessorView(len(cfg.prompt), cfg.max_ahead)
    # every stage prefills at once, in its own thread, while the others prefill and draft
    stats.forwards += await stage.runner.call("prefill", cfg.prompt)
    while True:
        rollback = successor.take(io.verdicts_in)
        if rollback is not None:
            seq = stage.adopt(rollback, successor.epoch)
        ahead = len(seq) - successor.verified
        room = min(cfg.max_len - len(seq), successor.max_ahead - ahead)
        if room <= 0 or stage.bypassed:
            stage.set_state("bypassed" if stage.bypassed else "waiting")
            await io.doorbell.wait()
            continue
        stage.set_state("drafting")
        started = time.perf_counter()
        result = await stage.runner.call("draft", seq, min(cfg.draft_batch, room), cfg.params)
        if stage.monitor is not None and result.tokens:
            stage.monitor.observe_forward(stage.index, 1, (time.perf_counter() - started) / len(result.tokens))
        stats.forwards += len(result.tokens)
        stats.drafted += len(result.tokens)
        if stage.pending_rollback(successor.epoch):
            continue  # drafted on a sequence the successor has already rejected
        start = len(seq)
        seq.extend(result.tokens)
        await io.outbox.send(Proposal(successor.epoch, start, result.tokens, result.probs))
