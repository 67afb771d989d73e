"""Shared fixtures: tiny random-weight LLaMA models built from a config (no downloads, no files).

Equality with the target decoding alone is checked in float64, where different forward shapes (one token at a time
versus a verified window) cannot flip an argmax through rounding.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# mode auto's remembered choices (``scheduler.choices``): one fresh folder for the session, never the developer's own,
# inherited by the commands the tests start
os.environ["PIPESPEC_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="pipespec-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import byte_tokenizer, save_folder

# Several stage threads share 2 cores here; one intra-op thread each avoids oversubscription (and is faster for
# models this small).
torch.set_num_threads(1)

VOCAB = 96


def tiny_llama(seed: int, *, hidden: int = 32, layers: int = 2, vocab: int = VOCAB, dtype: torch.dtype = torch.float64,
               scale: float = 1.0) -> LlamaForCausalLM:
    """A random LLaMA; ``scale`` multiplies the output layer so logits are peaky (fewer near-ties)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.2, eos_token_id=None, bos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int) -> LlamaForCausalLM:
    """The same model with Gaussian noise added to every weight: drafts that agree with it partially."""
    torch.manual_seed(seed)
    copy = LlamaForCausalLM(model.config).to(model.dtype).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    copy.generation_config.eos_token_id = None
    copy.generation_config.pad_token_id = None
    return copy


@pytest.fixture(scope="session")
def target() -> LlamaForCausalLM:
    return tiny_llama(0, hidden=48, layers=2)


@pytest.fixture(scope="session")
def folder_chain(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three model folders sharing a byte-level tokenizer: draft, middle, target."""
    root = tmp_path_factory.mktemp("tui_models")
    tok = byte_tokenizer(300)
    target = tiny_llama(0, hidden=48, vocab=len(tok))
    return [save_folder(noisy_copy(target, 0.6, 2), tok, root / "draft"),
            save_folder(noisy_copy(target, 0.3, 1), tok, root / "middle"),
            save_folder(target, tok, root / "target")]


@pytest.fixture
def patient_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A verifier waits up to 50 ms more for a block of its draft's (``verifier.BLOCK_SLACK``): for tests that count
    what the scheduling decides (forwards that verify a block, not decode alone) rather than how promptly the host
    runs it. On a loaded 2-core CI host a draft thread woken for its block waited for a core past the bounded wait
    (3 of 22 target forwards decoded alone, where a GPU host measured none)."""
    from pipespec.stages import verifier

    monkeypatch.setattr(verifier, "BLOCK_SLACK", 0.05)


@pytest.fixture(autouse=True)
def _gpu_state_reset(request: pytest.FixtureRequest):
    """After a gpu-marked test: wait for the GPU, drop torch.compile / CUDA-graph-tree state and free cached memory,
    so that one GPU test's compiled functions, graph pools and streams cannot reach the next (they all run in one
    pytest process: ``pytest -m gpu tests/``)."""
    yield
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        return
    import gc

    torch.cuda.synchronize()
    torch._dynamo.reset()  # also resets inductor's CUDA-graph trees
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
