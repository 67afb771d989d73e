"""A validated generation request and the chain members it runs on."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from ..runners.base import Runner
from ..types import Mode, RequestMode
from ..verify import SamplingParams
from ..workers.base import WorkerInfo


@dataclass(frozen=True, slots=True)
class Member:
    """One model of the chain: its runner (which serves its worker's calls) and what the worker said of itself."""

    name: str
    runner: Runner
    info: WorkerInfo

    @property
    def device(self) -> str:
        return str(self.runner.device)

    @property
    def worker(self) -> Any:
        """The worker object itself, where it lives in this process (the thread backend); for measuring and tests."""
        return getattr(self.runner, "worker", None)


@dataclass(frozen=True, slots=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    mode: RequestMode  # "auto" is resolved by the Pipeline before the generation runs
    params: SamplingParams
    stop: tuple[str, ...] = ()
    verify_cap: int = 64  # pipe: most proposals checked per forward pass
    max_ahead: int = 64  # pipe: most tokens a stage may run past its successor
    lookahead: int = 8  # sd: tokens per lock-step round (drafts + the target's own token)
    lookahead_given: bool = True  # auto: False where the caller left lookahead unset, so the probes may tune it
    draft_batch: int = 0  # pipe: drafts per call into the draft model; 0: adaptive (stages.draft.DraftPace)
    adaptive: bool = True  # pipe: adapt verify caps and run-ahead limits online

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens
