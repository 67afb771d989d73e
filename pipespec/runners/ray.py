"""The Ray backend: each model's worker lives in a Ray actor, on the node its placement names (``pip install
pipespec[ray]``).

The actor runs a ``WorkerHost`` (the same named calls as every backend); this process awaits the actor's object
refs straight from asyncio. Ray runs an actor's calls one at a time, in the order one caller submitted them, as the
``Runner`` protocol asks. A stage is pinned to a node by a custom resource the node was started with (``ray start
--resources='{"node2": 1}'``) and asks for its GPU share there (``placement.gpu_shares``).

Probability rows (rejection rule) go into Ray's object store: the producing actor ``ray.put``s them (a CPU copy:
another node cannot read this GPU) and returns the ref; the consuming actor gets them by ref, from shared memory on
the same node, over the network from another. Ray counts the refs: rows live as long as this process holds them.
A dead actor (its process killed, its node gone) fails the call with one ``PipelineError`` naming the stage and node.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ..errors import ConfigError, PipelineError
from ..placement import NodeSlot, gpu_shares
from ..types import START_DEADLINE_S
from ..workers.base import Worker, WorkerInfo
from .host import WorkerHost, portable_error

__all__ = ["RayRows", "RayRunner", "check_nodes", "ray_runners", "ensure_ray"]


class RayRows:
    """A handle on probability rows in Ray's object store ([rows, vocab])."""

    __slots__ = ("ref", "rows")

    def __init__(self, ref: Any, rows: int) -> None:
        self.ref, self.rows = ref, rows

    def __reduce__(self) -> tuple[Any, ...]:
        return RayRows, (self.ref, self.rows)


class _ObjectStoreRows:
    def publish(self, probs: torch.Tensor) -> RayRows:
        import ray

        return RayRows(ray.put(probs.cpu()), int(probs.shape[0]))

    def resolve(self, handle: RayRows) -> torch.Tensor:
        import ray

        return ray.get(handle.ref)


class StageActor:
    """What runs inside the actor: a ``WorkerHost``; errors come back as the exception itself when it pickles."""

    def __init__(self, device: str, threads: int | None) -> None:
        self.host = WorkerHost(device, threads, _ObjectStoreRows())

    def where(self) -> tuple[str, str, int]:
        import ray

        return socket.gethostname(), ray.get_runtime_context().get_node_id(), os.getpid()

    def start(self, payload: bytes) -> WorkerInfo:
        try:
            return self.host.start(payload)
        except BaseException as exc:
            raise portable_error(exc) from None

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, float]:
        try:
            return self.host.call(method, args, kwargs)
        except BaseException as exc:
            raise portable_error(exc) from None

    def noop(self) -> None:
        return None


def ensure_ray(address: str | None) -> None:
    """Connect to Ray once per process: ``None`` starts a local Ray, "auto" joins this machine's cluster."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray backend needs Ray: pip install 'pipespec[ray]'") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="warning", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"could not reach a Ray cluster at {address or 'a new local Ray'}: {exc}"[:300]) from None


def check_nodes(nodes: Sequence[NodeSlot], alive: Sequence[dict[str, float]]) -> None:
    """Refuse a node placement that no live node can serve (``alive``: each live node's resources): an unknown node
    name, or more GPUs than the node has. Ray would otherwise wait for such a node to join, without a word."""
    for slot in nodes:
        hosts = [r for r in alive if r.get(slot.node, 0) > 0]
        if not hosts:
            names = sorted({k for r in alive for k in r if ":" not in k and k not in _RAY_BUILTIN})
            raise ConfigError(f"--placement: no live Ray node has the resource {slot.node!r} (start that node with "
                              f"ray start --resources='{{\"{slot.node}\": 1}}'); custom resources now: "
                              f"{', '.join(names) or 'none'}")
        if slot.gpus and max(r.get("GPU", 0) for r in hosts) < len(slot.gpus):
            raise ConfigError(f"--placement: node {slot.node!r} has "
                              f"{max(r.get('GPU', 0) for r in hosts):g} GPU(s) for a stage on {len(slot.gpus)}")


_RAY_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def ray_runners(names: Sequence[str], devices: Sequence[torch.device], labels: Sequence[str], *,
                nodes: Sequence[NodeSlot], deadline: float, address: str | None) -> list[RayRunner]:
    """One actor per stage, placed by ``nodes`` (anywhere when it is empty)."""
    import ray

    ensure_ray(address)
    if any(len(slot.gpus) > 1 for slot in nodes):
        raise ConfigError("--placement: a stage on several GPUs is not supported (each worker uses one device)")
    if nodes:  # fail now, not at the start deadline, where no live node can take a stage
        check_nodes(nodes, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    shares = gpu_shares(nodes) if nodes else [1.0 if d.type == "cuda" else 0.0 for d in devices]
    actor_class = ray.remote(StageActor)
    runners = []
    for i, name in enumerate(names):
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": shares[i],
                                   "max_restarts": 0, "max_concurrency": 1}
        if nodes:
            options["resources"] = {nodes[i].node: 0.001}  # pins the stage to that node
        actor = actor_class.options(**options).remote(str(devices[i]), torch.get_num_threads())
        runners.append(RayRunner(f"{i}-{name}", devices[i], actor, label=labels[i], stage=i,
                                 deadline=deadline, node=nodes[i].node if nodes else None))
    return runners


class RayRunner:
    """One Ray actor for one model; implements ``runners.base.Runner``."""

    def __init__(self, name: str, device: torch.device, actor: Any, *, label: str, stage: int | None,
                 deadline: float, node: str | None = None, start_deadline: float = START_DEADLINE_S) -> None:
        self.name = name
        self.device = device
        self.actor = actor
        self.label = label
        self.stage = stage
        self.node = node or "?"  # the placement's name until the actor says where it runs
        self.pid: int | None = None
        self.deadline = deadline
        self.start_deadline = start_deadline
        self.busy_seconds = 0.0

    # -- the Runner protocol --------------------------------------------------------------------------------------

    async def start(self, factory: Callable[..., Worker], *args: Any, **kwargs: Any) -> WorkerInfo:
        host, node_id, self.pid = await self._await(self.actor.where.remote(), "where", self.start_deadline)
        self.node = f"{self.node if self.node != '?' else host} ({host}, node {node_id[:8]})"
        payload = pickle.dumps((factory, args, kwargs))
        info: WorkerInfo = await self._await(self.actor.start.remote(payload), "start", self.start_deadline)
        return info

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        value, busy = await self._await(self.actor.call.remote(method, args, kwargs), method, self.deadline)
        self.busy_seconds += busy
        return value

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        """The call's result (not the busy time) as a concurrent future; errors as ``call`` would raise them."""
        out: Future[Any] = Future()
        inner = self.actor.call.remote(method, args, kwargs).future()

        def done(f: Future[Any]) -> None:
            try:
                value, busy = f.result()
            except BaseException as exc:  # noqa: BLE001
                out.set_exception(self._error(exc))
                return
            self.busy_seconds += busy
            out.set_result(value)

        inner.add_done_callback(done)
        return out

    async def drain(self, timeout: float = 10.0) -> bool:
        try:
            await self._await(self.actor.noop.remote(), "noop", timeout)
        except PipelineError as exc:
            return "deadline" not in str(exc)  # a dead actor runs nothing any more
        return True

    def close(self, wait: bool = True) -> None:
        import ray

        if ray.is_initialized():
            ray.kill(self.actor, no_restart=True)

    # -- errors ---------------------------------------------------------------------------------------------------

    async def _await(self, ref: Any, method: str, deadline: float) -> Any:
        started = time.monotonic()
        try:
            return await asyncio.wait_for(ref, deadline)
        except TimeoutError:
            raise PipelineError(f"{self.label} on {self.node} missed its deadline: {method!r} ran past "
                                f"{deadline:g} s ({time.monotonic() - started:.1f} s)", stage=self.stage) from None
        except Exception as exc:  # noqa: BLE001 - Ray's wrappers, turned into the worker's error or a PipelineError
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> BaseException:
        from ray import exceptions as rx

        if isinstance(exc, rx.RayTaskError):  # the worker's own error, raised in the actor
            cause = getattr(exc, "cause", None)
            return cause if isinstance(cause, BaseException) else RuntimeError(str(exc).splitlines()[-1])
        if isinstance(exc, (rx.RayActorError, rx.ActorDiedError, rx.NodeDiedError, rx.ObjectLostError)):
            return PipelineError(f"{self.label} on {self.node}: its Ray actor died ({type(exc).__name__})",
                                 stage=self.stage)
        return exc
