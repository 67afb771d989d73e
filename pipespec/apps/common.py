"""What every command shares: how an error is shown (one line on stderr, the exit code from ``errors.exit_code``)
and how a chain is loaded for a person watching (our progress bars, and nobody else's)."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from ..errors import exit_code

if TYPE_CHECKING:
    from ..scheduler import Pipeline

__all__ = ["error", "report", "load_pipeline"]


def error(message: str) -> None:
    """One line on stderr, the way every pipespec error looks."""
    click.echo(f"pipespec: error: {message}", err=True)


def report(exc: BaseException) -> int:
    """Show ``exc`` as one line and return the exit code it ends the command with (``PIPESPEC_TRACEBACK=1``: the
    traceback too, for a developer hunting a crash)."""
    if os.environ.get("PIPESPEC_TRACEBACK") == "1":
        traceback.print_exception(exc)
    error(str(exc))
    return exit_code(exc)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws progress bars of its own while it loads (GGUF files, sharded checkpoints); ours already
    show each model, so theirs are off while the chain loads."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


async def load_pipeline(names: list[str], device: str | list[str], dtype: str, trust_remote_code: bool,
                        progress: bool, backend: Any = "thread", quantize: str | None = None,
                        split: str = "tensor") -> Pipeline:
    """Load the chain (its workers where ``backend`` says); with ``progress``, one Rich progress line per model on
    stderr."""
    from ..scheduler import Pipeline

    if not progress:
        return await Pipeline.load(names, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                   backend=backend, quantize=quantize, split=split)
    from .tui import loading_progress

    with _quiet_transformers(), loading_progress(names) as on_loaded:
        return await Pipeline.load(names, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                   on_loaded=on_loaded, backend=backend, quantize=quantize, split=split)
