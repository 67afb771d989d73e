"""The process backend: each model's worker lives in a spawned process of its own, served over a pipe.

Why: stages in one process share the GIL and one CUDA context; in processes of their own, their Python work runs in
parallel (and, with CUDA MPS, their kernels share the GPU). The worker is built in the child by the same factory as
in the thread backend (``workers.load_worker`` with a resolved ``loading.Source``, or ``adopt_worker`` with a model
object, which is pickled over).

The protocol (one duplex pipe per child): requests ``(call_id, method, args, kwargs, forget)``, replies
``(call_id, ok, value_or_error, busy_seconds)``; the child serves one call at a time, in order. A reader thread in
this process receives the replies and completes each call's ``concurrent.futures.Future`` (so ``submit`` serves
synchronous callers too); it also watches the child's sentinel, so a child that dies (killed, segfault) fails every
pending call with one ``PipelineError`` naming the stage and host at once, and it fails a call that outlives its
deadline.

Probability rows (rejection rule): the child keeps the rows it made and returns a ``SharedRows`` handle (on the CPU
the name of the shared-memory file the rows were moved into; on CUDA the IPC handle torch.multiprocessing makes),
never the rows' bytes. The next stage's child maps it once and keeps it until this process forgets the handle (its last reference
here is gone: rows live exactly as long as in the thread backend); ``forget`` carries those handles to every child.
Greedy and coupled sampling carry tokens only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from ..errors import PipelineClosed, PipelineError, first_line
from ..types import CALL_DEADLINE_S, START_DEADLINE_S
from ..workers.base import StepResult, Worker, WorkerInfo
from .host import WorkerHost, portable_error

__all__ = ["ProcessRunner", "SharedRows", "DEFAULT_DEADLINE", "START_DEADLINE"]

DEFAULT_DEADLINE = CALL_DEADLINE_S
START_DEADLINE = START_DEADLINE_S
_NOOP = "__noop__"
_START = "__start__"
_ids = itertools.count()


class SharedRows:
    """A handle on probability rows kept by the child that made them ([rows, vocab]); picklable, a few hundred
    bytes. ``payload`` says where the rows are, never what they are (a shared-memory file, a CUDA IPC handle)."""

    __slots__ = ("owner", "key", "payload", "rows", "__weakref__")

    def __init__(self, owner: str, key: int, payload: bytes, rows: int) -> None:
        self.owner, self.key, self.payload, self.rows = owner, key, payload, rows

    def __reduce__(self) -> tuple[Any, ...]:
        return SharedRows, (self.owner, self.key, self.payload, self.rows)

    def __repr__(self) -> str:
        return f"SharedRows({self.owner}#{self.key}, {self.rows} rows)"


class _ChildRows:
    """The child's side of ``SharedRows``: rows it published (kept alive) and rows it opened (cached)."""

    def __init__(self, owner: str) -> None:
        from multiprocessing.reduction import ForkingPickler

        # A shared-memory file name crosses as plain bytes; the default (file descriptors) would need the fd passed
        # along with every message.
        torch.multiprocessing.set_sharing_strategy("file_system")
        self._pickler = ForkingPickler
        self.owner = owner
        self.published: dict[int, torch.Tensor] = {}
        self.opened: dict[tuple[str, int], torch.Tensor] = {}
        self._keys = itertools.count()

    def publish(self, probs: torch.Tensor) -> SharedRows:
        key = next(self._keys)
        if probs.is_cuda:  # a CUDA IPC handle (torch.multiprocessing's); the tensor stays here until forgotten
            payload = bytes(self._pickler.dumps(probs))
        else:
            # The rows move into a shared-memory file (one copy, [m, vocab]); its name crosses. No extra reference
            # is taken for the reader (pickling would take one that a never-read proposal never gives back): this
            # child holds the file until the parent forgets the handle, which it does only after every call that
            # named it has replied, so a reader always finds it; the last of us to let go unlinks it.
            probs = probs.contiguous()
            manager, name, size = probs.untyped_storage()._share_filename_cpu_()
            payload = pickle.dumps((manager, name, size, probs.dtype, tuple(probs.shape)))
        self.published[key] = probs
        return SharedRows(self.owner, key, payload, int(probs.shape[0]))

    def resolve(self, handle: SharedRows) -> torch.Tensor:
        if handle.owner == self.owner:
            return self.published[handle.key]
        ident = (handle.owner, handle.key)
        tensor = self.opened.get(ident)
        if tensor is None:  # opened once per reader, closed when forgotten
            tensor = self.opened[ident] = _open(handle.payload)
        return tensor

    def forget(self, handles: list[tuple[str, int]]) -> None:
        for owner, key in handles:
            if owner == self.owner:
                self.published.pop(key, None)
            else:
                self.opened.pop((owner, key), None)


def _open(payload: bytes) -> torch.Tensor:
    """The tensor behind a ``SharedRows`` payload, mapped from shared memory (CPU) or opened by IPC (CUDA)."""
    data = pickle.loads(payload)
    if isinstance(data, torch.Tensor):
        return data
    manager, name, size, dtype, shape = data
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, name, size)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # [rows, vocab], contiguous


def _child(fd: int, owner: str, device: str, threads: int | None) -> None:
    """The child's entry point (see ``ProcessRunner.__init__``): serve the pipe on ``fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes us in order
    os.set_inheritable(fd, False)  # helpers the child starts (torch_shm_manager) must not hold the pipe open
    _serve(Connection(fd), owner, device, threads)
    # Nothing is left to save: skip the interpreter's teardown of torch and transformers (about a second per
    # child, which close() would wait for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(conn: Connection, owner: str, device: str, threads: int | None) -> None:
    """The child's loop: one call at a time until the pipe closes (the parent closed it or died)."""
    rows = _ChildRows(owner)
    host = WorkerHost(device, threads, rows)
    while True:
        try:
            call_id, method, args, kwargs, forget = conn.recv()
        except (EOFError, OSError):
            return
        rows.forget(forget)
        try:
            if method == _START:
                value, busy = host.start(args[0]), 0.0
            elif method == _NOOP:
                value, busy = None, 0.0
            else:
                value, busy = host.call(method, args, kwargs)
            reply = (call_id, True, value, busy)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller, the child serves on
            err = portable_error(exc)
            reply = (call_id, False, (pickle.dumps(err), f"{type(exc).__name__}: {first_line(exc, 300)}"), 0.0)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


@dataclass(slots=True)
class _Pending:
    future: Future[Any]
    method: str
    deadline: float  # time.monotonic() after which the call fails
    seconds: float  # the time it was given
    keep: Any = field(default=None)  # the call's arguments: SharedRows they name stay referenced until it replies


class ProcessRunner:
    """One spawned worker process for one model; implements ``runners.base.Runner``."""

    def __init__(self, name: str, device: torch.device, *, label: str | None = None, stage: int | None = None,
                 deadline: float = DEFAULT_DEADLINE, start_deadline: float = START_DEADLINE,
                 threads: int | None = None) -> None:
        self.name = name
        self.device = device
        self.label = label or name  # how errors name it: "stage 1 (middle)"
        self.stage = stage
        self.host = socket.gethostname()
        self.deadline = deadline
        self.start_deadline = start_deadline
        self.busy_seconds = 0.0
        self.owner = f"{os.getpid()}.{next(_ids)}"
        self._forget: collections.deque[tuple[str, int]] = collections.deque()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # guards _pending, _dead and the pipe's send end
        self._calls = itertools.count()
        self._dead: str | None = None  # why no call can be served any more
        # A fresh interpreter (spawn, never fork: a forked child would inherit CUDA state, threads and the event
        # loop). Not multiprocessing's spawn: that re-runs the parent's main script in the child, which breaks any
        # script without an ``if __name__ == "__main__"`` guard; the child needs only pipespec and sys.path.
        ours, theirs = socket.socketpair()
        bootstrap = (f"import sys; sys.path[:] = {sys.path!r}; from pipespec.runners.process import _child; "
                     f"_child({theirs.fileno()}, {self.owner!r}, {str(device)!r}, {threads or torch.get_num_threads()})")
        self.process = subprocess.Popen([sys.executable, "-c", bootstrap], pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL, env=child_environment())
        theirs.close()
        self._conn = Connection(ours.detach())
        # the child's death, as a file descriptor (Linux); without pidfd, the pipe's EOF says the same
        self._sentinel: int | None = os.pidfd_open(self.process.pid) if hasattr(os, "pidfd_open") else None
        _RUNNERS.add(self)
        self._reader = threading.Thread(target=self._read, name=f"pipespec-{name}-reader", daemon=True)
        self._reader.start()

    # -- the Runner protocol --------------------------------------------------------------------------------------

    async def start(self, factory: Callable[..., Worker], *args: Any, **kwargs: Any) -> WorkerInfo:
        payload = pickle.dumps((factory, args, kwargs))
        info: WorkerInfo = await asyncio.wrap_future(self._send(_START, (payload,), {}, self.start_deadline))
        return info

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.submit(method, *args, **kwargs))

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._send(method, args, kwargs, self.deadline)

    async def drain(self, timeout: float = 10.0) -> bool:
        if self._dead is not None:
            return True  # nothing runs any more
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._send(_NOOP, (), {}, timeout)), timeout)
        except (TimeoutError, PipelineError):
            return self._dead is not None  # died meanwhile: idle; else a call is still running
        return True

    def close(self, wait: bool = True) -> None:
        """Close the pipe (the child leaves its loop on EOF); wait a little for it, then terminate, then kill."""
        with self._lock:
            if self._dead is None:
                self._dead = "closed"
            self._conn.close()
        for stop in (None, self.process.terminate, self.process.kill):
            if stop is not None:
                stop()
            try:
                self.process.wait(5.0 if wait and stop is None else 1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(2.0)  # it leaves on the pipe's EOF or the child's exit; then the pidfd may close
        if self._sentinel is not None:
            with contextlib.suppress(OSError):
                os.close(self._sentinel)
            self._sentinel = None
        self._fail_all(PipelineClosed(f"{self.label}: its runner is closed"))
        _RUNNERS.discard(self)

    # -- the pipe -------------------------------------------------------------------------------------------------

    def _send(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float) -> Future[Any]:
        future: Future[Any] = Future()
        forget = []
        while self._forget:
            forget.append(self._forget.popleft())
        with self._lock:
            if self._dead is not None:
                future.set_exception(self._death_error() if self._dead != "closed"
                                     else PipelineClosed(f"{self.label}: its runner is closed"))
                return future
            call_id = next(self._calls)
            self._pending[call_id] = _Pending(future, method, time.monotonic() + deadline, deadline, (args, kwargs))
            try:
                self._conn.send((call_id, method, args, kwargs, forget))
            except (BrokenPipeError, OSError):
                pass  # the child is gone: the reader reports it for every pending call
            except BaseException:  # e.g. an argument that cannot be pickled: this call fails, the runner goes on
                del self._pending[call_id]
                raise
        return future

    def _read(self) -> None:
        """The reader thread: replies, the child's death and missed deadlines. It is the only thing that completes
        calls, so if it fails for any reason (a reply this process cannot unpickle, say) the runner is dead: the
        child is killed and every pending and later call fails, instead of waiting forever."""
        try:
            self._read_loop()
        except BaseException as exc:  # noqa: BLE001
            with self._lock:
                if self._dead is None:
                    self._dead = "died"
            with contextlib.suppress(OSError):
                self.process.kill()
            self._fail_all(PipelineError(f"{self.label} on {self.host}: its runner's reader failed: "
                                         f"{type(exc).__name__}: {first_line(exc)}", stage=self.stage))

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                if self._dead == "closed":
                    return
                first = min((p.deadline for p in self._pending.values()), default=None)
            timeout = None if first is None else max(0.0, first - time.monotonic())
            try:
                ready = wait(self._watched(), timeout=0.5 if timeout is None else min(timeout, 0.5))
            except (OSError, ValueError):  # the pipe was closed by close()
                return
            if self._conn in ready:
                try:
                    call_id, ok, value, busy = self._conn.recv()
                except (EOFError, OSError):
                    self._died()
                    return
                self._complete(call_id, ok, value, busy)
            elif ready:  # the child's pidfd: it exited
                self._died()
                return
            self._expire()

    def _complete(self, call_id: int, ok: bool, value: Any, busy: float) -> None:
        with self._lock:
            pending = self._pending.pop(call_id, None)
        if pending is None:
            return  # a call that already missed its deadline
        self.busy_seconds += busy
        if ok:
            if isinstance(value, StepResult) and isinstance(value.probs, SharedRows):
                weakref.finalize(value.probs, _forget_everywhere, value.probs.owner, value.probs.key)
            _settle(pending.future, value=value)
            return
        data, text = value
        try:
            err = pickle.loads(data)
        except Exception:  # noqa: BLE001 - a type this process cannot import: its name and message
            err = RuntimeError(text)
        _settle(pending.future, error=err)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [(i, p) for i, p in self._pending.items() if p.deadline <= now]
            for i, _ in late:
                del self._pending[i]
        for _, p in late:
            _settle(p.future, error=PipelineError(
                f"{self.label} on {self.host} missed its deadline: {p.method!r} ran past {p.seconds:g} s",
                stage=self.stage))

    def _watched(self) -> list[Any]:
        return [self._conn] if self._sentinel is None else [self._conn, self._sentinel]

    def _died(self) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = "died"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1.0)
        self._fail_all(self._death_error())

    def _death_error(self) -> PipelineError:
        code = self.process.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return PipelineError(f"{self.label} on {self.host}: its worker process died ({how})", stage=self.stage)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            _settle(p.future, error=err)

    # -- for tests and tools ----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid


_RUNNERS: weakref.WeakSet[ProcessRunner] = weakref.WeakSet()


def _settle(future: Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    """Complete a call's future unless its caller cancelled it (a cancelled await cancels the future; the call
    still ran in the child, in order)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def child_environment() -> dict[str, str]:
    """The child's environment: ours (CUDA_MPS_PIPE_DIRECTORY included, when ``runners.mps`` started a daemon)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the parent shows loading progress (one line per model); transformers' own bars and notices stay quiet
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _forget_everywhere(owner: str, key: int) -> None:
    """Rows this process no longer references: their producer may drop them and every consumer may close them."""
    for runner in list(_RUNNERS):
        runner._forget.append((owner, key))
