"""The backend choice (``runners.backend``), the MPS decision (``runners.mps``) and the process runner's pipe on a
worker that is only a few methods (``ProcessRunner``: errors, call ids, deadlines; test_backends.py runs real
chains through it). CPU only: starting MPS needs a GPU and is not tested here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from helpers import limit
from pipespec.errors import ConfigError, PipelineClosed, PipelineError
from pipespec.runners import Backend
from pipespec.runners.backend import as_backend, cpu_threads
from pipespec.runners.mps import mps_action, shared_gpus
from pipespec.runners.process import ProcessRunner
from pipespec.workers.base import WorkerInfo


def test_backend_choice() -> None:
    assert as_backend(None) == Backend() and as_backend("process").kind == "process"
    assert Backend().in_process and not Backend("ray").in_process
    with pytest.raises(ConfigError, match="unknown backend 'gpu'"):
        as_backend("gpu")
    with pytest.raises(ConfigError, match="positive"):
        Backend("process", deadline=0)
    from pipespec.placement import parse_node_placement

    with pytest.raises(ConfigError, match="needs the ray backend"):
        Backend("process", nodes=tuple(parse_node_placement("a:0", 1)))
    assert Backend("ray", nodes=tuple(parse_node_placement("a:0,b:cpu", 2))).devices(2) == ["cuda:0", "cpu"]


def test_worker_processes_split_the_intra_op_threads() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert cpu_threads([torch.device("cpu")] * 3) == 1
        assert cpu_threads([torch.device("cpu"), torch.device("cuda", 0)]) == 4
    finally:
        torch.set_num_threads(threads)


def test_mps_decision() -> None:
    shared = ["cuda:0", "cuda:0", "cuda:1"]
    assert shared_gpus(shared) == ["cuda:0"] and shared_gpus(["cuda", "cuda:0"]) == ["cuda:0"]
    tool = "/usr/bin/nvidia-cuda-mps-control"
    assert mps_action(shared, "process", {}, control=tool, daemon_running=False) == "start"
    assert mps_action(shared, "process", {}, control=tool, daemon_running=True) == "running"
    assert mps_action(shared, "process", {"PIPESPEC_MPS": "0"}, control=tool, daemon_running=False) == "hint"
    assert mps_action(shared, "process", {}, control=None, daemon_running=False) == "hint"
    assert mps_action(shared, "thread", {}, control=tool, daemon_running=False) == "none"  # one process: streams
    assert mps_action(["cuda:0", "cuda:1", "cpu", "cpu"], "process", {}, control=tool,
                      daemon_running=False) == "none"


class Toy:
    """A worker of a few methods (picklable by reference: the child imports this module from tests/)."""

    name = "toy"
    forwards = 0

    def describe(self) -> WorkerInfo:
        return WorkerInfo("toy", "cpu", 10, None, False)

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        if seed == -1:
            raise ValueError("a bad seed")
        if seed == -2:  # a hang, as far as a 0.5 s deadline can tell
            time.sleep(2.0)

    def release(self) -> None:
        return None

    def rollback(self, length: int) -> None:
        return None


def toy() -> Toy:
    return Toy()


@limit(60)
async def test_process_runner_serves_calls_and_returns_errors_and_deadlines() -> None:
    runner = ProcessRunner("0-toy", torch.device("cpu"), label="stage 0 (toy)", stage=0, deadline=0.5)
    try:
        assert (await runner.start(toy)).name == "toy"
        results = await asyncio.gather(*[runner.call("rollback", i) for i in range(50)])  # call ids keep order
        assert results == [None] * 50
        assert runner.submit("release").result(timeout=10) is None
        with pytest.raises(ValueError, match="a bad seed"):  # the worker's own error type and message
            await runner.call("reset", -1)
        with pytest.raises(ValueError, match="'forward' is not a worker call"):
            await runner.call("forward", [1], 0, 1)
        with pytest.raises(PipelineError, match=r"stage 0 \(toy\) on .* missed its deadline: 'reset' ran past 0.5 s"):
            await runner.call("reset", -2)
        assert await runner.drain(5.0)  # the late call finishes; its reply is dropped; the runner serves on
        assert await runner.call("rollback", 0) is None
    finally:
        runner.close()
    assert runner.process.poll() is not None
    with pytest.raises(PipelineClosed):
        await runner.call("rollback", 0)


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--backend", "process"], "plan measures the models in this process"),
    (["bench", "--backend", "process", "--methods", "hf,pipe"], "the HF baselines (hf) run"),
    (["run", "--placement", "a:0,b:0,c:0", "-p", "x"], "needs --backend ray"),
    (["run", "--backend", "ray", "--placement", "a:0,b:0", "-p", "x"], "2 entries for 3 models"),
])
def test_backend_usage_errors_are_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipespec", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipespec: error:") and message in lines[0], proc.stderr
