"""CUDA MPS for worker processes that share a GPU.

Without MPS, kernels of different processes on one GPU are time-sliced: one process's kernels run, then another's;
with MPS they run side by side, as the streams of one process do (the thread backend's case). So where the process
backend puts two or more stages on one GPU, pipespec starts an MPS control daemon of its own (a pipe directory it
owns, quit when this process exits) unless one is already running, the binary is missing, or ``PIPESPEC_MPS=0``;
then it prints a one-line hint instead. The decision (``mps_action``) is pure and tested on the CPU; starting the
daemon is not tested here (no GPU on the CI machine).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = ["MpsAction", "mps_action", "ensure_mps"]

MpsAction = Literal["none", "running", "start", "hint"]
_DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # where a system-wide daemon listens unless CUDA_MPS_PIPE_DIRECTORY says else


def shared_gpus(devices: Sequence[str]) -> list[str]:
    """CUDA devices that two or more stages use."""
    cuda = [d if d != "cuda" else "cuda:0" for d in devices if d.startswith("cuda")]
    return sorted({d for d in cuda if cuda.count(d) > 1})


def mps_action(devices: Sequence[str], backend: str, env: Mapping[str, str], *, control: str | None,
               daemon_running: bool) -> MpsAction:
    """What to do about MPS for a chain: nothing (no GPU shared by worker processes), nothing (a daemon already
    runs), start one, or print a hint (not allowed to start one, or no ``nvidia-cuda-mps-control``)."""
    if backend != "process" or not shared_gpus(devices):
        return "none"
    if daemon_running:
        return "running"
    if control is not None and env.get("PIPESPEC_MPS", "1") != "0":
        return "start"
    return "hint"


def _daemon_running(env: Mapping[str, str]) -> bool:
    return os.path.exists(os.path.join(env.get("CUDA_MPS_PIPE_DIRECTORY", _DEFAULT_PIPE_DIR), "control"))


def ensure_mps(devices: Sequence[str], backend: str) -> MpsAction:
    """Act on ``mps_action`` for this machine; call before the worker processes start (they inherit the env)."""
    control = shutil.which("nvidia-cuda-mps-control")
    action = mps_action(devices, backend, os.environ, control=control, daemon_running=_daemon_running(os.environ))
    if action == "start" and control is not None:
        pipe_dir = tempfile.mkdtemp(prefix="pipespec-mps-")
        env = {"CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": pipe_dir}
        done = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, timeout=30)
        if done.returncode == 0:
            os.environ.update(env)
            atexit.register(_quit, control, {**os.environ, **env}, pipe_dir)
            return action
        action = "hint"
    if action == "hint":
        gpus = ", ".join(shared_gpus(devices))
        print(f"pipespec: hint: stages share {gpus} in separate processes; start CUDA MPS "
              "(nvidia-cuda-mps-control -d) so their kernels overlap, or use --backend thread", file=sys.stderr)
    return action


def _quit(control: str, env: dict[str, str], pipe_dir: str) -> None:
    subprocess.run([control], input=b"quit\n", env=env, capture_output=True, timeout=30, check=False)
    shutil.rmtree(pipe_dir, ignore_errors=True)
