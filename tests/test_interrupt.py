"""Ctrl-C at every stage of ``pipespec run`` and ``pipespec chat``: exit code 130, one line on stderr, no traceback.

A real SIGINT, through the process's own handler, at a chosen moment (``interrupt_driver.py``): while the CLI's
imports run (start-up), while the models load, and during a ``--json`` generation; and Ctrl-C typed into a real
terminal while the live view draws. ``test_cancellation.py`` covers Ctrl-C on streamed text (``--no-tui``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from terminal import Terminal, needs_pty

DRIVER = str(Path(__file__).with_name("interrupt_driver.py"))
RUN = ["run", "--prompt", "def f(x):", "-n", "2000", "--device", "cpu"]


def interrupted(trigger: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, DRIVER, trigger, *args], capture_output=True, text=True, timeout=180,
                          env=env)


def assert_one_line_130(proc: subprocess.CompletedProcess[str], line: str = "pipespec: interrupted") -> None:
    # a KeyboardInterrupt that escapes shows as returncode -2 (killed by SIGINT) and a traceback on stderr
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [line], proc.stderr


@pytest.mark.parametrize("args", [RUN + ["--no-tui"], RUN + ["--json"], ["chat", "--device", "cpu"]],
                         ids=["run", "run-json", "chat"])
def test_ctrl_c_at_start_up(args: list[str]) -> None:
    """While ``pipespec.cli`` is still importing click: before the CLI's own error policy exists."""
    proc = interrupted("import:click", args)
    assert_one_line_130(proc)
    assert proc.stdout == ""


def test_ctrl_c_while_loading() -> None:
    """While the weights load (the first safetensors import): the text so far is empty, a newline is printed."""
    proc = interrupted("import:safetensors", RUN + ["--no-tui"])
    assert_one_line_130(proc)
    assert proc.stdout == "\n"


def test_ctrl_c_while_loading_with_json_prints_an_empty_result() -> None:
    proc = interrupted("import:safetensors", RUN + ["--json"])
    assert_one_line_130(proc)
    result = json.loads(proc.stdout)
    assert result == {"text": "", "token_ids": [], "stats": {"tokens": 0, "stop_reason": "interrupted"}}


def test_chat_ctrl_c_while_loading() -> None:
    proc = interrupted("import:safetensors", ["chat", "--device", "cpu"])
    assert_one_line_130(proc, "pipespec: error: interrupted while loading")


def test_ctrl_c_during_json_generation_prints_what_was_generated() -> None:
    """--json prints nothing until the end; on Ctrl-C it prints the tokens committed so far, as one JSON object."""
    proc = interrupted("tokens:12", RUN + ["--json"])
    assert_one_line_130(proc)
    result = json.loads(proc.stdout)
    assert result["stats"] == {"tokens": len(result["token_ids"]), "stop_reason": "interrupted"}
    assert 12 <= len(result["token_ids"]) < 2000 and result["text"]


@needs_pty
def test_ctrl_c_in_the_live_view(tmp_path: Path) -> None:
    """Ctrl-C typed into a real terminal while the live view draws: the text so far, then one line, exit 130."""
    term = Terminal(RUN, tmp_path)
    try:
        term.expect(r"committed [1-9]\d* tokens", timeout=120)  # the live view is up and text is coming
        term.type("\x03")
        code = term.wait(30)
    finally:
        term.close()
    assert code == 130, term.text
    assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text, term.text
    lines = [line for line in term.text.splitlines() if line.strip()]
    assert lines[-1] == "pipespec: interrupted", lines[-3:]
    assert re.search(r"\S", lines[-2])  # the generated text, printed after the view is gone
