"""Runners: the one place that owns threads, processes and devices. ``base`` is the ``Runner`` protocol the stages
await; ``thread`` is the in-process backend (one fixed thread and CUDA stream per model), ``process`` a spawned
process per model, ``ray`` a Ray actor per model; ``backend`` chooses between them; ``host`` is what a worker's own
process runs; ``mps`` starts CUDA MPS for processes that share a GPU."""

from .backend import BACKENDS, Backend
from .base import Runner
from .thread import ThreadRunner

__all__ = ["BACKENDS", "Backend", "Runner", "ThreadRunner"]
