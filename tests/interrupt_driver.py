"""Run ``pipespec ARGS`` in this process and send it a real SIGINT at a chosen point (for test_interrupt.py).

Usage: ``python interrupt_driver.py TRIGGER ARGS...`` where TRIGGER is

- ``import:MODULE``: SIGINT the moment MODULE is first imported (``click``: before the CLI's ``main`` runs, the
  start-up window; ``safetensors``: while the models load);
- ``tokens:N``: SIGINT once the running generation has committed N tokens (for ``--json``, which prints nothing
  until the end, so the test cannot watch stdout).

The signal goes through the process's own handler, exactly as a Ctrl-C typed in a terminal does; only the moment
is chosen, so the test does not depend on how fast a loaded machine imports or loads.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from typing import Any


def interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class _OnImport:
    """A meta-path finder that finds nothing and, the first time ``name`` is looked up, interrupts the process."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == self.name:
            sys.meta_path.remove(self)
            interrupt()
        return None


def _on_tokens(n: int) -> None:
    from pipespec.scheduler import pipeline

    original = pipeline.Pipeline.make_request

    def make_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        def watch() -> None:
            while True:
                live = self._live  # noqa: SLF001 - a test probe
                if live is not None and len(live.output.tokens) >= n:
                    interrupt()
                    return
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()
        return original(self, *args, **kwargs)

    pipeline.Pipeline.make_request = make_request  # type: ignore[method-assign]


def main() -> None:
    # Ctrl-C as a terminal's foreground job has it: a test launched from a background job of a non-interactive shell
    # inherits SIGINT ignored, and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    trigger, args = sys.argv[1], sys.argv[2:]
    kind, _, value = trigger.partition(":")
    if kind == "import":
        sys.meta_path.insert(0, _OnImport(value))
    elif kind == "tokens":
        _on_tokens(int(value))
    else:
        raise SystemExit(f"unknown trigger {trigger!r}")
    sys.argv = ["pipespec", *args]
    runpy.run_module("pipespec", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
