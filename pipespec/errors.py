"""The exceptions users of pipespec see. Every message is one line that names the problem."""

from __future__ import annotations

__all__ = ["PipespecError", "ConfigError", "ModelLoadError", "PipelineError", "PipelineClosed", "EXIT_OK",
           "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "exit_code", "first_error", "first_line"]


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


# The exit-code policy of every command (cli.py and the apps import these; nothing else writes the numbers).
EXIT_OK = 0
EXIT_FAILURE = 1  # a generation or a benchmark method failed
EXIT_USAGE = 2  # bad input: a ConfigError, a click usage error
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after printing what was generated so far


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters ('' when it has none): what a one-line
    error shows of an underlying exception."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def exit_code(exc: BaseException) -> int:
    """The exit code a command ends with after ``exc``: the one policy every command follows."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_FAILURE


def first_error(exc: BaseException) -> BaseException:
    """The error to show for a failed task group: the first non-cancellation exception inside it."""
    import asyncio

    import anyio

    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_error(inner)
            if not isinstance(found, (asyncio.CancelledError, anyio.get_cancelled_exc_class())):
                return found
        return exc.exceptions[0]
    return exc
