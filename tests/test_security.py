"""Model files are data, never code.

A planted pickle whose unpickling would run code (its ``__reduce__`` writes a marker file) must be refused with one
clear line, without the marker ever appearing; safetensors wins when both formats are present; a plain pickle of
tensors still loads (through torch's weights-only unpickler); a folder that ships Python code is refused unless the
user passes ``--trust-remote-code``.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import pipespec
from conftest import tiny_llama
from helpers import byte_tokenizer, hf_greedy, limit, save_folder
from pipespec.cli import main
from pipespec.errors import ModelLoadError

torch.set_num_threads(1)


class Plant:
    """Unpickling this calls ``exec`` on code that writes ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def tok() -> object:
    return byte_tokenizer(300)


@pytest.fixture(scope="module")
def model(tok: object) -> torch.nn.Module:
    return tiny_llama(0, hidden=48, vocab=len(tok), dtype=torch.float32)  # type: ignore[arg-type]


def folder_without_weights(model: torch.nn.Module, tok: object, path: Path) -> Path:
    save_folder(model, tok, path)  # type: ignore[arg-type]
    (path / "model.safetensors").unlink()
    return path


async def load_and_close(folder: Path) -> None:
    async with pipespec.Pipeline.load([str(folder)], device="cpu"):
        pass


def run_cli(folder: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["run", "--models", str(folder), "--prompt", "x = 1", "-n", "4", "--no-tui",
                                       "--device", "cpu", *extra])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("form", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_is_refused_and_never_run(form: str, model: torch.nn.Module, tok: object,
                                                   tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = folder_without_weights(model, tok, tmp_path / "evil")
    weights = folder / "pytorch_model.bin"
    poisoned = {**model.state_dict(), "extra": Plant(marker)}
    if form == "zip":
        torch.save(poisoned, weights)
    elif form == "legacy":
        torch.save(poisoned, weights, _use_new_zipfile_serialization=False)
    else:
        weights.write_bytes(pickle.dumps(Plant(marker), protocol=2))

    code, out, err = run_cli(folder)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (f"pipespec: error: refusing to load {weights}: it is not a plain weights file "
                        "(unpickling it would call exec; only tensors are allowed)")
    assert not marker.exists(), "the planted code ran"

    with pytest.raises(ModelLoadError) as info:  # the API refuses with the same message
        asyncio.run(load_and_close(folder))
    assert f"pipespec: error: {info.value}" == lines[0]
    assert not marker.exists(), "the planted code ran"

    # the plant is real: an unsafe load runs it (proves the test would catch a loader that unpickles freely)
    if form != "raw-pickle":
        torch.load(weights, weights_only=False)
        assert marker.exists()


def test_safetensors_preferred_over_a_poisoned_pickle(model: torch.nn.Module, tok: object, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = Path(save_folder(model, tok, tmp_path / "both"))  # type: ignore[arg-type]
    torch.save({**model.state_dict(), "extra": Plant(marker)}, folder / "pytorch_model.bin")
    code, out, err = run_cli(folder)
    assert code == 0, err
    assert not marker.exists()


@limit(60)
async def test_plain_tensor_pickle_still_loads(model: torch.nn.Module, tok: object, tmp_path: Path) -> None:
    """Refusing code must not refuse data: a .bin of tensors (zip or legacy format) loads and generates."""
    for legacy in (False, True):
        folder = folder_without_weights(model, tok, tmp_path / f"bin-{legacy}")
        torch.save(model.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        async with pipespec.Pipeline.load([str(folder)], device="cpu", dtype="float32") as pipe:
            g = await pipe.generate([5, 6, 7], max_new_tokens=8)
        assert list(g.token_ids) == hf_greedy(model, [5, 6, 7], 8)  # type: ignore[arg-type]


def _remote_code_folder(path: Path) -> Path:
    """A model folder whose config asks for its own Python modules; importing either writes the marker."""
    path.mkdir()
    (path / "config.json").write_text(
        '{"model_type": "pipespec-evil", "architectures": ["EvilForCausalLM"], "auto_map": '
        '{"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}')
    code = ('import os\nopen(os.environ["PIPESPEC_TEST_MARKER"], "w").write("ran")\n'
            "from transformers import PretrainedConfig\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'pipespec-evil'\n")
    (path / "configuration_evil.py").write_text(code)
    (path / "modeling_evil.py").write_text(code)
    return path


def test_remote_code_needs_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "RAN"
    monkeypatch.setenv("PIPESPEC_TEST_MARKER", str(marker))
    folder = _remote_code_folder(tmp_path / "custom")
    code, out, err = run_cli(folder)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "custom code" in lines[0] and "--trust-remote-code" in lines[0]
    assert not marker.exists(), "remote code ran without --trust-remote-code"

    # with the flag the folder's code does run (in a subprocess: transformers copies it into HF_HOME's module cache)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PIPESPEC_TEST_MARKER": str(marker)}
    subprocess.run([sys.executable, "-m", "pipespec", "run", "--models", str(folder), "--prompt", "x", "-n", "2",
                    "--no-tui", "--device", "cpu", "--trust-remote-code"], env=env, capture_output=True, timeout=120)
    assert marker.exists(), "--trust-remote-code did not reach the loader"
