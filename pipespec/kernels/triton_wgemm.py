"""A weight-only 8-bit GEMM for more rows than the GEMV serves (a prompt's prefill, a long re-feed) on CUDA:
y = (x @ q.T) * scale + b, fp32 accumulation.

Before it, a quantized linear of more than ``quant.CHUNKED_MAX_TOKENS`` rows took the torch path, which writes a bf16
copy of the whole weight per call (a 70B in int8 on an H200: ~215 ms of every prompt's forward, whatever its
length), and 17-64 rows ran the GEMV once per 16 rows (each pass reads every weight byte). Here each program owns a
``BLOCK_M`` x ``BLOCK_N`` tile of the output and walks ``K``: it loads int8 (or fp8) tiles of ``q``, converts them
in registers (exact: |q| <= 127 and e4m3 values are bf16 values) and feeds ``tl.dot`` with x's tile; no wide copy of
the weight is ever written. Programs run M-blocks grouped (``GROUP_M``) so that neighbours share weight tiles in L2.

Tiles are autotuned per (row bucket, N, K) on the first call, which must be eager (a CUDA-graph capture cannot
benchmark; StaticWorker runs every shape eagerly before capturing it, and a prefill past 64 tokens runs eagerly).
The bucket is the rows rounded up to a power of two (at most 1024), so every prompt length in one bucket shares one
tile and one loop order: the same bits for the same input on every run. Wrapped as a torch custom op so
torch.compile treats it as one opaque call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["row_bucket", "wgemm"]

_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
                                     (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                     (128, 128, 128, 8, 3)]]
# each config timed for ~20 ms (Triton's default is ~125 ms): the tuning runs in a request's first forward at a new
# row bucket (a prompt's prefill), and 7 configs x 4 weight shapes of a layer at the default cost ~3.5 s there;
# where the Triton in use can, the choices are kept on disk for the next process
_BENCH: dict[str, object] = {}
try:
    import triton.testing as _testing

    _BENCH = {"do_bench": lambda fn, quantiles: _testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
              "cache_results": True}
except ImportError:  # pragma: no cover - every Triton with autotune has triton.testing
    pass


def row_bucket(m: int) -> int:
    """The autotuner's key for ``m`` rows: the next power of two, at most 1024."""
    return min(1024, 1 << max(0, m - 1).bit_length())


@triton.jit
def _wgemm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                  M_BUCKET, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n  # programs per group of GROUP_M row blocks (all of their column blocks)
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0).to(x.dtype)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# Triton's interpreter (TRITON_INTERPRET=1: CPU tests of the kernel's math) has no driver to benchmark with: one
# fixed tile there, autotuned tiles on a GPU
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuned() -> object:
    """The kernel under ``triton.autotune`` keyed on (row bucket, N, K): with the short timing and the disk cache
    where this Triton takes them (older ones: its defaults). ``M_BUCKET`` is a plain argument (the key only), so a
    new bucket costs a tuning, not a compile per config."""
    for extra in (_BENCH, {k: v for k, v in _BENCH.items() if k != "cache_results"}, {}):
        try:
            return triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"], **extra)(_wgemm_kernel)
        except TypeError:
            continue
    raise RuntimeError("unreachable: the plain autotune takes no extra arguments")


_tuned = _wgemm_kernel if _INTERPRET else _autotuned()
_FIXED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2} if _INTERPRET else {}


@torch.library.custom_op("pipespec::wgemm", mutates_args=())
def wgemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [m, K] (any m; bf16/fp16/fp32), q: [N, K] int8 or float8_e4m3fn, scale: [N] float32, bias: [N] or None
    -> [m, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _tuned[grid](x, q, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
                 M_BUCKET=row_bucket(m), HAS_BIAS=bias is not None, **_FIXED)
    return y


@wgemm.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))
