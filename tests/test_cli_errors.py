"""The command line's own error policy: click usage errors are one line with exit code 2; bare `pipespec` is help."""

from __future__ import annotations

import subprocess
import sys

import pytest


def pipespec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipespec", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--dtype", "int3"], "--dtype"),
    (["run", "-n", "abc"], "not a valid integer"),
    (["no-such-command"], "No such command"),
    (["run", "--no-such-option"], "No such option"),
    (["run", "--split", "diagonal"], "--split"),
    (["run", "-m", "tiny-draft,tiny-target", "--placement", "cpu,0+0", "-p", "x"], "names a GPU twice"),
    (["bench", "-m", "tiny-draft,tiny-target", "--placement", "cpu,0+x"], "GPU indices joined by '+'"),
])
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    proc = pipespec(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipespec: error:") and message in lines[0], proc.stderr


def test_bare_command_prints_help() -> None:
    proc = pipespec()
    assert proc.returncode == 0
    assert "Commands:" in proc.stdout and "run" in proc.stdout


def test_import_is_light() -> None:
    """`import pipespec` does not import torch until the API is used (Ctrl-C at start-up stays clean)."""
    code = ("import sys, pipespec, pipespec.cli; print('torch' in sys.modules); pipespec.Pipeline; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["False", "True"]
