"""Every stage after the first, the target included.

Whenever it is free, a verifying stage takes everything its predecessor has proposed beyond its own verified
sequence (at most ``verify_cap`` tokens) and checks it in ONE forward pass: it keeps the longest prefix that agrees
with its own choices and appends its own next token (correction or bonus). With nothing new to check it decodes one
token itself, so it never idles (a middle stage stops at ``max_ahead`` tokens past its own successor).

Its verified tokens go downstream as proposals (the target commits them instead). When its predecessor's sequence
disagrees with its verified one, it rolls the predecessor back: it bumps the link's epoch and sends its verified
sequence up; the predecessor adopts it, and cascades the rollback further up if its own predecessor disagrees too.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from ..models import common_prefix
from ..policy import LinkEstimator
from ..types import Proposal, Verdict
from .base import Stage, SuccessorView, log


class _Upstream:
    """This stage's view of its predecessor's sequence in the current epoch, and the epoch itself."""

    def __init__(self, prompt: tuple[int, ...]) -> None:
        self.tokens: list[int] = list(prompt)
        self.rows: list[tuple[Any, int] | None] = [None] * len(prompt)  # proposer's prob rows (rejection rule)
        self.epoch = 0
        self.agreed = len(prompt)  # tokens[:agreed] == the stage's verified sequence[:agreed]

    def apply(self, proposal: Proposal) -> bool:
        """Take a proposal of the current epoch; False when it is stale (made before the last rollback)."""
        if proposal.epoch != self.epoch:
            return False
        if proposal.start > len(self.tokens):
            raise RuntimeError(f"proposal starts at {proposal.start} past the known sequence ({len(self.tokens)})")
        del self.tokens[proposal.start:]
        del self.rows[proposal.start:]
        self.tokens.extend(proposal.tokens)
        if proposal.probs is not None:
            self.rows.extend((proposal.probs, i) for i in range(len(proposal.tokens)))
        else:
            self.rows.extend([None] * len(proposal.tokens))
        self.agreed = min(self.agreed, proposal.start)
        return True

    def conflicts_with(self, seq: list[int]) -> bool:
        """Whether the predecessor's sequence disagrees with ``seq`` somewhere both are defined."""
        n = min(len(self.tokens), len(seq))
        if self.agreed < n:
            self.agreed += common_prefix(self.tokens[self.agreed:n], seq[self.agreed:n])
        return self.agreed < n

    def reset_to(self, seq: list[int]) -> None:
        """After a rollback: the predecessor will adopt ``seq`` and propose from its end, in a new epoch."""
        self.epoch += 1
        self.tokens = list(seq)
        self.rows = [None] * len(seq)
        self.agreed = len(seq)


async def run_verifier(stage: Stage) -> None:
    cfg, io, stats, worker = stage.config, stage.io, stage.stats, stage.worker
    is_target = io.outbox is None
    seq = list(cfg.prompt)  # this stage's verified sequence
    up = _Upstream(cfg.prompt)
    successor = SuccessorView(len(cfg.prompt), cfg.max_ahead)
    verify_cap = cfg.verify_cap  # adapted online when cfg.adaptive
    link = LinkEstimator()  # acceptance and latency of the link predecessor -> this stage
    needs_rows = cfg.params.needs_probs

    def roll_back_predecessor() -> None:
        up.reset_to(seq)
        assert io.verdicts_out is not None
        io.verdicts_out.put(Verdict(up.epoch, len(seq), tuple(seq)))
        stats.rollbacks_sent += 1
        if structlog.is_configured():
            log.debug("rollback sent", stage=stage.index, epoch=up.epoch, position=len(seq))

    stage.set_state("drafting")
    # every stage prefills at once, in its own thread, while the others prefill and draft
    stats.forwards += await stage.runner.call(worker.prefill, cfg.prompt)
    while True:
        # 1. verdicts from the successor: how far it got, and maybe a rollback to adopt
        rollback = successor.take(io.verdicts_in)
        if rollback is not None:
            up.agreed = min(up.agreed, common_prefix(seq, rollback))
            seq = stage.adopt(rollback, successor.epoch)
        # 2. proposals from the predecessor; roll it back if it disagrees with what this stage has verified
        if io.inbox is not None:
            for proposal in io.inbox.drain():
                up.apply(proposal)
            if up.conflicts_with(seq):
                roll_back_predecessor()
        # 3. what to do now
        room = cfg.max_len - len(seq)
        if room <= 0:
            if is_target:
                return
            stage.set_state("waiting")
            await io.doorbell.wait()
            continue
        n = max(0, min(len(up.tokens) - len(seq), verify_cap, room - 1))
        stage.in_flight = max(0, len(up.tokens) - len(seq))
        if n == 0 and not is_target and len(seq) - successor.verified >= successor.max_ahead:
            stage.set_state("waiting")
            await io.doorbell.wait()
            continue
        rows = None
        if needs_rows and n:
            rows = up.rows[len(seq):len(seq) + n]
            if None in rows:  # tokens without the proposer's rows (adopted, never proposed) cannot be checked
                n = rows.index(None)
                rows = rows[:n] or None
        proposed = up.tokens[len(seq):len(seq) + n]
        stage.set_state("verifying" if n else "drafting")
        started = time.perf_counter()
        result = await stage.runner.call(worker.step, seq + proposed, len(seq), cfg.params, rows)
        link.observe_forward(n + 1, time.perf_counter() - started)
        stats.forwards += 1
        if stage.pending_rollback(successor.epoch):
            continue  # the successor has moved on to another sequence; this result extends a dead one
        stats.record_verification(n, result.accepted)
        if structlog.is_configured():
            log.debug("verified", stage=stage.index, epoch=up.epoch, position=len(seq), proposed=n,
                      accepted=result.accepted, tokens=len(result.tokens))
        stats.drafted += 1
        start = len(seq)
        seq.extend(result.tokens)
        if io.verdicts_out is not None:
            ahead = None
            if cfg.adaptive and n:
                link.observe_verification(n, result.accepted)
                verify_cap = link.verify_cap(cfg.verify_cap)
                ahead = link.run_ahead(cfg.max_ahead)
            io.verdicts_out.put(Verdict(up.epoch, len(seq), ahead=ahead))
            if up.conflicts_with(seq):  # a rejected proposal (the correction differs from the predecessor's token)
                roll_back_predecessor()
        if is_target:
            assert io.commit is not None
            if await io.commit(result.tokens):
                stage.set_state("done")
                return
        else:
            assert io.outbox is not None
            await io.outbox.send(Proposal(successor.epoch, start, result.tokens, result.probs))
