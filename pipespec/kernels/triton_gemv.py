"""A weight-only 8-bit GEMV for 1-16 tokens on CUDA: y = (x @ q.T) * scale + b, fp32 accumulation.

At this batch a linear reads every weight byte once and does two flops per byte, so it is bound by memory: the
kernel streams int8 (or fp8) tiles of ``q`` and converts them in registers, never writing a wide copy. One program
owns ``BLOCK_N`` output channels for all tokens and walks ``K``:

- one token: an element-wise product and a row sum per tile (no tensor cores: they would idle 15 of 16 rows);
- 2-16 tokens: ``tl.dot`` of x [16, BLOCK_K] (rows past n masked to zero) with the converted tile [BLOCK_K, BLOCK_N].

The tile sizes are autotuned per (token bucket, N, K) on the first call, which must be eager (a CUDA-graph capture
cannot benchmark): StaticWorker runs every shape eagerly before capturing it. Wrapped as a torch custom op so
torch.compile treats it as one opaque call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["wgemv"]

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn, bk, w in [(16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 128, 4), (64, 256, 8),
                              (128, 128, 8), (16, 1024, 8)]]


@triton.jit
def _wgemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                  M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels of this program
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0)  # [BLOCK_N] float32
    if M_BUCKET == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
            acc += tl.sum(w * x[None, :], axis=1)
        y = acc * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        rm = tl.arange(0, M_BUCKET)
        m_ok = rm < M
        acc2 = tl.zeros((M_BUCKET, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [M_BUCKET, BLOCK_K], x's dtype
            w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0).to(x.dtype)  # [BLOCK_K, BLOCK_N]: exact (|q| <= 127, e4m3 in bf16)
            acc2 = tl.dot(x, w, acc2)
        y2 = acc2 * scale[None, :]
        if HAS_BIAS:
            y2 += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y2.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# Triton's interpreter (TRITON_INTERPRET=1: CPU tests of the kernel's math) has no driver to benchmark with: one
# fixed tile there, autotuned tiles on a GPU
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_tuned = _wgemv_kernel if _INTERPRET else triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"])(_wgemv_kernel)
_FIXED = {"BLOCK_N": 16, "BLOCK_K": 64} if _INTERPRET else {}


@torch.library.custom_op("pipespec::wgemv", mutates_args=())
def wgemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [n, K] (n <= 16; bf16/fp16/fp32), q: [N, K] int8 or float8_e4m3fn, scale: [N] float32, bias: [N] or None
    -> [n, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    m_bucket = 1 if m == 1 else 16
    if m > 16:
        raise ValueError(f"wgemv serves up to 16 tokens, got {m}")
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731 - triton's grid idiom
    _tuned[grid](x, q, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
                 M_BUCKET=m_bucket, HAS_BIAS=bias is not None, **_FIXED)
    return y


@wgemv.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))
