"""One-line errors and the exit-code policy: what every command and loader shows of an underlying exception."""

from __future__ import annotations

import pytest
import torch

from pipespec import loading
from pipespec.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ConfigError,
    ModelLoadError,
    PipelineError,
    exit_code,
    first_line,
)


def test_first_line_of_a_message() -> None:
    assert first_line(RuntimeError("  first\nsecond\n")) == "first"
    assert first_line(RuntimeError("")) == ""
    assert first_line(RuntimeError("\n\n")) == ""
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10


def test_exit_codes() -> None:
    assert exit_code(ConfigError("bad")) == EXIT_USAGE == 2
    assert exit_code(ModelLoadError("missing")) == EXIT_USAGE  # a load error is bad input, like any ConfigError
    assert exit_code(PipelineError("stage 1 failed")) == EXIT_FAILURE == 1
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130


class _Silent(Exception):
    def __str__(self) -> str:
        return ""


def test_an_exception_without_a_message_still_becomes_a_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    source = loading.resolve_source("tiny-draft")
    model = loading.load_model(source, torch.device("cpu"), torch.float32)

    def silent_to(*_args: object, **_kwargs: object) -> None:
        raise _Silent()

    # moving the weights fails with an empty message: once an IndexError (``splitlines()[0]`` of nothing)
    monkeypatch.setattr(type(model), "to", silent_to)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: model)
    with pytest.raises(ModelLoadError, match="could not move model 'tiny-draft' to cpu: _Silent"):
        loading.load_model(source, torch.device("cpu"), torch.float32)


def test_a_download_failure_without_a_message_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def fail(*_args: object, **kwargs: object) -> str:
        raise _Silent()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: True)
    source = loading.Source("someone/model", "hub", "someone/model", "model")
    with pytest.raises(ModelLoadError, match="could not download someone/model: _Silent"):
        loading._local_dir(source)  # noqa: SLF001
