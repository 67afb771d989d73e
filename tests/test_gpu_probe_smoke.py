"""scripts/gpu_pipe_probe.py, the one-call GPU measurement of issue 14, runs end to end on the CPU (tiny shapes):
the lead's device time must not be spent finding a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_pipe_probe_smoke(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_pipe_probe.py"), str(tmp_path), "--smoke",
                           "--alphas", "0.9", "--repeats", "1", "--tokens", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    assert [c["chain"] for c in report["chains"]] == ["tensor-parallel target: cpu; cpu+cpu", "2 stages, cpu",
                                                      "3 stages, cpu", "int8 target, cpu"]
    assert report["chains"][0]["devices"] == ["cpu", "cpu+cpu"]  # the target split over two gloo ranks
    assert report["chains"][3]["models"][-1] == "tiny-t:int8"  # built layer by layer, weights in 8 bits
    for chain in report["chains"]:
        entry = chain["alphas"][0]
        methods = [r["method"] for r in entry["rows"]]
        assert methods[0] == "ar" and "sd:16" in methods and "pipe:draft_batch=1" in methods and "auto" in methods
        assert entry["all_identical"] is True
        assert json.loads((tmp_path / entry["trace"]).read_text())["traceEvents"]
    assert "| method |" in (tmp_path / "probe.md").read_text()


def test_gpu_pipe_probe_smoke_process_backend(tmp_path: Path) -> None:
    """``--backends``: one run per backend in a process of its own, merged side by side; the process backend builds
    its workers in worker processes and reaches them by named calls only, a tensor-parallel stage's rank 0 included
    (its process starts the follower). (``--backends thread,process`` would add the thread run above, ~10 s more on
    two shared cores.)"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_pipe_probe.py"), str(tmp_path), "--smoke",
                           "--backends", "process", "--chains", "2 stages,tensor-parallel", "--methods", "sd:4,pipe",
                           "--alphas", "0.9", "--repeats", "1", "--tokens", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "probe.json").read_text())
    assert [r["backend"] for r in report["runs"]] == ["process"]
    for run in report["runs"]:
        assert not run["errors"], run["errors"]
        assert run["parent_cuda_initialized"] is False
        # both chains ran, the tensor-parallel one with rank 0 in its worker process (which started the follower)
        for chain in run["chains"]:
            entry = chain["alphas"][0]
            assert [r["method"] for r in entry["rows"]] == ["ar", "sd:4", "pipe"] and entry["all_identical"] is True
            assert all(ms > 0 for pair in chain["standalone_ms"] for ms in pair)
    assert report["runs"][0]["mps"]["action"] == "none"  # on the CPU: nothing to share
    text = (tmp_path / "probe.md").read_text()
    assert "| method | process tok/s [min-max] |" in text and "## gpu_pipe_probe, process backend" in text
