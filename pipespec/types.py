"""Messages between stages, per-stage statistics and the snapshots the live view renders.

Everything here is a small frozen dataclass: no tensors are read, no threads are touched.

Terms (stage, proposal, verify, accepted, correction, bonus, verdict, rollback, epoch, positions): the glossary in
docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["pipe", "sd", "ar"]
MODES: tuple[Mode, ...] = ("pipe", "sd", "ar")  # the generation modes, in the order the CLI lists them
RequestMode = Literal["auto", "pipe", "sd", "ar"]
# what a caller may ask for: a mode, or "auto" (the pipeline measures the modes on its placement and runs the fastest)
REQUEST_MODES: tuple[RequestMode, ...] = ("auto", "pipe", "sd", "ar")
BackendKind = Literal["thread", "process", "ray"]
BACKENDS: tuple[BackendKind, ...] = ("thread", "process", "ray")  # where workers live (runners.backend)
CALL_DEADLINE_S = 120.0  # seconds one call into an out-of-process worker may take (a forward, a reset that grows a
# static cache) before its stage fails; --call-deadline
START_DEADLINE_S = 1800.0  # seconds an out-of-process worker may take to load its model
Acceptance = Literal["coupled", "rejection"]
StageState = Literal["idle", "drafting", "verifying", "rolling back", "waiting", "bypassed", "done"]


@dataclass(frozen=True, slots=True)
class Proposal:
    """Stage i's sequence from ``start`` on is ``tokens`` (it replaces whatever the receiver had past ``start``).

    ``probs`` is only set under the rejection rule: a handle to the proposing stage's own probability rows
    for these positions (``[len(tokens), vocab]``, on the proposer's device); the receiver never reads it on the
    event loop, it hands it to its model worker.
    """

    epoch: int
    start: int
    tokens: tuple[int, ...]
    probs: Any = None
    origin: int | None = None  # the stage whose model chose these tokens (None: the sender; a bypassed one relays)


@dataclass(frozen=True, slots=True)
class RowRefs:
    """Probability rows a bypassed stage relays with its predecessor's tokens: one (tensor, row) per token, handles
    only (the tensors stay where the proposer made them)."""

    rows: tuple[tuple[Any, int], ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Stage i+1 -> stage i. ``verified`` is the length of stage i+1's verified sequence (prompt included).

    When ``rollback`` is set, stage i must adopt it as its own sequence (it is stage i+1's verified sequence at the
    time of sending) and tag its later proposals with ``epoch``.
    """

    epoch: int
    verified: int
    rollback: tuple[int, ...] | None = None
    ahead: int | None = None  # adaptive runtime: how far stage i should draft past ``verified`` (None: its default)
    # adaptive runtime, with a rollback: stage i+1 waits for this many of stage i's tokens before its next forward
    # (``scheduler.policy.best_block``), so a draft makes them in its first call after adopting the rollback
    block: int | None = None

    def merge(self, newer: Verdict) -> Verdict:
        """Combine two verdicts not yet read (the mailbox keeps one): a pending rollback survives a later plain
        verdict of the same epoch (with its block); a newer rollback replaces an older one."""
        if newer.rollback is None and self.rollback is not None and newer.epoch <= self.epoch:
            return Verdict(self.epoch, max(self.verified, newer.verified), self.rollback, newer.ahead, self.block)
        return newer


# The per-stage counters every report sums over generations (``StageStats`` fields; ``to_dict`` carries each).
STAGE_COUNTERS = ("forwards", "proposed", "accepted", "verifications", "drafted", "rollbacks", "rollbacks_sent",
                  "bypasses", "busy_seconds")


@dataclass(slots=True)
class StageStats:
    """Counters of one stage for one generation. Mutated only by the stage's own coroutine."""

    model: str
    device: str
    forwards: int = 0  # forward passes of this stage's model (prefill included)
    proposed: int = 0  # predecessor tokens this stage checked (verifying stages only)
    accepted: int = 0  # of those, the ones it kept
    verifications: int = 0  # forward passes that checked at least one proposed token
    drafted: int = 0  # tokens this stage chose itself (drafts, corrections, bonus tokens)
    rollbacks: int = 0  # times this stage was rolled back by its successor
    rollbacks_sent: int = 0  # times this stage rolled its predecessor back
    bypasses: int = 0  # times the adaptive runtime took this stage out of the chain (it relays or pauses meanwhile)
    busy_seconds: float = 0.0  # wall time inside forward passes
    state: StageState = "idle"
    recent: list[tuple[int, int]] = field(default_factory=list)  # (proposed, accepted) of the last verifications

    def record_verification(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if proposed:
            self.verifications += 1
            self.recent.append((proposed, accepted))
            del self.recent[:-32]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "forwards": self.forwards,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "verifications": self.verifications,
            "acceptance": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "accepted_per_verification": round(self.accepted / self.verifications, 3) if self.verifications else None,
            "drafted": self.drafted,
            "rollbacks": self.rollbacks,
            "rollbacks_sent": self.rollbacks_sent,
            "bypasses": self.bypasses,
            "busy_seconds": round(self.busy_seconds, 4),
        }


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """What the live view shows of one stage at one instant."""

    index: int
    model: str
    device: str
    state: StageState
    queue_depth: int  # proposals waiting in this stage's inbound channel
    in_flight: int  # proposed tokens beyond this stage's verified prefix, not yet checked
    forwards: int
    proposed: int
    accepted: int
    recent_proposed: int
    recent_accepted: int
    verifications: int
    rollbacks: int
    busy_seconds: float

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def recent_acceptance(self) -> float | None:
        return self.recent_accepted / self.recent_proposed if self.recent_proposed else None

    @property
    def accepted_per_verification(self) -> float | None:
        return self.accepted / self.verifications if self.verifications else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable picture of a running generation, pulled by the live view."""

    mode: Mode
    stages: tuple[StageSnapshot, ...]
    committed: int  # generated tokens committed by the target
    elapsed: float  # seconds since the generation started
    text: str  # generated text so far
    done: bool = False
    note: str = ""  # what runs before the generation starts (mode auto's probes), for the live view

    @property
    def tokens_per_second(self) -> float:
        return self.committed / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class GenerationStats:
    tokens: int
    seconds: float
    mode: Mode
    stages: tuple[dict[str, Any], ...]
    prompt_tokens: int = 0
    stop_reason: str = "length"
    mode_chosen: Mode | None = None  # set when the caller asked for mode "auto": the mode it ran (== ``mode``)
    reason: str | None = None  # ... and why (the probes' tokens/s on this placement)
    # tokens/s between the first commit and the last but one (scheduler.output.steady_rate): the decode rate
    # without the start and the cut-off last round; None for a generation of fewer than three commits
    steady_tokens_per_second: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "stop_reason": self.stop_reason,
            "stages": list(self.stages),
        }
        if self.steady_tokens_per_second is not None:
            out["steady_tokens_per_second"] = round(self.steady_tokens_per_second, 3)
        if self.mode_chosen is not None:
            out["mode_chosen"] = self.mode_chosen
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one generation: the generated text and token ids (prompt excluded) and its statistics."""

    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats
