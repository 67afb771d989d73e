"""What a stage coroutine is given: its model (through its runner), its channels, its limits, its statistics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from dataclasses import dataclass

import anyio
import structlog

from ..channels import Doorbell, Handoff, Mailbox, ThreadDoorbell
from ..runners.base import Runner
from ..runners.hosting import CallFn, host_loop
from ..tracing import StageTrace
from ..types import Proposal, StageState, StageStats, Verdict
from ..verify import SamplingParams

log = structlog.get_logger("pipespec.stages")  # unconfigured structlog prints every level: calls are guarded

# The target's output: called with the tokens it has just verified; returns True when the generation is over.
CommitFn = Callable[[tuple[int, ...]], Awaitable[bool]]
STOP_TIMEOUT = 10.0  # seconds a stopped stage loop on a thread may take to finish the worker call it is in


async def run_hosted(stage: Stage, body: Callable[[CallFn], None], stop: Callable[[], None]) -> None:
    """Run a stage's synchronous loop ``body(call)`` on a thread (``runners.hosting.host_loop``: its worker's own
    where the runner hosts loops) until it returns or fails, or this coroutine is cancelled; then ``stop`` it and
    wait, bounded, for it to leave, so no worker call of the stage outlives its generation."""
    done = host_loop(stage.runner, body)
    try:
        await asyncio.wrap_future(done)
    finally:
        stop()
        if not done.done():
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT):
                await asyncio.wait([asyncio.wrap_future(done)])


def traced_call(trace: StageTrace | None, call: CallFn, method: str, *args: Any,
                args_of: Callable[[Any], dict[str, Any]] | None = None, **span_args: Any) -> Any:
    """A worker call from a stage's own thread (``call``: the one ``run_hosted``'s body is given), with its host span
    on the stage's track of the trace when one is recorded: ``span_args`` as its arguments, and ``args_of(result)``'s
    too once the call has returned (what only the result says, e.g. how many tokens a draft made)."""
    began = time.perf_counter()
    result = None
    try:
        result = call(method, *args)
        return result
    finally:
        if trace is not None:
            if args_of is not None and result is not None:
                span_args.update(args_of(result))
            trace.span(method, began, **span_args)


class Monitor(Protocol):
    """What a stage reports to, and asks of, the adaptive runtime (``scheduler.policy.ChainMonitor``)."""

    def observe_forward(self, stage: int, tokens: int, seconds: float) -> None: ...

    def observe_verification(self, proposer: int, verifier: int, proposed: int, accepted: int) -> None: ...

    def observe_commit(self, tokens: int) -> None: ...

    def verify_cap(self, proposer: int, verifier: int, ceiling: int) -> int: ...

    def run_ahead(self, proposer: int, verifier: int, ceiling: int) -> int: ...

    def block(self, verifier: int, ceiling: int) -> int: ...

    def draft_seconds(self) -> float | None: ...

    def step_seconds(self, stage: int) -> float: ...

    def step_known(self, stage: int) -> bool: ...

    def lock_step(self, verifier: int | None = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class StageConfig:
    prompt: tuple[int, ...]
    max_len: int  # prompt + max_new_tokens: no stage's sequence grows past it
    params: SamplingParams
    verify_cap: int = 64  # most proposed tokens checked in one forward pass
    max_ahead: int = 64  # most tokens a non-target stage may run past its successor's verified length
    draft_batch: int = 0  # tokens the draft stage drafts per call into its worker; 0: adaptive (stages.draft.DraftPace)


@dataclass(slots=True)
class StageIO:
    doorbell: Doorbell | ThreadDoorbell  # rung by ``inbox`` and ``verdicts_in`` (a stage on a thread: a thread's)
    inbox: Handoff[Proposal] | None = None  # proposals from the predecessor (None for stage 0)
    outbox: Handoff[Proposal] | None = None  # to the successor (None for the target)
    verdicts_in: Mailbox[Verdict] | None = None  # verdicts from the successor (None for the target)
    verdicts_out: Mailbox[Verdict] | None = None  # verdicts to the predecessor (None for stage 0)
    commit: CommitFn | None = None  # the target's output (None for the other stages)


@dataclass(slots=True)
class SuccessorView:
    """What a stage knows of its successor, from the verdicts it sends up: how far it has verified, how far this stage
    may run past that (the adaptive runtime may lower it), and the epoch of the last rollback adopted from it (every
    proposal this stage sends is tagged with it)."""

    verified: int
    max_ahead: int
    epoch: int = 0
    block: int | None = None  # with the last rollback adopted: how many tokens the successor waits for (Verdict.block)

    def take(self, box: Mailbox[Verdict] | None) -> tuple[int, ...] | None:
        """Read the pending verdict, if any; return the sequence to adopt when it carries a newer rollback."""
        verdict = box.take() if box is not None else None
        if verdict is None:
            return None
        self.verified = verdict.verified
        if verdict.ahead is not None:
            self.max_ahead = verdict.ahead
        if verdict.rollback is None or verdict.epoch <= self.epoch:
            return None
        self.epoch = verdict.epoch
        self.block = verdict.block
        return verdict.rollback


@dataclass(slots=True)
class Stage:
    index: int
    runner: Runner  # serves the stage's model worker, by named calls
    io: StageIO
    config: StageConfig
    stats: StageStats
    in_flight: int = 0  # proposed tokens past this stage's verified prefix, for the live view
    monitor: Monitor | None = None  # the adaptive runtime (pipe mode with adaptive on), indexed like the chain
    bypassed: bool = False  # set by the controller: a draft pauses, a middle stage relays its predecessor's tokens
    trace: StageTrace | None = None  # this stage's track of a trace (None: no tracing, no cost)
    max_window: int | None = None  # its worker's ``WorkerInfo.max_window``: its verify windows stay within it

    def bypass(self, on: bool, why: str = "") -> None:
        """Take this stage out of the chain or bring it back (the controller's call); wakes it to notice. ``why``:
        the adaptive runtime's reason, on the trace's mark."""
        if on and not self.bypassed:
            self.stats.bypasses += 1
        if self.trace is not None and on != self.bypassed:
            self.trace.instant("bypass on" if on else "bypass off", **({"why": why} if why else {}))
        self.bypassed = on
        self.io.doorbell.ring()

    def set_state(self, state: StageState) -> None:
        self.stats.state = state

    def pending_rollback(self, epoch: int) -> bool:
        """True when the successor has rolled this stage back since ``epoch`` and the verdict is still unread."""
        box = self.io.verdicts_in
        verdict = box.peek() if box is not None else None
        return verdict is not None and verdict.rollback is not None and verdict.epoch > epoch

    def adopt(self, rollback: tuple[int, ...], epoch: int, current: list[int] | None = None) -> list[int]:
        """Take the successor's sequence as this stage's own (a rollback); returns it as a new list. When it only
        extends ``current`` (a lock-step hand-over of the successor's bonus token), nothing was rolled back."""
        if current is not None and len(rollback) >= len(current) and rollback[:len(current)] == tuple(current):
            if self.trace is not None:
                self.trace.instant("handed over", epoch=epoch, position=len(rollback))
            return list(rollback)
        self.set_state("rolling back")
        self.stats.rollbacks += 1
        if self.trace is not None:
            self.trace.instant("rollback adopted", epoch=epoch, position=len(rollback))
        if structlog.is_configured():
            log.debug("rollback adopted", stage=self.index, epoch=epoch, position=len(rollback))
        return list(rollback)
