"""The Triton attention layout (kernels/triton_attention.py): one flash-decoding kernel over the filled part of the
static cache. Its math runs on the CPU in Triton's interpreter (Triton is not a CI dependency: those tests skip
without it); on the CPU proper the layout is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from helpers import interpreted_forward_matches_hf, run_interpreted
from pipespec.workers.static_llama import StaticLlama
from test_static_families import tiny


def test_kernel_equals_math_attention_in_the_interpreter() -> None:
    """Against the math layout in float64, in float32: grouped-query and one-kv-head-per-query shapes, 1-16 new
    tokens, a cache filled part way into its bucket (the kernel stops at max(pos) + 1), sliding windows, one to four
    slot ranges (the split path and its combine kernel) and two step sizes; a repeat gives the same bits."""
    pytest.importorskip("triton")
    code = """
import os
import torch
from pipespec.kernels.triton_attention import MAX_TOKENS, decode_attention
from pipespec.workers.static_llama import TRITON_ATTENTION_MAX_TOKENS, _math_attention
assert MAX_TOKENS == TRITON_ATTENTION_MAX_TOKENS  # the layout routes by the one, the kernel checks the other
torch.manual_seed(0)
worst = 0.0
for h, kvh, n, hd, kv, filled in ((4, 4, 1, 16, 100, 37), (4, 2, 3, 32, 130, 130), (8, 2, 16, 16, 200, 150),
                                  (4, 1, 5, 16, 64, 20), (2, 2, 2, 16, 300, 290)):
    qk = torch.randn(n, h + kvh, hd)
    q = qk[:, :h].transpose(0, 1)  # strided, as _pre_attention hands it over
    ck, cv = torch.randn(1, kvh, kv + 10, hd), torch.randn(1, kvh, kv + 10, hd)
    keys, values = ck[:, :, :kv], cv[:, :, :kv]
    pos = torch.arange(filled - n, filled)
    slots = torch.arange(kv).unsqueeze(0)
    for window in (None, 7):
        seen = slots <= pos.unsqueeze(1)
        if window:
            seen &= slots > pos.unsqueeze(1) - window
        mask = torch.zeros(1, 1, n, kv).masked_fill_(~seen.view(1, 1, n, kv), float("-inf"))
        want = _math_attention(q.double(), keys.double(), values.double(), mask.double())[0].transpose(0, 1)
        for splits, block in (("1", "64"), ("2", "64"), ("4", "64"), ("3", "16")):
            os.environ["PIPESPEC_ATTN_SPLITS"], os.environ["PIPESPEC_ATTN_BLOCK"] = splits, block
            got = decode_attention(q, keys, values, mask, pos)
            assert got.shape == (n, h, hd) and got.dtype == q.dtype
            assert torch.equal(got, decode_attention(q, keys, values, mask, pos))
            worst = max(worst, (got.double() - want).abs().max().item())
assert worst < 1e-5, worst
print("ok", worst)
"""
    out = run_interpreted(code)
    assert "ok" in out.stdout, out.stderr[-3000:]


def test_layout_matches_hf_forward_in_the_interpreter() -> None:
    """The whole static forward with ``lean-triton``, every family (GQA, biases, q/k norms, sliding windows), float32:
    a 20-token prompt (past the kernel's 16 tokens: the math layout), then 1 and 3 tokens (the kernel) over a
    32-slot bucket, equal to HF's forward (``helpers.interpreted_forward_matches_hf``)."""
    pytest.importorskip("triton")
    interpreted_forward_matches_hf("lean-triton")


def test_layout_is_refused_off_cuda() -> None:
    """Without CUDA (and outside the interpreter) the layout says why in one line instead of failing in a kernel."""
    model = tiny("llama-biases", 0, hidden=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="attention 'triton' runs on CUDA"):
        StaticLlama(model, 64, "lean-triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_in_bf16() -> None:
    """The compiled kernel in bf16 (tensor-core dots) against the math layout in float64, at real shapes: 7B (32
    heads, one kv head each), 70B-like grouped-query attention (64 / 8) with 8 tokens, 16 tokens over a long cache."""
    triton_attention = pytest.importorskip("pipespec.kernels.triton_attention", exc_type=ImportError)
    from pipespec.workers.static_llama import _math_attention

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    for h, kvh, n, kv, filled in ((32, 32, 1, 768, 513), (64, 8, 8, 768, 600), (28, 4, 16, 1024, 1000)):
        q = torch.randn(n, h, 128, device=dev, dtype=torch.bfloat16).transpose(0, 1)
        ck = torch.randn(1, kvh, kv + 64, 128, device=dev, dtype=torch.bfloat16)
        cv = torch.randn_like(ck)
        keys, values = ck[:, :, :kv], cv[:, :, :kv]
        pos = torch.arange(filled - n, filled, device=dev)
        seen = torch.arange(kv, device=dev).unsqueeze(0) <= pos.unsqueeze(1)
        mask = torch.zeros(1, 1, n, kv, device=dev, dtype=torch.bfloat16).masked_fill_(~seen.view(1, 1, n, kv),
                                                                                     float("-inf"))
        want = _math_attention(q.double(), keys.double(), values.double(), mask.double())[0].transpose(0, 1)
        got = triton_attention.decode_attention(q, keys, values, mask, pos)
        assert (got.double() - want).abs().max().item() < 0.02, (h, kvh, n)
