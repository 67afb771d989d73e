"""A real pseudo-terminal for end-to-end tests of ``pipespec run`` and ``pipespec chat``."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


class Terminal:
    """``python -m pipespec ARGS`` in a pseudo-terminal of ``rows`` x ``cols``, as the controlling terminal of
    its own session (so Ctrl-C typed into it interrupts it); everything it draws is kept in ``raw``."""

    def __init__(self, args: list[str], tmp: Path, rows: int = 48, cols: int = 160) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
        env.update(TERM="xterm-256color", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", PIPESPEC_HISTORY=str(tmp / "history"))
        # SIGINT back to its default first: a test run from a background job of a non-interactive shell inherits it
        # ignored, and Ctrl-C typed into the terminal would then do nothing
        become_session = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.login_tty(0); "
                          "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
        self.proc = subprocess.Popen([sys.executable, "-c", become_session, "-m", "pipespec", *args],
                                     stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.fd = master
        self.raw = b""

    @property
    def text(self) -> str:
        """What was written, without colours, cursor movements and carriage returns."""
        return _ANSI.sub("", self.raw.decode("utf-8", errors="replace")).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError:  # EIO: the program has exited and closed the terminal
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60, start: int = 0) -> re.Match[str]:
        """Read until ``pattern`` (a regex) matches the text from ``start`` on; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.text, start)
            if found:
                return found
            if time.monotonic() > deadline or not self._read(min(0.1, max(0.0, deadline - time.monotonic()))):
                raise AssertionError(f"{pattern!r} not shown within {timeout}s; the screen so far:\n{self.text}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0.05):
            pass
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


needs_pty = pytest.mark.skipif(not hasattr(os, "login_tty"), reason="needs a POSIX pseudo-terminal")
