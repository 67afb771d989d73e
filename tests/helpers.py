"""Test helpers: time limits for async tests, a slow-model fake, tiny model folders with a tokenizer."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import LlamaForCausalLM

import pipespec

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def sigint_default() -> None:
    """``preexec_fn`` of a command a test will SIGINT: Ctrl-C as a terminal's foreground job has it. A test run
    from a background job of a non-interactive shell inherits SIGINT ignored, and the signal would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def limit(seconds: float) -> Callable[[F], F]:
    """Fail an async test that runs longer than ``seconds`` (a hang becomes a failure, not a stuck CI)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


class SlowLlama(LlamaForCausalLM):
    """A real LLaMA whose every forward pass also takes ``delay`` seconds: makes a target slower than its drafts,
    as on real hardware, without making the test models big. Sleeping releases the GIL, like a GPU kernel."""

    delay = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().forward(*args, **kwargs)
        if self.delay:
            time.sleep(self.delay)
        return out


SlowLlama.forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)  # type: ignore[attr-defined]


def slow(model: LlamaForCausalLM, delay: float) -> SlowLlama:
    copy = SlowLlama(model.config).to(model.dtype).eval()
    copy.load_state_dict(model.state_dict())
    copy.delay = delay
    copy.generation_config.eos_token_id = model.generation_config.eos_token_id
    copy.generation_config.pad_token_id = None
    return copy


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The target decoding alone, by HF transformers: the reference every mode must reproduce."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=0,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def grow_or_diverge(rng: Any, seq: list[int], longest_growth: int, vocab: int = 96) -> list[int]:
    """One random step of a decoding with rollbacks: diverge at a random point (40 %: a rollback plus new tokens), or
    grow by up to ``longest_growth`` tokens."""
    if rng.random() < 0.4 and len(seq) > 3:
        cut = rng.randrange(2, len(seq))
        return seq[:cut] + [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
    return seq + [rng.randrange(vocab) for _ in range(rng.randrange(1, longest_growth + 1))]


def byte_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with ``vocab_size`` entries, trained on a few lines of code, in memory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
              "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"] * 20
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|eos|>"],
                            show_progress=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|eos|>")
    return fast


def save_folder(model: LlamaForCausalLM, tokenizer: Any, path: Path) -> str:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def target_alone(oracle: Any, prompt: list[int], n: int) -> list[int]:
    """A simulated chain's target decoding alone, straight from its oracle: the reference every mode must reproduce."""
    h = oracle.hashes(prompt)[-1]
    out = []
    for j in range(n):
        token = oracle.choice(oracle.stages - 1, h, j)
        out.append(token)
        h = oracle.extend(h, token)
    return out


def two_ranks(rank: Callable[[int, str, str], None], tmp_path: Path, timeout: float) -> None:
    """Run ``rank(r, store_path, out_dir)`` as rank 1 in a spawned interpreter and as rank 0 here (this process has
    torch and transformers imported already: a fresh interpreter's imports are most of a two-rank test's time)."""
    import multiprocessing as mp

    peer = mp.get_context("spawn").Process(target=rank, args=(1, str(tmp_path / "store"), str(tmp_path)))
    peer.start()
    try:
        rank(0, str(tmp_path / "store"), str(tmp_path))
        peer.join(timeout=timeout)
        assert peer.exitcode == 0, f"rank 1 ended with {peer.exitcode}"
    finally:
        if peer.is_alive():
            peer.kill()


# numpy >= 2.4 refuses int() of a 1-element array, which Triton 3.6's interpreter uses for a scalar's __index__
# (``range(0, K, BLOCK_K)`` in a kernel): take the element
_INTERPRETER_SHIM = """
import triton.runtime.interpreter as _ti
_orig_patch = _ti._patch_lang_tensor
def _patch(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_ti._patch_lang_tensor = _patch
"""


def run_interpreted(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python with TRITON_INTERPRET=1 (it must be set before triton is imported): our Triton
    kernels' math on the CPU. This checkout's pipespec first on the path, the parent's PYTHONPATH kept (a Triton
    installed outside the venv), the tests folder next (these helpers). Triton's interpreter computes bf16 dots
    wrongly (Triton 3.6), so kernels with ``tl.dot`` are checked in float32 there."""
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([str(Path(pipespec.__file__).parents[1]), here]
                           + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", _INTERPRETER_SHIM + code], env=env, capture_output=True, text=True,
                          timeout=300)


def interpreted_forward_matches_hf(variant: str, check: str = "") -> None:
    """In Triton's interpreter, float32, every family of ``test_static_families``: the static forward in layout
    ``variant`` over a 20-token prompt (past the attention kernel's 16 tokens: the math attention), then 1 and 3 tokens
    over a 32-slot bucket, equal to HF's forward (each call's last rows). ``check``: one more line of code run per
    family, with ``static`` and ``family`` in scope."""
    code = f"""
import copy
import torch
from test_static_families import FAMILIES, VOCAB, tiny
from pipespec.workers.static_llama import StaticLlama, _layer_fused
for family in FAMILIES:
    model = tiny(family, 4, hidden=64, dtype=torch.float32)
    reference = copy.deepcopy(model)
    static = StaticLlama(model, 64, {variant!r})
    {check}
    seq = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        prefill = static.forward(seq[:20], torch.arange(20), 32)
        one = static.forward(seq[20:21], torch.arange(20, 21), 32)
        three = static.forward(seq[21:24], torch.arange(21, 24), 32)
        want = reference(seq[None]).logits[0]
    for got, rows in ((prefill, slice(19, 20)), (one, slice(20, 21)), (three, slice(21, 24))):
        err = (got[-(rows.stop - rows.start):] - want[rows]).abs().max().item()
        assert err < 1e-4, (family, err)
print("ok")
"""
    out = run_interpreted(code)
    assert "ok" in out.stdout, out.stderr[-3000:]
