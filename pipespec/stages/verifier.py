"""Every stage after the first, the target included.

Whenever it is free, a verifying stage takes everything its predecessor has proposed beyond its own verified
sequence (at most ``verify_cap`` tokens) and checks it in ONE forward pass: it keeps the longest prefix that agrees
with its own choices and appends its own next token (correction or bonus). With nothing new to check it decodes one
token itself, so it never idles (a middle stage stops at ``max_ahead`` tokens past its own successor) -- except right
after it rolled back a draft much faster than itself: then the adaptive runtime has it wait, briefly, for a block of
the draft's new tokens (``scheduler.policy.best_block``; the rollback tells the draft how many), since decoding alone
there spends a whole forward on one token while the draft restarts. Where the draft shares this stage's GPU
(``ChainMonitor.lock_step``), every verification ends that way: the verdict hands the draft the bonus token and the
next block's size, and the draft waits for it instead of drafting past the block and slowing the verify.

Its verified tokens go downstream as proposals (the target commits them instead). When its predecessor's sequence
disagrees with its verified one, it rolls the predecessor back: it bumps the link's epoch and sends its verified
sequence up; the predecessor adopts it, and cascades the rollback further up if its own predecessor disagrees too.

Where it runs: a middle stage runs its loop on its worker's thread, as the draft does (``stages.draft``), and the
target runs its loop on the event loop, where the output is. The loop is written once, as a generator of effects
(``_Verifier.steps``: a worker call, a wait on the doorbell, a proposal sent, a commit), and driven either way: on
the event loop each effect is awaited (``_Verifier.drive``), on a thread it is a plain blocking call
(``_HostedVerifier``). On a 2-core VM a result that comes back through the event loop costs it 110-130 us of CPU,
several times the stage's own logic; a middle stage on the loop made ~1.2 of those per committed token.

Bypassed by the adaptive runtime (a middle stage only), it runs no forward passes: it relays its predecessor's
tokens downstream unchanged (with their proposer's probability rows and origin, so the successor checks them as
that proposer's) and relays its successor's progress up, so the chain behaves as if it were not there. Its KV cache
stays behind; brought back, its next forward pass feeds what it missed. Lossless either way: the target checks
every token it commits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import Any, NamedTuple

import structlog

from ..channels import Doorbell, Handoff, ThreadDoorbell
from ..runners.hosting import CallFn
from ..workers.base import common_prefix
from ..types import Proposal, RowRefs, Verdict
from .base import Stage, SuccessorView, log, run_hosted, traced_call


# Seconds a verifier waits at most for a block whose drafting time nothing has measured yet (lock step's first; a
# block's calls may also capture CUDA graphs then). Past it the verifier decodes alone, which is correct, only slower.
COLD_WAIT = 0.25
# Seconds added to a measured block's wait: the host's share of it (the draft thread's wake-up, a round trip through
# the loop), which the forwards' times do not include. Tests that count what the scheduling does, not how promptly a
# loaded 2-core host runs it, raise it (the ``patient_blocks`` fixture): there a thread may wait milliseconds for a core.
BLOCK_SLACK = 0.0005


class _Upstream:
    """This stage's view of its predecessor's sequence in the current epoch, and the epoch itself."""

    def __init__(self, prompt: tuple[int, ...], predecessor: int) -> None:
        self.tokens: list[int] = list(prompt)
        self.rows: list[tuple[Any, int] | None] = [None] * len(prompt)  # proposer's prob rows (rejection rule)
        self.origins: list[int] = [predecessor] * len(prompt)  # the stage that chose each token
        self.predecessor = predecessor
        self.epoch = 0
        self.agreed = len(prompt)  # tokens[:agreed] == the stage's verified sequence[:agreed]

    def apply(self, proposal: Proposal) -> bool:
        """Take a proposal of the current epoch; False when it is stale (made before the last rollback)."""
        if proposal.epoch != self.epoch:
            return False
        if proposal.start > len(self.tokens):
            raise RuntimeError(f"proposal starts at {proposal.start} past the known sequence ({len(self.tokens)})")
        n = len(proposal.tokens)
        del self.tokens[proposal.start:]
        del self.rows[proposal.start:]
        del self.origins[proposal.start:]
        self.tokens.extend(proposal.tokens)
        if isinstance(proposal.probs, RowRefs):
            self.rows.extend(proposal.probs.rows)
        elif proposal.probs is not None:
            self.rows.extend((proposal.probs, i) for i in range(n))
        else:
            self.rows.extend([None] * n)
        origin = self.predecessor if proposal.origin is None else proposal.origin
        self.origins.extend([origin] * n)
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
        self.origins = [self.predecessor] * len(seq)
        self.agreed = len(seq)

    def checkable(self, start: int, n: int, needs_rows: bool) -> int:
        """How many of the ``n`` tokens from ``start`` can be checked: under the rejection rule, only those that
        came with their proposer's rows (tokens adopted in a rollback never were proposed)."""
        if needs_rows and n:
            rows = self.rows[start:start + n]
            if None in rows:
                return rows.index(None)
        return n


# What a verifier's loop (``_Verifier.steps``, a generator) asks of whoever drives it; the answer is sent back in.
class _Call(NamedTuple):
    """A worker call: ``method(*args)``; answered with its result."""

    method: str
    args: tuple[Any, ...]


class _Wait(NamedTuple):
    """Wait on the stage's doorbell, at most ``timeout`` seconds; answered True when rung."""

    timeout: float | None


class _Send(NamedTuple):
    """A proposal for the successor."""

    proposal: Proposal


class _Commit(NamedTuple):
    """The target's verified tokens for the output; answered True when the generation is over."""

    tokens: tuple[int, ...]


class _Pause(NamedTuple):
    """Lock step, after a hand-over: let the draft take it and start its block first."""


Effect = _Call | _Wait | _Send | _Commit | _Pause
Steps = Generator[Effect, Any, Any]


async def run_verifier(stage: Stage) -> None:
    """Run a verifying stage until the generation is over (the target) or it is cancelled. A stage that waits on a
    ``ThreadDoorbell`` (every middle stage: ``scheduler.run.build_stages``) runs its loop on its worker's thread, as
    the draft does (``stages.draft``): each forward is a plain call there, without a round trip through the event
    loop; the target runs on the event loop, where the output is."""
    verifier = _Verifier(stage)
    if isinstance(stage.io.doorbell, ThreadDoorbell):
        hosted = _HostedVerifier(verifier, asyncio.get_running_loop())
        await run_hosted(stage, hosted.run, hosted.stop)
    else:
        await verifier.drive()


class _HostedVerifier:
    """Drives a verifier's loop on a thread (``runners.hosting.host_loop``) until it ends or ``stop`` is called."""

    def __init__(self, verifier: _Verifier, loop: asyncio.AbstractEventLoop) -> None:
        io = verifier.stage.io
        assert isinstance(io.doorbell, ThreadDoorbell) and isinstance(io.outbox, Handoff), "a middle stage on a thread"
        self.verifier = verifier
        self.loop = loop
        self.bell: ThreadDoorbell = io.doorbell
        self.outbox: Handoff[Proposal] = io.outbox
        self.stopped = False

    def stop(self) -> None:
        """Leave the loop after the worker call it is in, if any (any thread)."""
        self.stopped = True
        self.bell.ring()

    def run(self, call: CallFn) -> None:
        trace = self.verifier.stage.trace
        steps = self.verifier.steps()
        answer: Any = None
        try:
            while not self.stopped:
                try:
                    effect = steps.send(answer)
                except StopIteration:
                    return
                if isinstance(effect, _Call):
                    answer = traced_call(trace, call, effect.method, *effect.args)
                elif isinstance(effect, _Wait):
                    answer = self.bell.wait_blocking(effect.timeout)
                elif isinstance(effect, _Send):
                    answer = self.outbox.put(effect.proposal, self.loop)
                elif isinstance(effect, _Pause):
                    answer = time.sleep(0)  # hand the GIL to the draft's thread, woken by the hand-over
                else:
                    raise RuntimeError("only the target commits, and it runs on the event loop")
        finally:
            steps.close()


class _Verifier:
    """One verifying stage's state and the steps of its loop (``steps``: a generator of effects, so the same loop
    runs on the event loop, ``drive``, or on a thread, ``_HostedVerifier``)."""

    def __init__(self, stage: Stage) -> None:
        cfg = stage.config
        self.stage = stage
        self.is_target = stage.io.outbox is None
        self.seq = list(cfg.prompt)  # this stage's verified sequence (a bypassed stage: what it has relayed)
        self.up = _Upstream(cfg.prompt, stage.index - 1)
        self.successor = SuccessorView(len(cfg.prompt), cfg.max_ahead)
        # the most proposals one forward may check: the request's cap, within the worker's fast window (a quantized
        # model's GEMV serves up to 16 rows per launch; the 17th doubles a forward's cost, and the adaptive runtime's
        # linear latency fit, shown one such forward, would keep the windows small for the rest of the generation)
        self.ceiling = min(cfg.verify_cap, stage.max_window or cfg.verify_cap)
        self.verify_cap = self.ceiling  # adapted online when the adaptive runtime is on
        self.needs_rows = cfg.params.needs_probs
        self.relayed_up = (-1, -1)  # (verified, ahead) last relayed to the predecessor while bypassed
        self.want = 0  # after rolling back a fast draft: proposals to wait for before the next forward (0: none)
        self.want_until = 0.0  # ... but no longer than this (perf_counter seconds): then it goes with what it has
        self.unprefilled = False  # lock step: the first forward feeds the prompt too (no separate prefill)

    async def drive(self) -> None:
        """Run the loop on the event loop (the target's way)."""
        stage, io = self.stage, self.stage.io
        assert isinstance(io.doorbell, Doorbell), "a stage on the event loop waits on a Doorbell"
        bell = io.doorbell
        steps = self.steps()
        answer: Any = None
        try:
            while True:
                try:
                    effect = steps.send(answer)
                except StopIteration:
                    return
                if isinstance(effect, _Call):
                    answer = await stage.runner.call(effect.method, *effect.args)
                elif isinstance(effect, _Wait):
                    answer = await bell.wait(effect.timeout)
                elif isinstance(effect, _Commit):
                    assert io.commit is not None
                    answer = await io.commit(effect.tokens)
                elif isinstance(effect, _Send):
                    assert io.outbox is not None
                    answer = io.outbox.put(effect.proposal, asyncio.get_running_loop())
                else:
                    # the draft, woken by a hand-over, takes it and starts its block (a runner call) before this
                    # stage commits and looks for work: on a shared GPU the GPU idles until the draft's call is made
                    answer = await asyncio.sleep(0)
        finally:
            steps.close()

    def steps(self) -> Steps:
        """The stage's loop, until the target has committed the generation's last token."""
        stage, cfg, io = self.stage, self.stage.config, self.stage.io
        stage.set_state("drafting")
        if stage.monitor is not None and io.verdicts_out is not None and stage.monitor.lock_step(stage.index):
            # lock step from the first token: the draft waits for this hand-over (the prompt's end and the first
            # block's size) instead of drafting beside this stage's forwards, and the first verification feeds the
            # prompt too (one forward for prefill and verify, as lock-step sd does)
            self.roll_back_predecessor(self.expect_block(), rejected=False)
            self.unprefilled = True
        else:
            # every stage prefills at once, in its own thread, while the others prefill and draft
            stage.stats.forwards += yield _Call("prefill", (cfg.prompt,))
        while True:
            self.take_verdict()
            self.take_proposals()
            # what to do now
            room = cfg.max_len - len(self.seq)
            if room <= 0:
                if self.is_target:
                    return
                stage.set_state("waiting")
                yield from self.wait("length")
                continue
            if stage.bypassed and not self.is_target:
                yield from self.relay(room)
                continue
            n = max(0, min(len(self.up.tokens) - len(self.seq), self.verify_cap, room - 1))
            stage.in_flight = max(0, len(self.up.tokens) - len(self.seq))
            if self.want > n and (yield from self.wait_for_block()):
                continue
            if (n == 0 and not self.is_target
                    and len(self.seq) - self.successor.verified >= self.successor.max_ahead):
                stage.set_state("waiting")
                yield from self.wait("ahead")
                continue
            if (yield from self.verify(n)):
                return

    def wait(self, reason: str, timeout: float | None = None) -> Steps:
        trace = self.stage.trace
        waited = time.perf_counter() if trace is not None else 0.0
        yield _Wait(timeout)
        if trace is not None:
            trace.span("wait", waited, reason=reason)

    def wait_for_block(self) -> Steps:
        """Wait (bounded by ``want_until``) for the draft's block after a rollback; False once the time is up."""
        left = self.want_until - time.perf_counter()
        if left <= 0:
            self.want = 0
            return False
        self.stage.set_state("waiting")
        yield from self.wait("block", left)
        return True

    def expect_block(self) -> int:
        """After rolling the predecessor back: how many of the draft's tokens to wait for (the adaptive runtime's
        ``block``; 0 without it), and until when (twice their drafting time plus a quarter of this stage's step:
        the draft first finishes the call it is in; plus ``BLOCK_SLACK`` for the host; ``COLD_WAIT`` before the draft's
        time is known)."""
        monitor, stage = self.stage.monitor, self.stage
        if monitor is None:
            return 0
        self.want = monitor.block(stage.index, min(self.verify_cap, stage.config.max_len - len(self.seq) - 1))
        draft_s = monitor.draft_seconds()
        if self.want:
            step_s = monitor.step_seconds(stage.index)
            wait = COLD_WAIT if draft_s is None else 2 * self.want * draft_s + 0.25 * step_s + BLOCK_SLACK
            self.want_until = time.perf_counter() + wait
        return self.want

    def take_verdict(self) -> None:
        """Verdicts from the successor: how far it got, and maybe a rollback to adopt."""
        rollback = self.successor.take(self.stage.io.verdicts_in)
        if rollback is not None:
            self.up.agreed = min(self.up.agreed, common_prefix(self.seq, rollback))
            self.seq = self.stage.adopt(rollback, self.successor.epoch, self.seq)

    def take_proposals(self) -> None:
        """Proposals from the predecessor; roll it back if it disagrees with what this stage has verified."""
        inbox = self.stage.io.inbox
        if inbox is not None:
            for proposal in inbox.drain():
                self.up.apply(proposal)
            if self.up.conflicts_with(self.seq):
                # bypassed, this stage passes its successor's rollback on: with the block the successor waits for
                block, self.successor.block = (self.successor.block if self.stage.bypassed else None), None
                self.roll_back_predecessor(block)
            elif self.stage.bypassed and self.successor.block:  # a lock-step hand-over (``verify``), passed on
                block, self.successor.block = self.successor.block, None
                self.roll_back_predecessor(block, rejected=False)

    def roll_back_predecessor(self, block: int | None = None, rejected: bool = True) -> None:
        """Send the predecessor this stage's verified sequence to adopt (a new epoch). ``rejected``: it disagreed
        (a rollback, counted); else a lock-step hand-over of the bonus token with the next block's size."""
        stage, up, seq = self.stage, self.up, self.seq
        up.reset_to(seq)
        assert stage.io.verdicts_out is not None
        stage.io.verdicts_out.put(Verdict(up.epoch, len(seq), tuple(seq), block=block or None))
        if not rejected:
            return
        stage.stats.rollbacks_sent += 1
        if stage.trace is not None:
            stage.trace.instant("rollback sent", epoch=up.epoch, position=len(seq))
        if structlog.is_configured():
            log.debug("rollback sent", stage=stage.index, epoch=up.epoch, position=len(seq))

    def relay(self, room: int) -> Steps:
        """Bypassed: pass the predecessor's new tokens down as they are, and the successor's progress up."""
        stage, io, up, successor = self.stage, self.stage.io, self.up, self.successor
        assert io.verdicts_out is not None
        progress = (successor.verified, successor.max_ahead)
        if progress != self.relayed_up:  # the predecessor drafts against the successor's progress, not the relay's
            self.relayed_up = progress
            io.verdicts_out.put(Verdict(up.epoch, successor.verified, ahead=successor.max_ahead))
        start = len(self.seq)
        n = up.checkable(start, min(len(up.tokens) - start, room), self.needs_rows)
        stage.in_flight = 0
        if n <= 0:
            stage.set_state("bypassed")
            yield from self.wait("bypassed")
            return
        if stage.trace is not None:
            stage.trace.instant("relay", position=start, tokens=n)
        tokens = tuple(up.tokens[start:start + n])
        rows = RowRefs(tuple(up.rows[start:start + n])) if self.needs_rows else None  # type: ignore[arg-type]
        self.seq.extend(tokens)
        yield _Send(Proposal(successor.epoch, start, tokens, rows, up.origins[start]))

    def verify(self, n: int) -> Steps:
        """Check up to ``n`` of the predecessor's tokens in one forward pass (none: decode one token) and publish
        the result; True when the target has committed the generation's last token."""
        stage = self.stage
        cfg, io, stats, monitor = stage.config, stage.io, stage.stats, stage.monitor
        up, seq = self.up, self.seq
        n = up.checkable(len(seq), n, self.needs_rows)
        rows = up.rows[len(seq):len(seq) + n] if self.needs_rows and n else None
        proposed = up.tokens[len(seq):len(seq) + n]
        origin = up.origins[len(seq)] if n else up.predecessor
        stage.set_state("verifying" if n else "drafting")
        self.want = 0
        started = time.perf_counter()
        result = yield _Call("step", (seq + proposed, len(seq), cfg.params, rows))
        if monitor is not None and not self.unprefilled:
            monitor.observe_forward(stage.index, n + 1, time.perf_counter() - started)
        self.unprefilled = False  # the prompt's forward (lock step's first) is no measure of a verify's time
        stats.forwards += 1
        if stage.pending_rollback(self.successor.epoch):
            return False  # the successor has moved on to another sequence; this result extends a dead one
        stats.record_verification(n, result.accepted)
        if stage.trace is not None:
            stage.trace.span("verify" if n else "decode", started, position=len(seq), proposed=n,
                             accepted=result.accepted)
        if structlog.is_configured():
            log.debug("verified", stage=stage.index, epoch=up.epoch, position=len(seq), proposed=n,
                      accepted=result.accepted, tokens=len(result.tokens))
        stats.drafted += 1
        start = len(seq)
        behind = len(up.tokens) < start  # the predecessor has nothing at this position (back from a bypass)
        seq.extend(result.tokens)
        if io.verdicts_out is not None:
            ahead = None
            if monitor is not None and n:
                monitor.observe_verification(origin, stage.index, n, result.accepted)
                self.verify_cap = monitor.verify_cap(origin, stage.index, self.ceiling)
                ahead = monitor.run_ahead(origin, stage.index, cfg.max_ahead)
            self.relayed_up = (-1, -1)
            locked = monitor is not None and monitor.lock_step(stage.index)
            # one verdict per verification: a rollback or hand-over replaces the plain one (the mailbox would merge
            # them so), and a draft taking verdicts on its own thread never sees the plain one alone (it would draft
            # freely beside this stage's next forward, then drop those drafts)
            if up.conflicts_with(seq):  # a rejected proposal (the correction differs from the predecessor's token)
                self.roll_back_predecessor(self.expect_block())
            elif locked and (n or behind):
                # in lock step the draft waits for this verdict: hand it the bonus token and the next block's size.
                # A draft behind this stage (back from a bypass) waits for it too: it would draft only what is
                # decided already, and three rollbacks without a block left the target decoding alone until its probe
                self.roll_back_predecessor(self.expect_block(), rejected=False)
            else:
                io.verdicts_out.put(Verdict(up.epoch, len(seq), ahead=ahead))
            if locked:
                yield _Pause()  # the draft takes the hand-over and starts its block before this stage goes on
        if self.is_target:
            if monitor is not None:
                monitor.observe_commit(len(result.tokens))
            if (yield _Commit(result.tokens)):
                stage.set_state("done")
                return True
            return False
        yield _Send(Proposal(self.successor.epoch, start, result.tokens, result.probs))
        return False
