"""One generation in ``pipe`` (or ``ar``) mode: wire the chain, run every stage in one task group, stop cleanly.

``ar`` is the same code with a chain of one: the target with no predecessor decodes one token per forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

import anyio
import structlog
import torch

from ..channels import Doorbell, Handoff, Mailbox, ThreadDoorbell
from ..errors import PipelineError, first_line
from .policy import ChainMonitor
from ..stages import Stage, StageConfig, StageIO, run_draft, run_verifier
from ..types import Proposal, Snapshot, StageSnapshot, StageStats, Verdict
from .output import Output
from .request import Member, Request

log = structlog.get_logger("pipespec.scheduler")


class LiveRun:
    """The mutable state of a running generation, turned into immutable snapshots for the live view."""

    def __init__(self, request: Request, stages: list[Stage], output: Output) -> None:
        self.request = request
        self.stages = stages
        self.output = output
        self.started = time.perf_counter()
        self.finished: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    def snapshot(self) -> Snapshot:
        views = []
        for stage in self.stages:
            st = stage.stats
            inbox = stage.io.inbox
            recent = tuple(st.recent)  # one step: a middle stage's thread appends to it meanwhile
            recent_p = sum(p for p, _ in recent)
            recent_a = sum(a for _, a in recent)
            views.append(StageSnapshot(
                index=stage.index, model=st.model, device=st.device, state=st.state,
                queue_depth=inbox.depth if inbox is not None else 0, in_flight=stage.in_flight,
                forwards=st.forwards, proposed=st.proposed, accepted=st.accepted,
                recent_proposed=recent_p, recent_accepted=recent_a, verifications=st.verifications,
                rollbacks=st.rollbacks, busy_seconds=stage.runner.busy_seconds))
        return Snapshot(mode=self.request.mode, stages=tuple(views), committed=len(self.output.tokens),
                        elapsed=self.elapsed, text=self.output.text, done=self.finished is not None)


def build_stages(members: Sequence[Member], request: Request, output: Output,
                 monitor: ChainMonitor | None = None, on_loop: Collection[int] = ()) -> list[Stage]:
    """Stage objects and the channels between them: proposals down, verdicts up, one doorbell per stage.
    ``monitor``: the adaptive runtime of this chain (None: static caps, every stage always in the chain).
    ``on_loop``: middle stages that run their loop on the event loop as the target does, calling their workers
    through it (slower: a diagnostic, and the seam that tests ``stages.verifier``'s event-loop driver with)."""
    assert all(0 < i < len(members) - 1 for i in on_loop), "only a middle stage can move to the event loop"
    config = StageConfig(prompt=request.prompt, max_len=request.max_len, params=request.params,
                         verify_cap=request.verify_cap, max_ahead=request.max_ahead,
                         draft_batch=request.draft_batch)
    # every stage but the target runs its loop on its worker's thread (``stages``): it waits on a thread's doorbell
    # and hands its proposals over through a ``Handoff``; the target waits on the event loop
    bells: list[Doorbell | ThreadDoorbell] = [ThreadDoorbell() if i not in on_loop else Doorbell()
                                              for i in range(len(members) - 1)]
    bells.append(Doorbell())
    ios = [StageIO(doorbell=bell) for bell in bells]
    for i in range(len(members) - 1):
        down: Handoff[Proposal] = Handoff(f"proposals {i}->{i + 1}", bells[i + 1])
        up: Mailbox[Verdict] = Mailbox(f"verdicts {i + 1}->{i}", bells[i], Verdict.merge)
        ios[i].outbox, ios[i + 1].inbox = down, down
        ios[i].verdicts_in, ios[i + 1].verdicts_out = up, up
    ios[-1].commit = output.commit
    return [Stage(index=i, runner=m.runner, io=io, config=config,
                  stats=StageStats(model=m.name, device=m.device), monitor=monitor, max_window=m.info.max_window)
            for i, (m, io) in enumerate(zip(members, ios))]


async def _guarded(stage: Stage) -> None:
    """Run one stage; a failure becomes a PipelineError that names it."""
    body = run_verifier if stage.index > 0 or stage.io.outbox is None else run_draft
    try:
        await body(stage)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a stage ends the generation, reported once
        raise stage_failed(stage, exc) from exc


def stage_failed(stage: Stage, exc: Exception) -> PipelineError:
    """One line naming the failed stage; out of GPU memory also names its device and suggests a placement."""
    if isinstance(exc, PipelineError):  # a runner's own report (a dead worker process, a missed deadline) names it
        return exc
    name = f"stage {stage.index} ({stage.stats.model})"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return PipelineError(f"{name} ran out of GPU memory on {stage.stats.device} mid-generation; try another "
                             "placement (--placement: this model on a GPU of its own, or 'cpu'), a smaller dtype "
                             "or fewer new tokens", stage=stage.index)
    return PipelineError(f"{name} failed: {type(exc).__name__}: {first_line(exc, 400)}"[:400], stage=stage.index)


def use_chain(stages: Sequence[Stage], chain: tuple[int, ...], why: str = "") -> None:
    """Bypass every stage that is not in ``chain`` (the target always is) and bring back those that are; ``why``:
    the monitor's reason (``ChainMonitor.why``), for the trace."""
    for stage in stages[:-1]:
        stage.bypass(stage.index not in chain, why)


async def _control(stages: list[Stage], monitor: ChainMonitor) -> None:
    """The adaptive runtime's stage bypass: now and then, ask the monitor which sub-chain to run."""
    while True:
        await anyio.sleep(monitor.interval)
        try:
            chain = monitor.decide(time.perf_counter())
        except (ValueError, ArithmeticError) as exc:  # a policy bug must not cost the user their generation
            if structlog.is_configured():
                log.warning("stage bypass off for this generation", error=f"{type(exc).__name__}: {exc}")
            return
        if chain is not None:
            use_chain(stages, chain, monitor.why)
            if structlog.is_configured():
                log.debug("chain changed", chain=[stages[i].stats.model for i in chain])


async def run_pipe(stages: list[Stage], live: LiveRun) -> None:
    """Run every stage until the target says the generation is over, then cancel the rest."""
    monitor = stages[-1].monitor if len(stages) > 1 else None  # a chain of one has nothing to bypass
    if monitor is not None:
        use_chain(stages, monitor.active, "carried over")  # start from the sub-chain the last generation ended with
        monitor.begin(time.perf_counter())
    async with anyio.create_task_group() as tg:
        for stage in stages[:-1]:
            tg.start_soon(_guarded, stage, name=f"stage-{stage.index}")
        if monitor is not None:
            tg.start_soon(_control, stages, monitor, name="controller")
        await _guarded(stages[-1])
        live.finished = time.perf_counter()
        tg.cancel_scope.cancel()
    for stage in stages:
        stage.set_state("done")
        if stage.io.inbox is not None:
            stage.io.inbox.close()
