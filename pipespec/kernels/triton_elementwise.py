"""A decoder layer's element-wise work in three Triton kernels, for CUDA: the residual add with the RMSNorm after it,
RoPE with the KV-cache write, and SiLU(gate) * up.

Eager torch spends ~11 of a lean layer's ~21 kernels on this work (the add, ``F.rms_norm`` and the weight's
multiply, twice; flip, multiply and ``addcmul`` for RoPE; two ``index_copy_`` into the cache; SiLU and the
multiply), each ~2-3 us in a CUDA graph on an H200 whatever its size: a 1B draft's 16 layers spent ~0.3 ms of a
1.3 ms forward there (docs/benchmarks.md, "Where a lock-step round's time goes on one GPU"). These kernels do the same
arithmetic with the same roundings as the eager layout (``static_llama``'s fused RMSNorm and RoPE): each step that
eager rounds to the model's dtype is rounded here too, so they differ from it only by the order of the norm's fp32
sum.

All three are torch custom ops (one opaque call each under torch.compile; capturable in CUDA graphs); rows are
tokens, any count (prefills too).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["add_rms_norm", "rms_norm", "rope_cache", "silu_mul"]


def _warps(block: int) -> dict[str, int]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the interpreter (CPU tests) takes no launch options
        return {}
    return {"num_warps": max(1, min(16, block // 256))}


@triton.jit
def _norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, y_ptr, D, eps, sx, sd, ss, sy, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0)
    if ADD:  # x + delta rounded to the stream's dtype (eager's add), kept as the new residual stream
        x = (x.to(tl.float32) + tl.load(d_ptr + row * sd + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * ss + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rms).to(y_ptr.dtype.element_ty)  # F.rms_norm's output, in the input's dtype
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(y_ptr + row * sy + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=ok)


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    n, d = x.shape
    summed = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    block = triton.next_power_of_2(d)
    other = delta if delta is not None else x
    _norm_kernel[(n,)](x, other, weight, summed, out, d, eps, x.stride(0), other.stride(0), summed.stride(0),
                       out.stride(0), BLOCK=block, ADD=delta is not None, **_warps(block))
    return summed, out


@torch.library.custom_op("pipespec::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [n, d] (rows contiguous), weight [d] -> weight * rms_norm(x) [n, d], as ``static_llama._rms(fused=True)``."""
    return _norm(x, None, weight, eps)[1]


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("pipespec::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta [n, d], weight [d] -> (x + delta, weight * rms_norm(x + delta)): a residual add and the norm that
    reads it, in one pass."""
    return _norm(x, delta, weight, eps)


@add_rms_norm.register_fake
def _(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, F, sg, so, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(gu_ptr + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * sg + F + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # F.silu, rounded as eager rounds it
    tl.store(out_ptr + row * so + cols, (act.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("pipespec::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor, ffn: int) -> torch.Tensor:
    """gate_up [n, 2 * ffn] (gate, then up) -> silu(gate) * up [n, ffn]."""
    n = gate_up.shape[0]
    out = gate_up.new_empty((n, ffn))
    block = min(1024, triton.next_power_of_2(ffn))
    _silu_mul_kernel[(n, triton.cdiv(ffn, block))](gate_up, out, ffn, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                   **_warps(block))
    return out


@silu_mul.register_fake
def _(gate_up: torch.Tensor, ffn: int) -> torch.Tensor:
    return gate_up.new_empty((gate_up.shape[0], ffn))


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, N, H, KVH,
                       s_row, s_cos, sq_h, sq_n, sk_h, sk_s, sv_h, sv_s, HALF: tl.constexpr, HALF_P: tl.constexpr):
    tok = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: query heads, H..H+KVH-1: key heads, then value heads
    i = tl.arange(0, HALF_P)
    ok = i < HALF
    base = qkv_ptr + tok * s_row + head * (2 * HALF)
    a = tl.load(base + i, mask=ok)
    b = tl.load(base + HALF + i, mask=ok)
    slot = tl.load(pos_ptr + tok)
    if head < H + KVH:
        # eager's fused RoPE: addcmul(x * cos, swap_halves(x), sin) with sin's first half negated (forward)
        c1 = tl.load(cos_ptr + tok * s_cos + i, mask=ok).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * s_cos + HALF + i, mask=ok).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * s_cos + i, mask=ok).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * s_cos + HALF + i, mask=ok).to(tl.float32)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        dt = q_ptr.dtype.element_ty
        r1 = ((af * c1).to(dt).to(tl.float32) + bf * s1).to(dt)
        r2 = ((bf * c2).to(dt).to(tl.float32) + af * s2).to(dt)
        if head < H:
            dst = q_ptr + head * sq_h + tok * sq_n
        else:
            dst = k_ptr + (head - H) * sk_h + slot * sk_s
        tl.store(dst + i, r1, mask=ok)
        tl.store(dst + HALF + i, r2, mask=ok)
    else:
        dst = v_ptr + (head - H - KVH) * sv_h + slot * sv_s
        tl.store(dst + i, a, mask=ok)
        tl.store(dst + HALF + i, b, mask=ok)


@torch.library.custom_op("pipespec::rope_cache", mutates_args=("cache_k", "cache_v"))
def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """qkv [n, (h + 2 kvh) * hd] (q heads, k heads, v heads), cos and sin [n, hd] (sin's first half negated, as
    ``StaticLlama.forward`` hands them over), pos [n], caches [1, kvh, capacity, hd]: writes RoPE(k) and v into the
    caches at slots ``pos`` and returns RoPE(q) [h, n, hd]."""
    n = qkv.shape[0]
    hd = cache_k.shape[-1]
    if cos.stride(0) != sin.stride(0) or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rope_cache: cos and sin must share their row stride, columns contiguous")
    q = qkv.new_empty((heads, n, hd))
    ck, cv = cache_k[0], cache_v[0]
    _rope_cache_kernel[(n, heads + 2 * kv_heads)](qkv, cos, sin, pos, q, ck, cv, n, heads, kv_heads, qkv.stride(0),
                                                  cos.stride(0), q.stride(0), q.stride(1), ck.stride(0), ck.stride(1),
                                                  cv.stride(0), cv.stride(1), HALF=hd // 2,
                                                  HALF_P=triton.next_power_of_2(hd // 2))
    return q


@rope_cache.register_fake
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
      cache_v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    return qkv.new_empty((heads, qkv.shape[0], cache_k.shape[-1]))
