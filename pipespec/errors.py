"""The exceptions users of pipespec see. Every message is one line that names the problem."""

from __future__ import annotations

__all__ = ["PipespecError", "ConfigError", "ModelLoadError", "PipelineError", "PipelineClosed"]


class PipespecError(Exception):
    """Base class of every error pipespec raises on purpose."""


class ConfigError(PipespecError, ValueError):
    """Bad input: an unknown model, an impossible option, a prompt that does not fit. The CLI exits with code 2."""


class ModelLoadError(ConfigError):
    """A model or tokenizer could not be loaded (missing folder, unreadable weights, hub unreachable...)."""


class PipelineError(PipespecError):
    """A stage failed during a generation; ``stage`` names it. The pipeline stays usable afterwards."""

    def __init__(self, message: str, stage: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class PipelineClosed(PipespecError):
    """The pipeline was closed; it serves no more generations."""
