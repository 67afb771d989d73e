"""``pipespec run`` as a user runs it: model folders on disk, JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import noisy_copy, tiny_llama
from helpers import byte_tokenizer, hf_greedy, save_folder
from pipespec.cli import main


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    tok = byte_tokenizer(300)
    vocab = len(tok)
    target = tiny_llama(0, hidden=48, vocab=vocab)
    out = {
        "target": save_folder(target, tok, root / "target"),
        "middle": save_folder(noisy_copy(target, 0.3, 1), tok, root / "middle"),
        "draft": save_folder(noisy_copy(target, 0.6, 2), tok, root / "draft"),
        # narrower than the tokenizer: it cannot hold every id (wider would be padding, which chains)
        "other_vocab": save_folder(tiny_llama(5, vocab=vocab - 7), None, root / "other_vocab"),
    }
    other_tok = byte_tokenizer(300)
    other_tok.add_tokens(["zzz_extra"])
    other = tiny_llama(6, vocab=vocab)
    out["other_tokenizer"] = save_folder(other, other_tok, root / "other_tokenizer")
    empty = root / "empty"
    empty.mkdir()
    out["empty"] = str(empty)
    return out


def invoke(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("mode", ["pipe", "sd", "ar", "auto"])
def test_run_json_equals_target_alone(folders: dict[str, str], mode: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chain = ",".join([folders["draft"], folders["middle"], folders["target"]])
    code, out, err = invoke("run", "--models", chain, "--prompt", "def add(a, b):", "--max-new-tokens", "20",
                            "--mode", mode, "--device", "cpu", "--dtype", "float32", "--json")
    assert code == 0, err
    data = json.loads(out)
    tok = AutoTokenizer.from_pretrained(folders["target"])
    model = AutoModelForCausalLM.from_pretrained(folders["target"], dtype="float32")
    prompt_ids = tok("def add(a, b):")["input_ids"]
    want = hf_greedy(model, prompt_ids, 20)
    got = data["token_ids"]
    assert got == want[:len(got)]
    assert len(got) == 20 or got[-1] == tok.eos_token_id  # stopped by max_new_tokens or at the tokenizer's EOS
    assert data["stats"]["tokens"] == len(data["token_ids"]) <= 20
    if mode == "auto":  # the default: what it ran, and why
        assert data["stats"]["mode"] == data["stats"]["mode_chosen"] and data["stats"]["reason"], data["stats"]
    else:
        assert data["stats"]["mode"] == mode
    assert [s["model"] for s in data["stats"]["stages"]] == ["draft", "middle", "target"]
    assert data["text"] == tok.decode(data["token_ids"], skip_special_tokens=True)
    for stage in data["stats"]["stages"]:
        assert {"model", "device", "forwards", "proposed", "accepted", "rollbacks"} <= set(stage)


def test_run_streams_text_from_stdin(folders: dict[str, str]) -> None:
    code, out, err = invoke("run", "--models", f"{folders['draft']},{folders['target']}", "--max-new-tokens", "12",
                            "--device", "cpu", "--no-tui", input="for i in range(10):")
    assert code == 0, err
    assert out.endswith("\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--models", "no/such/folder/here"], "not found"),
    (["--models", "definitely-not-a-model"], "unknown model"),
    (["--models", "EMPTY"], "no config.json"),
    (["--models", "OTHER_VOCAB,TARGET"], "vocabulary"),
    (["--models", "OTHER_TOKENIZER,TARGET"], "tokenizer"),
    (["--models", "TARGET", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--models", "TARGET", "--max-new-tokens", "100000"], "context"),
    (["--models", "TARGET", "--temperature", "-1"], "temperature"),
    (["--models", "TARGET", "--top-p", "1.5"], "top_p"),
    (["--models", "TARGET", "--top-k", "-2"], "top_k"),
    (["--models", "TARGET", "--device", "tpu"], "device"),
    (["--models", "TARGET", "--device", "cuda:7"], "cuda"),
    (["--models", "TARGET", "--prompt", "   "], "empty"),
    (["--models", "a,,b"], "empty entry"),
    (["--models", "TARGET", "--prompt-file", "/no/such/file.txt"], "cannot read"),
])
def test_bad_input_gets_one_line_and_exit_2(folders: dict[str, str], args: list[str], message: str) -> None:
    names = {"TARGET": folders["target"], "OTHER_VOCAB": folders["other_vocab"], "EMPTY": folders["empty"],
             "OTHER_TOKENIZER": folders["other_tokenizer"]}
    args = [",".join(names.get(part, part) for part in a.split(",")) for a in args]
    if "--prompt" not in args and "--prompt-file" not in args:
        args += ["--prompt", "x = 1"]
    code, out, err = invoke("run", *args, "--no-tui")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pipespec: error:") and message in lines[0], lines[0]
    assert "Traceback" not in err


def test_missing_hub_model_fails_fast_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pipespec", "run", "--models", "68m", "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache" in proc.stderr and "local folder" in proc.stderr
    assert "Traceback" not in proc.stderr
