"""The processes of a tensor-parallel stage: rank 0 is the stage's worker (wherever its runner puts it: a thread or a
process of its own), ranks 1..n-1 are follower processes started for it, one per further GPU.

``load_tp_worker`` is the factory a runner builds rank 0 with. It starts the followers (fresh interpreters, as
``runners.process`` starts its children), joins them in a process group (NCCL on CUDA, gloo on the CPU; a
``FileStore`` in a temporary folder is the rendezvous), builds its own shard and returns a
``workers.tensor_parallel.TPStaticWorker`` whose every forward first sends a small header (which op, the tokens,
the position) down a pipe to each follower. A follower builds its shard from the same source and replays the
headers in order, so its forwards, graph captures and all-reduces pair up with rank 0's.

Lifetimes: a follower exits on its pipe's EOF (rank 0's worker was dropped, or its process ended) and is killed
with its parent (``PR_SET_PDEATHSIG``: the parent *thread*, the runner's). A follower that dies makes rank 0's next
call fail with one line; a forward already inside an all-reduce waits for the group's timeout (``TIMEOUT``).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..errors import PipelineError

__all__ = ["TIMEOUT", "build_synthetic_tp", "load_tp_stage", "load_tp_worker"]

TIMEOUT = timedelta(seconds=120)  # a collective (or the rendezvous) waiting longer than this fails


def _group(store_path: str, rank: int, world: int, device: torch.device) -> Any:
    """This rank's process group, built directly (not the process's default group: a process may host several)."""
    import torch.distributed as dist

    store = dist.FileStore(store_path, world)
    store.set_timeout(TIMEOUT)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout=TIMEOUT)


def _build(spec: Any, group: Any, device: torch.device, dtype: torch.dtype, capacity: int) -> Any:
    """This rank's shard: ``spec`` is a model folder (safetensors) or ``("random", dims)``, ``dims`` a shape tuple
    (hidden, layers, heads, kv heads, ffn, vocab; the values of ``synthetic.SHAPES``, not a name: a follower's
    process has not registered a test's tiny shape)."""
    from ..workers.static import PAD
    from ..workers.tensor_parallel import tp_from_folder, tp_random

    if isinstance(spec, tuple) and spec[0] == "random":
        static = tp_random(spec[1], group, device, dtype, capacity + PAD)
    else:
        static = tp_from_folder(str(spec), group, device, dtype, capacity + PAD)
    # one collective now, on every rank: NCCL builds its communicator at the first one (seconds), which would
    # otherwise land in the first generation's first forward
    static._all_reduce(torch.zeros(1, device=device, dtype=dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return static


def _worker(static: Any, name: str, device: torch.device, mirror: Any, capacity: int,
            make: Callable[..., Any] | None = None) -> Any:
    from ..workers.tensor_parallel import TPStaticWorker, model_facts

    return (make or TPStaticWorker)(static, model_facts(static.config, static, static.generation_config), name,
                                    device, mirror, capacity)


def load_tp_worker(spec: Any, name: str, devices: Sequence[str], dtype: torch.dtype, capacity: int = 2048,
                   make_worker: Callable[..., Any] | None = None) -> Any:
    """Rank 0's worker of a stage split over ``devices`` (one per rank), its followers started and joined.
    ``make_worker``: rank 0's worker class (or factory) instead of ``TPStaticWorker``, called as ``TPStaticWorker``
    is, ``(static, facts, name, device, mirror, capacity)``: a ``TPStaticWorker`` subclass that adds to what rank 0
    does (the synthetic worker's oracle) without changing what it mirrors. The followers stay ``TPStaticWorker``s
    (it never leaves this process: it need not pickle)."""
    world = len(devices)
    device = torch.device(devices[0])
    folder = tempfile.mkdtemp(prefix="pipespec-tp-")
    store_path = os.path.join(folder, "store")
    followers: list[tuple[subprocess.Popen[bytes], Connection]] = []
    try:
        for rank in range(1, world):
            ours, theirs = socket.socketpair()
            payload = pickle.dumps((spec, str(devices[rank]), dtype, capacity, name, torch.get_num_threads()))
            bootstrap = (f"import sys; sys.path[:] = {sys.path!r}; from pipespec.runners.tensor_parallel import "
                         f"_follower; _follower({theirs.fileno()}, {rank}, {world}, {store_path!r}, {payload!r})")
            proc = subprocess.Popen([sys.executable, "-c", bootstrap], pass_fds=[theirs.fileno()],
                                    stdin=subprocess.DEVNULL)
            theirs.close()
            followers.append((proc, Connection(ours.detach())))
        group = _group(store_path, 0, world, device)
        static = _build(spec, group, device, dtype, capacity)
    except BaseException:
        _stop(followers, folder, None)
        raise

    def mirror(header: tuple[Any, ...]) -> None:
        for proc, conn in followers:
            if proc.poll() is not None:
                raise PipelineError(f"{name}: tensor-parallel follower (pid {proc.pid}) ended with {proc.returncode}")
            conn.send(header)

    try:
        worker = _worker(static, name, device, mirror, capacity, make_worker)
    except BaseException:
        _stop(followers, folder, group)
        raise
    worker.follower_pids = [proc.pid for proc, _ in followers]  # diagnostics and tests
    weakref.finalize(worker, _stop, followers, folder, group)
    return worker


def load_tp_stage(source: Any, name: str, devices: Sequence[str], dtype: Any, trust_remote_code: bool,
                  fast: bool | str, capacity: int = 2048) -> Any:
    """The worker factory of a chain's tensor-parallel stage (``--split tensor``): a resolved ``loading.Source``
    whose safetensors folder splits over ``devices``; what does not split is one ``ConfigError`` line that points
    at ``--split layers``. Runs where rank 0 lives (its runner's thread or process)."""
    from transformers import AutoConfig

    from ..errors import ConfigError
    from ..loading import _local_dir, resolve_dtype
    from ..workers.tensor_parallel import split_refusal

    hint = f"; place {name} on one GPU or split it with --split layers"
    if fast is False:
        raise ConfigError(f"{name}: the tensor-parallel split runs the static forward, not HF's{hint}")
    if source.kind == "gguf":
        raise ConfigError(f"{name}: a GGUF file cannot be split tensor-parallel (it reads a safetensors folder){hint}")
    folder = _local_dir(source)
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{name}: the tensor-parallel split reads safetensors weights and {folder} has none{hint}")
    # the shards follow the family's own layout (split_refusal checks it is one): a folder's own code never runs
    reason = split_refusal(AutoConfig.from_pretrained(str(folder)), len(devices))
    if reason is not None:
        raise ConfigError(f"{name}: {reason}{hint}")
    dtype = resolve_dtype(dtype, torch.device(devices[0]))
    return load_tp_worker(str(folder), name, [str(d) for d in devices], dtype, capacity)


def build_synthetic_tp(shape: str, devices: Sequence[str], oracle: Any, stage: int, *,
                       dims: tuple[int, int, int, int, int, int] | None = None, dtype: torch.dtype | None = None,
                       capacity: int = 2048) -> Any:
    """Rank 0's ``workers.synthetic.SyntheticTPWorker`` of a random-weight ``shape`` (``synthetic.SHAPES``) split
    tensor-parallel over ``devices`` (one rank each: NCCL on CUDA, gloo on the CPU), its followers started: the
    factory a runner is handed, as ``synthetic.build_synthetic`` (top-level, plain arguments). The followers are
    handed the shape's dims, not its name (``dims`` registers a tiny shape in this process only). Rank 0 lives where
    the runner calls this; dropping it (or ending the runner's thread) ends the followers. Weights: ``tp_random``'s,
    not ``random_llama``'s (same shapes and scale, other values: the oracle decides the tokens either way)."""
    from ..workers.synthetic import SHAPES, SyntheticTPWorker

    if dims is not None:
        SHAPES[shape] = dims
    first = torch.device(devices[0])
    dtype = dtype or (torch.bfloat16 if first.type == "cuda" else torch.float32)

    def make(static: Any, facts: Any, name: str, device: torch.device, mirror: Any, cap: int) -> Any:
        return SyntheticTPWorker(static, facts, name, device, mirror, cap, oracle=oracle, stage=stage)

    return load_tp_worker(("random", SHAPES[shape]), shape, [str(d) for d in devices], dtype, capacity,
                          make_worker=make)


def _stop(followers: list[tuple[subprocess.Popen[bytes], Connection]], folder: str, group: Any) -> None:
    """EOF to every follower (each then exits without tearing its group down), then SIGKILL for a follower still
    there after a few seconds. Rank 0's own group is kept (``_keep``)."""
    _keep(group)
    for _, conn in followers:
        conn.close()
    for proc, _ in followers:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    shutil.rmtree(folder, ignore_errors=True)


def _keep(group: Any) -> None:
    """Never destroy an NCCL ``group`` in this process: its communicator is left for the process's exit to reclaim.
    ProcessGroupNCCL's destructor aborts the communicator and that waits for every rank: left to the interpreter's
    exit after the followers had gone (``os._exit``), it hung rank 0's process (two H200s: the generation done, the
    process never ending); an explicit ``abort()`` of both sides at close, tried next, ended the process with
    "terminate called without an active exception" (abort outlasting its bounded wait). A gloo group (the CPU)
    tears down cleanly and is left to the garbage collector. Cost: a closed CUDA pipeline keeps its communicator's
    buffers until the process ends."""
    if group is not None and type(group).__name__ == "ProcessGroupNCCL":
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))


def _follower(fd: int, rank: int, world: int, store_path: str, payload: bytes) -> None:
    """A follower's entry point: join the group, build the shard, replay rank 0's headers until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0's runner handles Ctrl-C and closes us
    try:  # die with the thread that started us (Linux); elsewhere the pipe's EOF says the same
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.set_inheritable(fd, False)
    conn = Connection(fd)
    spec, device_name, dtype, capacity, name, threads = pickle.loads(payload)
    device = torch.device(device_name)
    if device.type == "cpu":
        # rank 0's CPU threads, no more: every all-reduce waits for both ranks, and a follower whose thread pool
        # oversubscribes the cores (torch's default: all of them) makes each one wait for the scheduler
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # a stream of its own: CUDA graphs cannot be captured on the default stream (rank 0 runs on its runner's)
        torch.cuda.set_stream(torch.cuda.Stream(device))
    torch.set_grad_enabled(False)
    group = _group(store_path, rank, world, device)
    with torch.inference_mode():
        worker = _worker(_build(spec, group, device, dtype, capacity), f"{name}#{rank}", device, None, capacity)
        while True:
            try:
                header = conn.recv()
            except (EOFError, OSError):
                break
            worker.replay(header)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown of torch (and of a process group nobody else will use)
