"""The alias table: short names for the chains people run (hub ids), listed by ``pipespec models``, failing fast and
in one line where the hub cannot be reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipespec import loading
from pipespec.cli import main
from pipespec.errors import ModelLoadError

CHAINS = {  # one tokenizer per family, smallest first
    "llama3": ("llama3-1b", "llama3-8b", "llama3-70b"),
    "qwen2.5": ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-72b"),
    "qwen3": ("qwen3-0.6b", "qwen3-8b", "qwen3-32b"),
    "mistral": ("mistral-7b",),
}


def test_family_aliases_are_hub_ids_of_their_family() -> None:
    owners = {"llama3": "meta-llama/Llama-3.", "qwen2.5": "Qwen/Qwen2.5-", "qwen3": "Qwen/Qwen3-",
              "mistral": "mistralai/Mistral-7B"}
    for family, names in CHAINS.items():
        for name in names:
            source = loading.resolve_source(name)
            assert source.kind == "hub" and source.name == name, name
            assert source.location.startswith(owners[family]), (name, source.location)
            size = name.rsplit("-", 1)[1].upper()  # "0.5b" -> "0.5B": the id names the same size
            assert f"-{size}" in source.location, (name, source.location)


def test_models_command_lists_the_aliases() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for names in CHAINS.values():
        for name in names:
            assert rows[name]["kind"] == "alias" and rows[name]["source"] == loading.ALIASES[name]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen2.5-7b", "mistral-7b"])
def test_alias_fails_fast_offline(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError) as info:
        loading._local_dir(loading.resolve_source(name))
    message = str(info.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message
    assert loading.ALIASES[name] in message
