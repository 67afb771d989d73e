"""Which backend serves a chain's workers, and one runner per stage for it.

- ``thread`` (the default): every worker in this process, on a fixed thread of its own (``runners.thread``).
- ``process``: every worker in a spawned process of its own on this machine (``runners.process``).
- ``ray``: every worker in a Ray actor, on the node its placement names (``runners.ray``).

``Backend`` is the one object ``Pipeline.load(backend=...)`` takes (a kind name is enough); the scheduler asks it
for runners and never looks at which kind they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..placement import NodeSlot
from ..types import BACKENDS, CALL_DEADLINE_S, BackendKind
from .base import Runner

__all__ = ["BACKENDS", "Backend", "BackendKind", "as_backend"]



@dataclass(frozen=True, slots=True)
class Backend:
    """A backend and its settings. ``deadline``: seconds one call may take before the generation fails (process,
    ray). ``ray_address``: None starts a local Ray, "auto" joins the cluster this machine is part of, or an
    address. ``nodes``: the Ray node slot of every stage (``placement.parse_node_placement``); empty: anywhere."""

    kind: BackendKind = "thread"
    deadline: float = CALL_DEADLINE_S
    ray_address: str | None = None
    nodes: tuple[NodeSlot, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ConfigError(f"unknown backend {self.kind!r}: use {', '.join(BACKENDS)}")
        if self.deadline <= 0:
            raise ConfigError(f"the call deadline must be positive, got {self.deadline}")
        if self.nodes and self.kind != "ray":
            raise ConfigError("node placement (NODE:GPU entries) needs the ray backend (--backend ray)")

    @property
    def in_process(self) -> bool:
        """Whether the workers live in this process (``Member.worker`` is then the worker itself)."""
        return self.kind == "thread"

    def devices(self, n_models: int) -> list[str] | None:
        """Ray with a node placement: the device each stage sees inside its actor; else None (the caller's)."""
        if not self.nodes:
            return None
        if len(self.nodes) != n_models:
            raise ConfigError(f"the node placement has {len(self.nodes)} entries for {n_models} models")
        return [slot.device for slot in self.nodes]

    def runners(self, names: Sequence[str], devices: Sequence[torch.device]) -> list[Runner]:
        """One runner per stage, not started (``Runner.start`` builds each worker)."""
        labels = [f"stage {i} ({name})" for i, name in enumerate(names)]
        if self.kind == "thread":
            from .thread import ThreadRunner

            return [ThreadRunner(f"{i}-{name}", devices[i]) for i, name in enumerate(names)]
        if self.kind == "process":
            from .mps import ensure_mps
            from .process import ProcessRunner

            ensure_mps([str(d) for d in devices], self.kind)  # before the children start: they inherit its env
            out: list[Runner] = []
            threads = cpu_threads(devices)
            try:
                for i, name in enumerate(names):
                    out.append(ProcessRunner(f"{i}-{name}", devices[i], label=labels[i], stage=i,
                                             deadline=self.deadline, threads=threads))
            except BaseException:
                for runner in out:
                    runner.close(wait=False)
                raise
            return out
        from .ray import ray_runners

        return ray_runners(names, devices, labels, nodes=self.nodes, deadline=self.deadline,
                           address=self.ray_address)


def cpu_threads(devices: Sequence[torch.device]) -> int:
    """Intra-op threads for each worker process: this process's share split between the stages on the CPU (one
    OpenMP pool per process; pools that together ask for more threads than cores spin against each other)."""
    on_cpu = sum(d.type == "cpu" for d in devices)
    return max(1, torch.get_num_threads() // max(on_cpu, 1))


def as_backend(backend: str | Backend | None) -> Backend:
    """``Pipeline.load``'s ``backend`` argument: a kind name or a ``Backend``."""
    if backend is None:
        return Backend()
    if isinstance(backend, Backend):
        return backend
    return Backend(kind=backend)  # type: ignore[arg-type]
