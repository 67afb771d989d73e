"""Issue 13 on a GPU: every bench method in one run, in either order, repeatedly; and the minimal condition that
crashed (HF's compiled static-cache generate and pipespec's CUDA graphs in one process) in a child process, so a
crash there fails one test instead of killing pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _bench(*args: str, dtype: str = "float32", timeout: float = 150.0,
           env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    """``python -m pipespec bench ... --json`` in a child process: (exit status, report or None, stderr tail).
    float32 by default, so that every method must agree exactly (bf16 near-ties would be noise here)."""
    cmd = [sys.executable, "-m", "pipespec", "bench", "--device", "cuda", "--dtype", dtype, "--n", "2",
           "--max-new-tokens", "32", "--prompts", "code", "--json", *args]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    return proc.returncode, report, "\n".join(proc.stderr.strip().splitlines()[-15:])


@pytest.mark.parametrize("order", ["hf,hf_assisted,ar,sd,pipe", "ar,sd,pipe,hf_assisted,hf"])
def test_all_five_methods_in_one_run_any_order(order: str) -> None:
    """Every method in one process (``--hf-isolation thread``; the CUDA default is a child process for HF since the
    default prompt set faulted at 456791d): nothing crashes on the code prompts, everything agrees, twice over."""
    code, report, err = _bench("--methods", order, "--repeats", "2", "--hf-isolation", "thread")
    assert code == 0 and report is not None, err
    assert list(report["methods"]) == order.split(",")
    assert report["settings"]["hf_isolation"] == "thread"
    assert report["methods"]["hf"]["configuration"] == "static cache, compiled"
    for name, m in report["methods"].items():
        assert "error" not in m, (name, m)
        assert len(m["passes_ms_per_token"]) == 2 and m["unstable"] == [], name
    assert report["outputs_identical"] is True, {k: m.get("differences") for k, m in report["methods"].items()}


def test_minimal_reproduction_hf_compiled_beside_our_graphs_in_one_process() -> None:
    """The smallest combination that crashed at 275cc74 (issue 13): hf (compiled, static cache) and ar (our CUDA
    graphs) on one thread each, interleaved prompt by prompt, three passes; in a child process, so a crash fails
    this test instead of taking pytest down. It passed on two H200s at bd4eaf2 (then marked xfail; it XPASSed)."""
    code, report, err = _bench("--methods", "hf,ar", "--hf-isolation", "thread", "--repeats", "3", dtype="bfloat16")
    assert code == 0 and report is not None, err
    assert all("error" not in m for m in report["methods"].values()), report["methods"]
