"""The bundled model family loads offline, shares one tokenizer and produces code; the prompt sets load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pipespec.prompts import PROMPT_SETS, load_prompts  # noqa: E402

FAMILY = Path(__file__).resolve().parents[1] / "pipespec" / "assets" / "family"
NAMES = ("draft", "middle", "target")
SNIPPET = (
    "class Foo(Base):\n"
    "    def bar(self, x: int = 3) -> str:\n"
    "\tif x  >= 2:  # trailing spaces   \n"
    "            return f\"{x!r}\\n\"\n"
    "\n\n"
    "    # ünïcödé ✓ and 'quotes'\n"
)


@pytest.fixture(scope="module")
def tokenizers():
    transformers = pytest.importorskip("transformers")
    return {n: transformers.AutoTokenizer.from_pretrained(str(FAMILY / n)) for n in NAMES}


@pytest.fixture(scope="module")
def models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return {
        n: transformers.AutoModelForCausalLM.from_pretrained(str(FAMILY / n), dtype=torch.float32).eval()
        for n in NAMES
    }


def test_asset_folders_are_complete_and_small():
    total = 0
    for n in NAMES:
        files = {p.name for p in (FAMILY / n).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= files
        total += sum(p.stat().st_size for p in (FAMILY / n).iterdir())
        cfg = json.loads((FAMILY / n / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
        assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    assert total < 30e6
    metrics = json.loads((FAMILY / "metrics.json").read_text())
    assert metrics["speculative"]["middle->target"]["mean_accepted"] > 0


def test_models_load_offline_and_share_one_vocabulary(tokenizers, models):
    vocabs = {n: tokenizers[n].get_vocab() for n in NAMES}
    assert vocabs["draft"] == vocabs["middle"] == vocabs["target"]
    sizes = {n: models[n].config.vocab_size for n in NAMES}
    assert len(set(sizes.values())) == 1 and sizes["target"] == len(tokenizers["target"])
    params = [sum(p.numel() for p in models[n].parameters()) for n in NAMES]
    assert params == sorted(params) and params[0] < params[-1]  # smallest first
    tok = tokenizers["target"]
    assert tok.eos_token is not None and tok.eos_token_id == models["target"].config.eos_token_id


def test_tokenizer_round_trips_python_code(tokenizers):
    for n in NAMES:
        tok = tokenizers[n]
        ids = tok(SNIPPET, add_special_tokens=False).input_ids
        assert len(ids) < len(SNIPPET)  # BPE merges something
        assert tok.decode(ids) == SNIPPET
        assert tok.decode(tok(SNIPPET).input_ids, skip_special_tokens=True) == SNIPPET


def test_target_continues_fibonacci(tokenizers, models):
    torch = pytest.importorskip("torch")
    tok, model = tokenizers["target"], models["target"]
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip() != ""
    assert "\n" in text  # a function body starts on a new line


def test_load_prompts_by_name():
    code = load_prompts("code")
    assert len(code) == 10 and all(p.startswith("def ") for p in code)
    assert load_prompts("text") == list(PROMPT_SETS["text"])
    assert load_prompts("code") is not load_prompts("code")  # callers may mutate their copy


def test_load_prompts_from_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\nstill first\n\n\nsecond prompt\n")
    assert load_prompts(str(txt)) == ["first prompt\nstill first", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "def f(x):\n"}) + "\n\n" + json.dumps({"prompt": "b", "id": 2}) + "\n")
    assert load_prompts(jl) == ["def f(x):\n", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt field"}) + "\n")
    with pytest.raises(ValueError):
        load_prompts(str(bad))


def test_load_prompts_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown prompt set") as err:
        load_prompts("no-such-set")
    assert "\n" not in str(err.value)


def test_builtin_chain_equals_its_target_and_is_accepted() -> None:
    """The shipped 3-model family: every mode commits the target's own greedy tokens, and the target keeps at least a
    third of what the middle proposes (lock-step mode, whose acceptance does not depend on timing)."""
    import asyncio

    import pipespec
    from pipespec.prompts import load_prompts

    async def main() -> None:
        async with pipespec.Pipeline.load(["tiny-draft", "tiny-middle", "tiny-target"], device="cpu") as pipe:
            accepted = proposed = 0
            for prompt in load_prompts("text")[:3]:
                alone = await pipe.generate(prompt, max_new_tokens=48, mode="ar")
                for mode in ("pipe", "sd"):
                    g = await pipe.generate(prompt, max_new_tokens=48, mode=mode)
                    assert g.token_ids == alone.token_ids, (mode, prompt)
                    if mode == "sd":
                        accepted += g.stats.stages[-1]["accepted"]
                        proposed += g.stats.stages[-1]["proposed"]
            assert proposed > 0 and accepted / proposed >= 1 / 3, (accepted, proposed)

    asyncio.run(asyncio.wait_for(main(), 120))
