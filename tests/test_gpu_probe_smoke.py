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
    assert [c["chain"] for c in report["chains"]] == ["2 stages, cpu", "3 stages, cpu"]
    for chain in report["chains"]:
        entry = chain["alphas"][0]
        methods = [r["method"] for r in entry["rows"]]
        assert methods[0] == "ar" and "sd:16" in methods and "pipe:draft_batch=1" in methods and "auto" in methods
        assert entry["all_identical"] is True
        assert json.loads((tmp_path / entry["trace"]).read_text())["traceEvents"]
    assert "| method |" in (tmp_path / "probe.md").read_text()
