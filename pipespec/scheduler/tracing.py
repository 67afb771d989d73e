"""Tracing one generation (``Pipeline.generate(..., trace=...)``): wrap the chain's runners, give every stage its
track, probe the event loop, and after the generation collect the GPU spans the workers recorded (CUDA only).
The trace format and tracks: ``pipespec.tracing``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from ..runners.traced import TracedRunner
from ..stages import Stage
from ..tracing import LoopProbe, Tracer, gpu_tid
from .request import Member

__all__ = ["Recording", "TraceTo", "start_trace", "traced_members"]

TraceTo = str | os.PathLike[str] | Tracer | None  # a file to write, or a Tracer to add to


def traced_members(members: Sequence[Member], tracer: Tracer) -> tuple[Member, ...]:
    """The same members, each runner wrapped so every call is a span on its stage's track."""
    return tuple(Member(m.name, TracedRunner(m.runner, tracer.stage(i, m.name)), m.info)
                 for i, m in enumerate(members))


class Recording:
    """One traced generation in progress: the loop probe and which workers record GPU spans."""

    def __init__(self, tracer: Tracer, members: Sequence[Member], probe: LoopProbe, gpu: list[int]) -> None:
        self.tracer = tracer
        self.members = members
        self.probe = probe
        self.gpu = gpu

    async def finish(self) -> None:
        """Stop the loop probe and read the GPU spans back (after the runners drained: the generation is over)."""
        self.probe.uninstall()
        for i in self.gpu:
            m = self.members[i]
            runner = m.runner.inner if isinstance(m.runner, TracedRunner) else m.runner
            try:
                spans = await runner.call("gpu_spans")
                await runner.call("gpu_trace", False)
            except Exception as exc:  # noqa: BLE001 - a failed read must not hide the generation's own outcome
                self.tracer.meta[f"stage {i} GPU spans"] = f"not read: {type(exc).__name__}: {exc}"[:300]
                continue
            self.tracer.name_track(gpu_tid(i), f"stage {i} GPU")
            for start, end, tokens in spans:
                self.tracer.span(gpu_tid(i), "forward", start, end, {"tokens": tokens})


async def start_trace(tracer: Tracer, members: Sequence[Member], stages: Sequence[Stage]) -> Recording:
    """Give each stage its track (the one its traced runner records on), probe the loop, start GPU recording."""
    for stage, m in zip(stages, members):
        stage.trace = m.runner.trace if isinstance(m.runner, TracedRunner) else None
    gpu = []
    for i, m in enumerate(members):
        if m.device.startswith("cuda"):
            runner = m.runner.inner if isinstance(m.runner, TracedRunner) else m.runner
            if await runner.call("gpu_trace", True):
                gpu.append(i)
    probe = LoopProbe(tracer)
    probe.install(asyncio.get_running_loop())
    return Recording(tracer, members, probe, gpu)
