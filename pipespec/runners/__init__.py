"""Runners: the one place that owns threads, processes and devices. ``base`` is the ``Runner`` protocol the stages
await; ``thread`` is the in-process backend (one fixed thread and CUDA stream per model)."""

from .base import Runner
from .thread import ThreadRunner

__all__ = ["Runner", "ThreadRunner"]
