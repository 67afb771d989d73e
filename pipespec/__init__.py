"""pipespec: hierarchical, asynchronous speculative decoding over a chain of causal language models.

The public API is what ``__all__`` lists; every other module is internal. Names are imported on first use, so
``import pipespec`` (and the ``pipespec`` command's start, which Ctrl-C may interrupt) stays light until torch is
needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ModelLoadError, PipelineClosed, PipelineError, PipespecError

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "Generation",
    "GenerationStats",
    "Snapshot",
    "SamplingParams",
    "PipespecError",
    "ConfigError",
    "ModelLoadError",
    "PipelineError",
    "PipelineClosed",
    "__version__",
]

_LAZY = {
    "Pipeline": ("scheduler", "Pipeline"),
    "Generation": ("types", "Generation"),
    "GenerationStats": ("types", "GenerationStats"),
    "Snapshot": ("types", "Snapshot"),
    "SamplingParams": ("verify", "SamplingParams"),
}

if TYPE_CHECKING:
    from .scheduler import Pipeline
    from .types import Generation, GenerationStats, Snapshot
    from .verify import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipespec' has no attribute {name!r}")
