"""The element-wise kernels (kernels/triton_elementwise.py) and the ``lean-fused`` layout that uses them: the same
arithmetic as the torch layout. Their math runs on the CPU in Triton's interpreter (Triton is not a CI dependency:
those tests skip without it), in float32 (the interpreter rounds bfloat16 its own way); on CUDA in bf16 (gpu)."""

from __future__ import annotations

import pytest
import torch

from helpers import interpreted_forward_matches_hf, run_interpreted
from pipespec.workers.static_llama import StaticLlama, default_variant
from test_static_families import tiny


def test_kernels_equal_the_torch_layout_in_the_interpreter() -> None:
    """Add + RMSNorm, RMSNorm, SiLU * up and RoPE + the cache write against the torch layout's own operations
    (``_rms``, ``F.silu``, ``_pre_attention``'s fused RoPE and ``index_copy_``), float32: row counts of a decode, a verify and a
    prefill, a width that is not a power of two, grouped-query heads, scattered cache slots."""
    pytest.importorskip("triton")
    code = """
import torch
import torch.nn.functional as F
from pipespec.kernels import triton_elementwise  # noqa: F401
from pipespec.workers.static_llama import _rms
ops = torch.ops.pipespec
torch.manual_seed(0)
worst = 0.0
for n, d in ((1, 64), (5, 96), (40, 1000)):
    x, delta, w = torch.randn(n, d), torch.randn(n, d), torch.randn(d)
    summed, normed = ops.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(summed, x + delta)
    worst = max(worst, (normed - _rms(x + delta, w, 1e-6, True)).abs().max().item(),
                (ops.rms_norm(x, w, 1e-6) - _rms(x, w, 1e-6, True)).abs().max().item())
    gate_up = torch.randn(n, 2 * d)
    gate, up = gate_up.split(d, dim=-1)
    worst = max(worst, (ops.silu_mul(gate_up, d) - F.silu(gate) * up).abs().max().item())
for h, kvh, n, hd in ((4, 4, 1, 16), (8, 2, 3, 32), (4, 1, 17, 16)):
    qkv = torch.randn(n, (h + 2 * kvh) * hd)
    pos = torch.randperm(50)[:n]
    cos_t, sin_t = torch.randn(50, hd), torch.randn(50, hd)
    cos = cos_t[pos].unsqueeze(1)
    sin = sin_t[pos].unsqueeze(1)
    sin = torch.cat((-sin[..., :hd // 2], sin[..., hd // 2:]), dim=-1)  # as StaticLlama.forward hands it over
    ck, cv = torch.zeros(1, kvh, 60, hd), torch.zeros(1, kvh, 60, hd)
    q = ops.rope_cache(qkv, cos[:, 0], sin[:, 0], pos, ck, cv, h, kvh)
    # the torch layout's fused RoPE (_pre_attention's branch), on the projection's output
    qk, v = qkv.view(n, h + 2 * kvh, hd)[:, :h + kvh], qkv.view(n, h + 2 * kvh, hd)[:, h + kvh:]
    rot = torch.addcmul(qk * cos, qk.unflatten(-1, (2, hd // 2)).flip(-2).flatten(-2), sin)
    wq, wk, wv = rot[:, :h].transpose(0, 1), rot[:, h:].transpose(0, 1), v.transpose(0, 1)
    ck2, cv2 = torch.zeros_like(ck), torch.zeros_like(cv)
    ck2.index_copy_(2, pos, wk.unsqueeze(0))
    cv2.index_copy_(2, pos, wv.unsqueeze(0))
    worst = max(worst, (q - wq).abs().max().item(), (ck - ck2).abs().max().item(), (cv - cv2).abs().max().item())
assert worst < 1e-5, worst
print("ok", worst)
"""
    out = run_interpreted(code)
    assert "ok" in out.stdout, out.stderr[-3000:]


def test_lean_fused_matches_hf_forward_in_the_interpreter() -> None:
    """The whole static forward with ``lean-fused``, every family (GQA, biases, sliding windows; q/k norms keep the
    torch path), float32: a 20-token prompt (the math attention, fused element-wise work), then 1 and 3 tokens (both
    kernels) over a 32-slot bucket, equal to HF's forward."""
    pytest.importorskip("triton")
    interpreted_forward_matches_hf(
        "lean-fused", check="assert (static._layer is _layer_fused) == (not static.family.qk_norm), family")


def test_lean_fused_is_refused_off_cuda_and_not_compiled() -> None:
    """Without CUDA (and outside the interpreter) the layout says why in one line; the CPU's default stays torch."""
    model = tiny("llama-biases", 0, hidden=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="runs on CUDA"):
        StaticLlama(model, 64, "lean-fused")
    assert default_variant(torch.device("cpu")) == "lean"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lean_fused_on_cuda_in_bf16() -> None:
    """bf16 on CUDA at a real layer width (4096, 32 heads of 128, 8 kv heads): ``lean-fused`` against ``lean-triton``
    (the same model in torch's element-wise kernels) over a prefill and 1- and 8-token steps: the kernels round where
    torch rounds, so the logits differ only by the norm's fp32 summation order."""
    pytest.importorskip("pipespec.kernels.triton_elementwise", exc_type=ImportError)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (140,), device="cuda")
    outs = {}
    for variant in ("lean-triton", "lean-fused"):
        static = StaticLlama(model, 1024, variant)
        with torch.inference_mode():
            static.forward(ids[:128], torch.arange(128, device="cuda"), 256)
            one = static.forward(ids[128:129], torch.arange(128, 129, device="cuda"), 256)
            eight = static.forward(ids[129:137], torch.arange(129, 137, device="cuda"), 256)
        outs[variant] = (one, eight)
    for a, b in zip(outs["lean-triton"], outs["lean-fused"]):
        assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.99
