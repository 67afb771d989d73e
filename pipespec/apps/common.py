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
    from ..scheduler.choices import ChoiceStore

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
                        split: str = "tensor", reprobe: bool = False) -> Pipeline:
    """Load the chain (its workers where ``backend`` says); with ``progress``, one Rich progress line per model on
    stderr. Mode auto's choices are remembered across commands (``scheduler.choices``); ``reprobe``: this one
    probes again (and remembers what it finds)."""
    from ..scheduler import Pipeline

    if not progress:
        pipe = await Pipeline.load(names, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                   backend=backend, quantize=quantize, split=split)
    else:
        from .tui import loading_progress

        with _quiet_transformers(), loading_progress(names) as on_loaded:
            pipe = await Pipeline.load(names, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                       on_loaded=on_loaded, backend=backend, quantize=quantize, split=split)
    pipe.choices = choice_store(pipe, dtype, quantize, split, backend, reprobe)
    return pipe


def choice_store(pipe: Pipeline, dtype: str, quantize: str | None, split: str, backend: Any,
                 reprobe: bool) -> ChoiceStore:
    """The store of mode auto's choices, scoped to what this command loaded where: the models as named, their
    devices and dtypes, quantization, the split, the backend, the GPUs' names, the versions of pipespec and torch."""
    import torch

    from .. import __version__
    from ..scheduler.choices import ChoiceStore

    gpus = sorted({m.device.split(":")[-1] for m in pipe.members if m.device.startswith("cuda")})
    scope = {"pipespec": __version__, "torch": torch.__version__, "models": pipe.names,
             "devices": [m.device for m in pipe.members], "dtypes": [m.info.dtype for m in pipe.members],
             "dtype": dtype, "quantize": quantize, "split": split, "backend": getattr(backend, "kind", str(backend)),
             "gpus": [torch.cuda.get_device_name(int(i)) for i in gpus if i.isdigit()]}
    return ChoiceStore.default(scope, reprobe=reprobe, again="--reprobe probes again")
