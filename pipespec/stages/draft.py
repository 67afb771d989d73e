"""Stage 0: drafts optimistically, never waiting for verification.

It stops only when it is ``max_ahead`` tokens past its successor's verified sequence (more would be wasted work:
verification would reach those tokens only after many more rounds) or at the length limit; a rollback from its
successor replaces its sequence and it drafts on from there. Bypassed by the adaptive runtime, it pauses (its
successor then drafts on its own) until it is brought back.

Tokens per call into the worker (``draft_batch``; 0 = adaptive, ``DraftPace``): one call per token costs a round
trip through the runner (on the CPU ~100 us of event-loop time; on a GPU shared with a big stage, a wait behind
that stage's graph). While the successor is busy with a step much longer than a draft token, drafting k tokens
per call delivers them no later than it could use them, for one round trip instead of k. A rollback may say how many
tokens the successor waits for (``Verdict.block``): the next call drafts exactly those. Where the draft shares its
GPU with that successor (lock step), it then waits for the verdict before drafting more.

Where it runs: the coroutine ``run_draft`` owns the stage (its lifetime, errors, cancellation), but its loop,
``DraftLoop``, runs on a thread: its worker's own where the runner hosts loops (``ThreadRunner.host_loop``: each
worker call is then a plain function call), else a thread of its own that makes blocking runner calls
(``runners.hosting``). The draft's whole job is to keep its worker busy, and every token it drafts through the event
loop cost a round trip (a result's wake-up, the coroutine's step, the next call's hand-off: ~70 us of loop CPU on a
2-core VM, 3+ times per committed token). On its thread it drafts call after call without the loop; the loop hears
from it only when its successor is waiting for its tokens (``Handoff``), and it hears the loop through a locked
mailbox and a ``ThreadDoorbell``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ..channels import Handoff, Mailbox, ThreadDoorbell
from ..types import Proposal, Verdict
from .base import Stage, SuccessorView, run_hosted, traced_call

__all__ = ["DraftLoop", "DraftPace", "run_draft"]

# Seconds a draft in lock step waits at most for a verdict before the target's forward has been timed (its first,
# which feeds the prompt too, is not), and beyond its usual bound for its verifier's first hand-over (sent before
# that verifier's first forward, through a bypassed middle stage's relay once it has prefilled). Late, the draft
# drafts on its own.
START_WAIT = 0.5


class DraftPace:
    """How many tokens the next draft call should draft (pure bookkeeping; times in seconds).

    A call drafting k tokens costs about ``c0 + c1 * k``: ``c0`` the round trip and any wait for the device (behind
    a big stage's graph on a shared GPU, c0 is that stage's whole forward), ``c1`` the draft's own forward per
    token; both are fitted online (least squares with forgetting over the calls' (k, seconds)). The successor's
    step ``interval`` comes from the pace of its verdicts (one per step; the mailbox counts them, merged ones
    included). The batch is the most tokens whose own cost fits in ``share`` of a successor step:
    ``k = share * interval / c1`` within [1, ceiling] (and the room the caller has). So a draft 10x faster than its
    successor drafts ~5 per call (each batch out within half a step of the successor's next look), a draft that
    waits 7 ms behind a 7B graph for a 0.3 ms forward drafts ~11 per wait instead of 1, and a draft as slow as its
    successor drafts one at a time. Until two batch sizes have been seen, it tries the next size up to learn c1.
    """

    def __init__(self, verdicts: Mailbox[Verdict], ceiling: int = 16, share: float = 0.5,
                 forget: float = 0.9) -> None:
        self.verdicts = verdicts
        self.ceiling = ceiling
        self.share = share
        self.forget = forget
        self.interval: float | None = None
        self._sums = [0.0] * 5  # weighted sums of 1, k, k*k, t, k*t
        self._last_k = 0
        self._puts = verdicts.puts
        self._since = time.perf_counter()

    def observe_call(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        k, f, s = float(tokens), self.forget, self._sums
        for i, x in enumerate((1.0, k, k * k, seconds, k * seconds)):
            s[i] = f * s[i] + x
        self._last_k = tokens

    def observe_verdicts(self, now: float) -> None:
        puts = self.verdicts.puts
        if puts > self._puts:
            step = (now - self._since) / (puts - self._puts)
            self.interval = step if self.interval is None else self.interval + 0.2 * (step - self.interval)
            self._puts, self._since = puts, now

    def marginal(self) -> float | None:
        """c1, the fitted time per drafted token; None while the calls seen do not tell it apart from c0."""
        n, sk, skk, st, skt = self._sums
        det = n * skk - sk * sk
        if n < 2 or det < 1e-3 * n * n:
            return None
        return (n * skt - sk * st) / det

    def batch(self, room: int) -> int:
        limit = min(self.ceiling, room)
        if self.interval is None or limit <= 1:
            return 1
        c1 = self.marginal()
        if c1 is None:
            k = self._last_k + 1 if self._sums[0] >= 2 else 1
        elif c1 <= 0:
            k = limit  # no measurable cost per token: the round trip is everything
        else:
            k = int(self.share * self.interval / c1 + 1e-6)  # + 1e-6: 4.9999 is 5
        return max(1, min(k, limit))


def _drafted(result: Any) -> dict[str, Any]:
    """A draft call's span arguments from its result (``traced_call``): how many tokens it made."""
    return {"tokens": len(result.tokens)}


async def run_draft(stage: Stage) -> None:
    """Run the draft stage's loop on a thread (see the module's docstring) until cancelled or failed; returns only
    once that thread has left the loop, so no draft call outlives the generation."""
    draft = DraftLoop(stage, asyncio.get_running_loop())
    await run_hosted(stage, draft.run, draft.stop)


class DraftLoop:
    """The draft stage's loop (on a thread: never the event loop's). ``run(call)`` drafts until ``stop``; ``call``
    makes one worker call (``call("draft", seq, k, params)``) and returns its result.

    Everything it shares with the event loop is safe across threads: the verdict mailbox is locked; its doorbell is
    a ``ThreadDoorbell``; its proposals go down a ``Handoff``; the stage's statistics and state are written by it
    alone; a trace event is one ``list.append``; the adaptive runtime's latency estimate of stage 0 is written by it
    alone and read as one snapshot (``policy.LinkEstimator``)."""

    def __init__(self, stage: Stage, loop: asyncio.AbstractEventLoop) -> None:
        io = stage.io
        assert isinstance(io.outbox, Handoff) and io.verdicts_in is not None, "the draft stage needs a successor"
        assert isinstance(io.doorbell, ThreadDoorbell), "the draft stage waits on a ThreadDoorbell"
        self.stage = stage
        self.loop = loop
        self.outbox: Handoff[Proposal] = io.outbox
        self.verdicts: Mailbox[Verdict] = io.verdicts_in
        self.bell: ThreadDoorbell = io.doorbell
        self.stopped = False

    def stop(self) -> None:
        """Leave the loop after the worker call it is in, if any (any thread)."""
        self.stopped = True
        self.bell.ring()

    def _wait(self, reason: str) -> None:
        trace = self.stage.trace
        waited = time.perf_counter()
        self.bell.wait_blocking()
        if trace is not None:
            trace.span("wait", waited, reason=reason)

    def run(self, call: Callable[..., Any]) -> None:
        stage, verdicts = self.stage, self.verdicts
        cfg, stats, trace = stage.config, stage.stats, stage.trace
        seq = list(cfg.prompt)
        successor = SuccessorView(len(cfg.prompt), cfg.max_ahead)
        pace = DraftPace(verdicts) if cfg.draft_batch == 0 else None
        # lock step (``ChainMonitor.lock_step``: the draft shares its GPU with the stage checking its blocks): after
        # publishing a block, wait for the verdict on it (the count of verdicts then; None: not waiting). From the
        # start: the verifier's first hand-over names the first block, so nothing is drafted before it comes
        start_wait = stage.monitor is not None and stage.monitor.lock_step()
        awaited: int | None = None
        # every stage prefills at once, on its own thread, while the others prefill and draft
        stats.forwards += traced_call(trace, call, "prefill", cfg.prompt)
        while not self.stopped:
            rollback = successor.take(verdicts)
            if rollback is not None:
                seq = stage.adopt(rollback, successor.epoch, seq)
            first_wait = START_WAIT if start_wait else 0.0
            if start_wait and successor.epoch == 0:
                awaited = verdicts.puts  # nothing handed over yet
            start_wait = False
            if (awaited is None and len(seq) + 1 < successor.verified and not stage.bypassed
                    and stage.monitor is not None and stage.monitor.lock_step()):
                # behind its successor (back from a bypass, it decoded alone meanwhile): what it would draft from
                # here is already decided, and would only slow its verifier's forward; its verifier hands over
                # (``stages.verifier``: a lone decode with nothing of the draft's at its position)
                awaited = verdicts.puts
            if awaited is not None:
                if verdicts.puts == awaited and not stage.bypassed and stage.monitor is not None:
                    stage.set_state("waiting")
                    waited = time.perf_counter()
                    # bounded: a verdict that does not come (the successor moved on) must not stop the draft
                    target = stage.monitor.active[-1]
                    until = waited + first_wait + (3 * stage.monitor.step_seconds(target) + 0.005
                                                   if stage.monitor.step_known(target) else START_WAIT)
                    while verdicts.puts == awaited and not stage.bypassed and not self.stopped:
                        left = until - time.perf_counter()
                        if left <= 0 or not self.bell.wait_blocking(left):  # a ring already read: wait again
                            break
                    if trace is not None:
                        trace.span("wait", waited, reason="verdict")
                    if verdicts.puts == awaited:
                        awaited = None  # late: draft on
                    continue
                awaited = None
            ahead = len(seq) - successor.verified
            room = min(cfg.max_len - len(seq), successor.max_ahead - ahead)
            if room <= 0 or stage.bypassed:
                stage.set_state("bypassed" if stage.bypassed else "waiting")
                self._wait("bypassed" if stage.bypassed else "ahead")
                continue
            stage.set_state("drafting")
            started = time.perf_counter()
            if pace is not None:
                pace.observe_verdicts(started)
            block = successor.block
            if block:  # the successor waits for this many after its rollback: make them in one call
                k, successor.block = min(block, room), None
            elif pace is not None:
                k = pace.batch(room)
            else:
                k = min(cfg.draft_batch, room)
            # block: the call drafts the block its successor waits for (in lock step, the only calls timed)
            result = traced_call(trace, call, "draft", seq, k, cfg.params, block=bool(block), args_of=_drafted)
            elapsed = time.perf_counter() - started
            if pace is not None:
                pace.observe_call(len(result.tokens), elapsed)
            if stage.monitor is not None and result.tokens and (block or not stage.monitor.lock_step()):
                # in lock step only a block's call is timed: the verifier waits then, while a call made beside its
                # forward waits behind it on the shared GPU (a 1B drafted 23 ms a token so beside a 70B's rank),
                # and that time would make the blocks, and so lock step, stop (``ChainMonitor.block``)
                stage.monitor.observe_forward(stage.index, 1, elapsed / len(result.tokens))
            stats.forwards += len(result.tokens)
            stats.drafted += len(result.tokens)
            if stage.pending_rollback(successor.epoch):
                if trace is not None:
                    trace.instant("drafts dropped", tokens=len(result.tokens))
                continue  # drafted on a sequence the successor has already rejected
            start = len(seq)
            seq.extend(result.tokens)
            self.outbox.put(Proposal(successor.epoch, start, result.tokens, result.probs), self.loop)
            if block and stage.monitor is not None and stage.monitor.lock_step():
                awaited = verdicts.puts
