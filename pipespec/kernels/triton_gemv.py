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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["SplitKConfig", "heuristic", "launch", "plan", "wgemv", "wgemv4", "wgemv4_splitk", "wgemv_splitk"]

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


# --- int4: v1's structure over packed nibbles with group scales ---------------------------------------------------
#
# q [N, K / 2] uint8 holds k = 2j in byte j's low nibble and k = 2j + 1 in its high one, each as q + 8; scale
# [N, GROUPS] float32, one per GROUP inputs of a row. A step covers BLOCK_K inputs (BLOCK_K / 2 bytes a row) inside
# one group (GROUP % BLOCK_K == 0, so a step never straddles two scales; the tail group is just masked): the nibbles
# are unpacked in registers (and, shift, subtract 8: exact in any float), the step's partial sums are taken against
# the even and the odd inputs of x, then scaled by the group's scale and added to an fp32 accumulator. No atomics
# and one fixed loop order: the same bits on every run for one config (the tuner keys on the shape, as v1's does).


@triton.jit
def _wgemv4_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, GROUPS, stride_xm, stride_wn, stride_ym,
                   M_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels of this program
    rb = tl.arange(0, BLOCK_K // 2)  # byte columns of a step
    n_ok = rn < N
    kb_end = K // 2
    w_rows = w_ptr + rn.to(tl.int64) * stride_wn  # [BLOCK_N] row starts (int64: N * K / 2 may pass 2^31)
    s_rows = s_ptr + rn * GROUPS  # [BLOCK_N] this program's rows of scales
    if M_BUCKET == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // 2 + rb  # [BLOCK_K / 2] byte index; inputs 2 kb and 2 kb + 1
            b_ok = kb < kb_end
            xe = tl.load(x_ptr + 2 * kb, mask=b_ok, other=0.0).to(tl.float32)  # [BLOCK_K / 2] even inputs
            xo = tl.load(x_ptr + 2 * kb + 1, mask=b_ok, other=0.0).to(tl.float32)  # odd inputs
            byte = tl.load(w_rows[:, None] + kb[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0x88)
            lo = (byte & 0xF).to(tl.float32) - 8.0  # [BLOCK_N, BLOCK_K / 2]
            hi = (byte >> 4).to(tl.float32) - 8.0
            s = tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0)  # [BLOCK_N] this step's group scale
            acc += tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1) * s
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        rm = tl.arange(0, M_BUCKET)
        m_ok = rm < M
        acc2 = tl.zeros((M_BUCKET, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kb = k0 // 2 + rb
            b_ok = kb < kb_end
            x_at = x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :]
            x_ok = m_ok[:, None] & b_ok[None, :]
            xe = tl.load(x_at, mask=x_ok, other=0.0)  # [M_BUCKET, BLOCK_K / 2], x's dtype
            xo = tl.load(x_at + 1, mask=x_ok, other=0.0)
            byte = tl.load(w_rows[None, :] + kb[:, None], mask=n_ok[None, :] & b_ok[:, None], other=0x88)
            lo = ((byte & 0xF).to(tl.int32) - 8).to(xe.dtype)  # [BLOCK_K / 2, BLOCK_N]: exact (|q| <= 8)
            hi = ((byte >> 4).to(tl.int32) - 8).to(xe.dtype)
            part = tl.dot(xe, lo, input_precision=PREC)  # [M_BUCKET, BLOCK_N] fp32: this step's group only
            part = tl.dot(xo, hi, part, input_precision=PREC)
            acc2 += part * tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc2 += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc2.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


_CONFIGS4 = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in [(16, 4), (32, 4), (64, 4), (64, 8), (128, 8)]]
_tuned4 = (_wgemv4_kernel if _INTERPRET
           else triton.autotune(configs=_CONFIGS4, key=["M_BUCKET", "N", "K", "GROUP", "BLOCK_K"])(_wgemv4_kernel))


def int4_block_k(group: int) -> int:
    """Inputs per step of the int4 kernel: the largest of 128, 64, 32 that divides ``group`` (a step stays inside
    one group; tl.dot needs >= 16 bytes a row), 32 in the interpreter (several steps per group get tested); 0 when
    ``group`` is not a multiple of 32 (no Triton path: the caller takes the torch one)."""
    if group % 32:
        return 0
    if _INTERPRET:
        return 32
    return next(bk for bk in (128, 64, 32) if group % bk == 0)


@torch.library.custom_op("pipespec::wgemv4", mutates_args=())
def wgemv4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           group: int) -> torch.Tensor:
    """x: [n, K] (n <= 16; bf16/fp16/fp32), q: [N, K / 2] uint8 (packed int4), scale: [N, ceil(K / group)] float32,
    bias: [N] or None -> [n, N] in x's dtype. ``group`` a multiple of 32."""
    x = x.contiguous()
    m, k = x.shape
    n = q.shape[0]
    block_k = int4_block_k(group)
    if m > 16:
        raise ValueError(f"wgemv4 serves up to 16 tokens, got {m}")
    if not block_k or q.shape[1] * 2 != k or scale.shape != (n, -(-k // group)):
        raise ValueError(f"wgemv4: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}, group {group}")
    scale = scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731 - triton's grid idiom
    _tuned4[grid](x, q, scale, bias if bias is not None else scale, y, m, n, k, scale.shape[1], x.stride(0),
                  q.stride(0), y.stride(0), M_BUCKET=1 if m == 1 else 16, HAS_BIAS=bias is not None, GROUP=group,
                  PREC="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_K=block_k,
                  **({"BLOCK_N": 16} if _INTERPRET else {}))
    return y


@wgemv4.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))


# --- v2: split-K, a 2-D accumulator for one token, W as the dot's left operand (swap-AB) for 2-16 tokens ----------
#
# Why v1 stops at 62-80 % of the copy bandwidth on an H200 (132 SMs), and what v2 changes:
# - too few bytes in flight: a 70B ``o``/``down`` projection (N = 8192) gives 512 programs of 16 rows, each a short
#   dependent chain of 4 KiB loads. v2 splits K over ``SPLIT`` programs per output tile (grid [N tiles, SPLIT]) so
#   every shape gets >= ~4 programs per SM, and pipelines its loads (num_stages).
# - one token: v1 reduces a [BLOCK_N, BLOCK_K] product to [BLOCK_N] every step (warp shuffles in the loop); v2
#   accumulates element-wise in a [BLOCK_N, BLOCK_K] fp32 tile and reduces once after the loop.
# - int8 -> fp32 by cvt (I2F) runs at 16 conversions / SM / clock on sm_90, below the ~18 bytes / SM / clock the
#   H200's bandwidth delivers. v2 (MAGIC) builds the float from the byte: (byte ^ 0x80) in the mantissa of 2^23 is
#   2^23 + 128 + q, exact, so one XOR and one FADD (full-rate units) replace the conversion.
# - 2-16 tokens: v1's dot(x [16, K], w [K, BLOCK_N]) makes the converted weight the right operand, which Hopper's
#   wgmma reads from shared memory only (a register -> smem round trip per tile); v2 computes y.T tiles as
#   dot(w [BLOCK_N, BLOCK_K], x.T [BLOCK_K, 16]): the weight is the left operand, which wgmma may take from registers.
#
# Determinism: with SPLIT > 1 each program writes its fp32 partial sums to a workspace [SPLIT, M, N] and a second
# small kernel adds them in the fixed order 0..SPLIT-1, then applies the per-channel scale once (and the bias). No
# atomics: the same input and config give the same bits every run. The config (tiles, SPLIT) is chosen once per
# (token bucket, N, K, dtypes) in a process and kept, so a process never mixes two summation orders for one shape;
# PIPESPEC_WGEMV_TUNE=0 skips the benchmark and uses the heuristic config (the same bits across processes too).


@triton.jit
def _splitk_epilogue(acc, rn, n_ok, pid_k, M, N, s_ptr, b_ptr, y_ptr, p_ptr, stride_ym, M_BUCKET: tl.constexpr,
                     DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr):
    """Where a split-K program's fp32 sums go: ``acc`` is [BLOCK_N] (one token) or the y.T tile [BLOCK_N, M_BUCKET].
    DIRECT (one split): y = acc * scale[n] (SCALE: int8/fp8's per-channel scale; int4 applied its group scales in the
    loop) + b[n], in y's dtype; else acc as it is to the workspace p [SPLIT, M, N] for ``_splitk_reduce``."""
    if M_BUCKET == 1:
        if DIRECT:
            y = acc
            if SCALE:
                y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.store(p_ptr + pid_k * N + rn, acc, mask=n_ok)
    else:
        rm = tl.arange(0, M_BUCKET)
        ok = (rm < M)[None, :] & n_ok[:, None]
        if DIRECT:
            y2 = acc
            if SCALE:
                y2 = y2 * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
            if HAS_BIAS:
                y2 += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + rm[None, :] * stride_ym + rn[:, None], y2.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(p_ptr + pid_k * M * N + rm[None, :] * N + rn[:, None], acc, mask=ok)


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_ym,
                   M_BUCKET: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels of this program
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    # this program's K range: [k_lo, k_lo + K_SPLIT) & [0, K). K_SPLIT % BLOCK_K == 0, so a tile never crosses into
    # the next split and only `kk < K` is masked (the last split may run < `splits` fully masked steps: no traffic)
    k_lo = pid_k * K_SPLIT
    w_rows = w_ptr + rn.to(tl.int64) * stride_wn  # [BLOCK_N] row starts (int64: N * K may pass 2^31)
    if M_BUCKET == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(0, K_SPLIT, BLOCK_K):
            kk = k_lo + i + rk
            k_ok = kk < K
            x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            wq = tl.load(w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if MAGIC:  # int8 q: float(2^23 + 128 + q) from its bits, minus 2^23 + 128: exact, no I2F
                bits = wq.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
                w = bits.to(tl.float32, bitcast=True) - 8388736.0
            else:
                w = wq.to(tl.float32)
            acc += w * x[None, :]  # [BLOCK_N, BLOCK_K]
        _splitk_epilogue(tl.sum(acc, axis=1), rn, n_ok, pid_k, M, N, s_ptr, b_ptr, y_ptr, p_ptr, stride_ym,
                         M_BUCKET, DIRECT, HAS_BIAS, True)
    else:
        rm = tl.arange(0, M_BUCKET)
        m_ok = rm < M
        acc2 = tl.zeros((BLOCK_N, M_BUCKET), dtype=tl.float32)  # y.T tile
        for i in range(0, K_SPLIT, BLOCK_K):
            kk = k_lo + i + rk
            k_ok = kk < K
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=m_ok[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, M_BUCKET] x.T, x's dtype
            wq = tl.load(w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if MAGIC:
                bits = wq.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
                w = (bits.to(tl.float32, bitcast=True) - 8388736.0).to(xt.dtype)  # exact: |q| <= 127
            else:
                w = wq.to(xt.dtype)  # exact (|q| <= 127, e4m3 in bf16)
            acc2 = tl.dot(w, xt, acc2, input_precision=PREC)  # [BLOCK_N, M_BUCKET]
        _splitk_epilogue(acc2, rn, n_ok, pid_k, M, N, s_ptr, b_ptr, y_ptr, p_ptr, stride_ym, M_BUCKET, DIRECT,
                         HAS_BIAS, True)


# int4 split-K (``wgemv4_splitk``): v2's grid, tuner and reduction over v1-int4's packed nibbles. What differs:
# - a step (BLOCK_K inputs, BLOCK_K / 2 bytes a row) is a whole number of groups (BLOCK_K % GROUP == 0; K_SPLIT is a
#   multiple of BLOCK_K, so a split starts on a group boundary too). Chosen over BLOCK_K | GROUP because a step then
#   keeps 4-16 KiB of weight in flight whatever the group, and the loop body is one group at a time (static_range
#   over the step's groups): each group's bytes are loaded once, unpacked once, and serve every token of the M rows.
# - one token: each group's products summed per row (FFMAs within a thread, then 2 shuffles), times the group's
#   scale, into an fp32 accumulator [BLOCK_N] (an element-wise [BLOCK_N, GROUP] one compiled to an extra FMUL a
#   weight).
# - 2-16 tokens: per group, dot(q [BLOCK_N, GROUP], x.T [GROUP, M_BUCKET]) -> [BLOCK_N, M_BUCKET] fp32, times the
#   group's scale into the y.T accumulator (swap-AB, as v2: the weight is the left operand).
# - q is read as int32 words (8 inputs); nibble -> float: (nibble | 0x4B000000) is the float 2^23 + nibble, minus
#   2^23 + 8 gives q exactly (full-rate integer ops and one FADD instead of a quarter-rate I2F; v2's MAGIC for int8).
#   Compiled for sm_90 (no GPU: triton.compile to SASS) the one-token loop is ~8 instructions a weight (byte tiles
#   unpacked byte by byte: ~9); instruction issue, not bandwidth, may bound it: measure before tuning further.
# - scales are applied in the loop, so the epilogue and the reduction take none (SCALE=False); the bias as v2.
# The same determinism as v2: fixed loop order, fixed-order reduction, one config per key in a process.


@triton.jit
def _nibble(word, SHIFT: tl.constexpr):
    """The nibble at bit SHIFT of each int32 word as float32 q in [-8, 7]: (nibble | 0x4B000000) is the float
    2^23 + nibble, minus 2^23 + 8 is q, exact (a shift, one LOP3, one FADD: no I2F)."""
    return (((word >> SHIFT) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _unpack4(word):
    """word [BLOCK_N, GROUP / 8] int32 (4 packed bytes, little-endian: nibble j is input 8 i + j) -> q [BLOCK_N, GROUP]
    float32 in input order. The interleaves only place registers (each thread's 8 nibbles stay in that thread)."""
    evens = tl.interleave(tl.interleave(_nibble(word, 0), _nibble(word, 16)),
                          tl.interleave(_nibble(word, 8), _nibble(word, 24)))  # nibbles 0 2 4 6 of each word
    odds = tl.interleave(tl.interleave(_nibble(word, 4), _nibble(word, 20)),
                         tl.interleave(_nibble(word, 12), _nibble(word, 28)))  # 1 3 5 7
    return tl.interleave(evens, odds)


@triton.jit
def _splitk4_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, M, N, K, KW, KW_SPLIT, stride_xm, stride_wn, stride_sn,
                    stride_ym, M_BUCKET: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    GROUP: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # q is read as int32 words (8 inputs each; w_ptr is q.view(int32), stride_wn in words) and the loops walk words:
    # KW (= K / 8, words a row) and KW_SPLIT (words a split) are arguments, so Triton sees their divisibility by 16
    # and proves the tiles aligned and their masks uniform (16-byte loads), and a nibble is one shift and one LOP3 of
    # a word already in a register (unpacking bytes cost ~8 integer ops a byte in the compiled sm_90 code)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output channels of this program
    rw = tl.arange(0, GROUP // 8)  # word columns of one group
    rk = tl.arange(0, GROUP)  # its inputs
    n_ok = rn < N
    kw_lo = pid_k * KW_SPLIT  # this program's words: [kw_lo, kw_lo + KW_SPLIT) & [0, KW), whole groups
    w_rows = w_ptr + rn.to(tl.int64) * stride_wn  # [BLOCK_N] row starts (int64: N * K / 8 words may pass 2^31 bytes)
    s_rows = s_ptr + rn * stride_sn  # [BLOCK_N] this program's rows of group scales
    if M_BUCKET == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(0, KW_SPLIT, BLOCK_K // 8):
            for j in tl.static_range(BLOCK_K // GROUP):
                w0 = kw_lo + i + j * (GROUP // 8)  # this group's first word; inputs from 8 w0
                kw = w0 + rw
                kk = 8 * w0 + rk
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)  # [GROUP]
                w = _unpack4(tl.load(w_rows[:, None] + kw[None, :], mask=n_ok[:, None] & (kw < KW)[None, :],
                                     other=0))  # [BLOCK_N, GROUP]; masked words meet x = 0 or are not stored
                s = tl.load(s_rows + w0 // (GROUP // 8), mask=n_ok & (w0 < KW), other=0.0)  # [BLOCK_N] its scale
                acc += tl.sum(w * x[None, :], axis=1) * s  # the group's sum (FFMAs in a thread, 2 shuffles)
        _splitk_epilogue(acc, rn, n_ok, pid_k, M, N, s_ptr, b_ptr, y_ptr, p_ptr, stride_ym, M_BUCKET, DIRECT,
                         HAS_BIAS, False)
    else:
        rm = tl.arange(0, M_BUCKET)
        m_ok = rm < M
        acc2 = tl.zeros((BLOCK_N, M_BUCKET), dtype=tl.float32)  # y.T tile
        for i in range(0, KW_SPLIT, BLOCK_K // 8):
            for j in tl.static_range(BLOCK_K // GROUP):
                w0 = kw_lo + i + j * (GROUP // 8)
                kw = w0 + rw
                kk = 8 * w0 + rk
                xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=m_ok[None, :] & (kk < K)[:, None],
                             other=0.0)  # [GROUP, M_BUCKET] x.T, x's dtype
                w = _unpack4(tl.load(w_rows[:, None] + kw[None, :], mask=n_ok[:, None] & (kw < KW)[None, :],
                                     other=0))
                part = tl.dot(w.to(xt.dtype), xt, input_precision=PREC)  # [BLOCK_N, M_BUCKET]: q exact in x's dtype
                acc2 += part * tl.load(s_rows + w0 // (GROUP // 8), mask=n_ok & (w0 < KW), other=0.0)[:, None]
        _splitk_epilogue(acc2, rn, n_ok, pid_k, M, N, s_ptr, b_ptr, y_ptr, p_ptr, stride_ym, M_BUCKET, DIRECT,
                         HAS_BIAS, False)


@triton.jit
def _splitk_reduce(p_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = (sum_{s = 0..SPLIT-1, in order} p[s, m, n]) * scale[n] (SCALE; int4's partial sums come scaled)
    + b[n]; p: [SPLIT, M, N] fp32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat over [M, N]
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: deterministic
        acc += tl.load(p_ptr + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    y = acc
    if SCALE:
        y = y * tl.load(s_ptr + n, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class SplitKConfig:
    """One launch of v2: tiles, K split (requested; ``plan`` derives the split actually used), warps, stages.
    ``block_k`` counts inputs (int4: a multiple of the group; half as many bytes a row)."""

    block_n: int
    block_k: int
    split: int
    num_warps: int = 4
    num_stages: int = 3


def plan(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(k_split, splits): K per program, a multiple of ``block_k``, and how many programs cover K (<= ``split``,
    none empty). E.g. K = 11008, block_k = 512, split = 4 -> (3072, 4); K = 1000, 512, 4 -> (512, 2)."""
    split = max(1, min(split, triton.cdiv(k, block_k)))
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return k_split, triton.cdiv(k, k_split)


def _whole_groups(block_k: int, group: int) -> int:
    """int4's BLOCK_K: ``block_k`` rounded down to whole groups, at least one (``group`` 0: int8/fp8, unchanged)."""
    return max(group, block_k // group * group) if group else block_k


def heuristic(m_bucket: int, n: int, k: int, sms: int = 132, group: int = 0) -> SplitKConfig:
    """The untuned config: a tile of 8-16 KiB of weight per step (int4, ``group`` > 0: 8 KiB, twice the inputs), and
    a K split that gives >= ~4 programs per SM (each split keeps >= 4 steps of BLOCK_K). E.g. M = 1, 8192 x 28672
    (70B down): 256 tiles x split 3."""
    if group:
        bn, bk, warps = (32, 512, 4) if m_bucket == 1 else (64, 256, 4)
        bk = _whole_groups(bk, group)
    elif m_bucket == 1:
        bn, bk, warps = 32, 256, 4
    else:
        bn, bk, warps = 64, 128, 4
    tiles = triton.cdiv(n, bn)
    want = triton.cdiv(4 * sms, tiles)
    most = max(1, k // (4 * bk))
    return SplitKConfig(bn, bk, max(1, min(want, most, 16)), warps, 3)


def candidates(m_bucket: int, n: int, k: int, sms: int = 132, group: int = 0) -> list[SplitKConfig]:
    """What the tuner times: tiles x warps x stages around the heuristic's split (x1/2, x1, x2) and no split."""
    base = heuristic(m_bucket, n, k, sms, group)
    if group:  # int4: the same bytes a step as int8's tiles hold twice the inputs
        tiles = ([(32, 512, 4), (16, 1024, 4), (32, 256, 4), (64, 512, 8), (32, 1024, 8), (64, 256, 4)]
                 if m_bucket == 1 else
                 [(64, 256, 4), (64, 128, 4), (128, 128, 8), (64, 512, 8), (32, 512, 4), (128, 256, 8)])
        tiles = list(dict.fromkeys((bn, _whole_groups(bk, group), w) for bn, bk, w in tiles))
    elif m_bucket == 1:
        tiles = [(16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8), (16, 1024, 8), (64, 128, 4)]
    else:
        tiles = [(64, 128, 4), (64, 256, 4), (128, 128, 8), (64, 256, 8), (32, 256, 4), (128, 256, 8)]
    out: list[SplitKConfig] = []
    for bn, bk, warps in tiles:
        want = max(1, triton.cdiv(4 * sms, triton.cdiv(n, bn)))
        for split in sorted({1, max(1, want // 2), want, 2 * want}):
            if split > 16 or (split > 1 and k // split < 2 * bk):
                continue
            for stages in (2, 4) if (bn, bk) == (base.block_n, base.block_k) else (3,):
                out.append(SplitKConfig(bn, bk, split, warps, stages))
    return [base] + [c for c in out if c != base]


_TUNE = os.environ.get("PIPESPEC_WGEMV_TUNE", "1") != "0" and not _INTERPRET
_chosen: dict[tuple, SplitKConfig] = {}  # (m_bucket, N, K, dtypes, bias, magic, group) -> the config this process uses


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, cfg: SplitKConfig,
           magic: bool = True, group: int = 0) -> torch.Tensor:
    """One v2 product with an explicit config: x [m, K] (contiguous), q [N, K] -> y [m, N] in x's dtype. ``group`` > 0:
    int4, q [N, K / 2] uint8 and scale [N, K / group] (contiguous rows), ``cfg.block_k`` a multiple of ``group``."""
    m, k = x.shape
    n = q.shape[0]
    m_bucket = 1 if m == 1 else 16
    if group and (cfg.block_k % group or not int4_splitk_ok(k, group)):
        raise ValueError(f"int4 split-K: K {k}, group {group}, block_k {cfg.block_k} (see int4_splitk_ok)")
    k_split, splits = plan(k, cfg.block_k, cfg.split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    b = bias if bias is not None else scale
    opts = {} if _INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    grid = (triton.cdiv(n, cfg.block_n), splits)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if group:
        _splitk4_kernel[grid](x, q.view(torch.int32), scale, b, y, part, m, n, k, k // 8, k_split // 8,
                              x.stride(0), q.stride(0) // 4, scale.stride(0), y.stride(0), M_BUCKET=m_bucket,
                              DIRECT=splits == 1, HAS_BIAS=bias is not None, GROUP=group, PREC=prec,
                              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **opts)
    else:
        _splitk_kernel[grid](x, q, scale, b, y, part, m, n, k, k_split, x.stride(0), q.stride(0), y.stride(0),
                             M_BUCKET=m_bucket, DIRECT=splits == 1, HAS_BIAS=bias is not None,
                             MAGIC=magic and q.dtype == torch.int8, PREC=prec, BLOCK_N=cfg.block_n,
                             BLOCK_K=cfg.block_k, **opts)
    if splits > 1:
        block = 1024
        _splitk_reduce[(triton.cdiv(m * n, block),)](part, scale, b, y, m, n, y.stride(0), SPLIT=splits,
                                                     HAS_BIAS=bias is not None, SCALE=not group, BLOCK=block,
                                                     **({} if _INTERPRET else {"num_warps": 4}))
    return y


def chosen_config(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  magic: bool = True, group: int = 0) -> SplitKConfig:
    """The config for this call's key: cached; else timed over ``candidates`` (eager only: a CUDA-graph capture
    cannot benchmark, it takes the heuristic and keeps it), or the heuristic when tuning is off."""
    m, k = x.shape
    n = q.shape[0]
    m_bucket = 1 if m == 1 else 16
    key = (m_bucket, n, k, q.dtype, x.dtype, bias is not None, magic, group)
    cfg = _chosen.get(key)
    if cfg is not None:
        return cfg
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = heuristic(m_bucket, n, k, sms, group)
    if _TUNE and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        from triton.testing import do_bench

        best = float("inf")
        for c in candidates(m_bucket, n, k, sms, group):
            try:
                t = do_bench(lambda c=c: launch(x, q, scale, bias, c, magic, group), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not compile / fit (shared memory) is skipped
                continue
            if t < best:
                best, cfg = t, c
    _chosen[key] = cfg
    return cfg


def wgemv_splitk_impl(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                      magic: bool = True) -> torch.Tensor:
    if x.shape[0] > 16:
        raise ValueError(f"wgemv serves up to 16 tokens, got {x.shape[0]}")
    x = x.contiguous()
    return launch(x, q, scale, bias, chosen_config(x, q, scale, bias, magic), magic)


@torch.library.custom_op("pipespec::wgemv_splitk", mutates_args=())
def wgemv_splitk(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """v2 of ``wgemv`` (same contract): split-K with a deterministic fixed-order reduction; see the notes above."""
    return wgemv_splitk_impl(x, q, scale, bias)


@wgemv_splitk.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))


def int4_splitk_ok(k: int, group: int) -> bool:
    """Whether ``wgemv4_splitk`` serves int4 rows of ``k`` inputs in groups of ``group``: the group a power of two
    >= 32 (tl.arange over its words; tl.dot needs >= 16 inputs), K a multiple of 8 (whole int32 words a row)."""
    return group >= 32 and group & (group - 1) == 0 and k % 8 == 0


def wgemv4_splitk_impl(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       group: int) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    if m > 16:
        raise ValueError(f"wgemv4_splitk serves up to 16 tokens, got {m}")
    if not int4_splitk_ok(k, group) or q.shape[1] * 2 != k or scale.shape != (n, -(-k // group)):
        raise ValueError(f"wgemv4_splitk: x {tuple(x.shape)}, q {tuple(q.shape)}, scale {tuple(scale.shape)}, "
                         f"group {group} (a power of two >= 32, K a multiple of 8)")
    x, scale = x.contiguous(), scale.contiguous()
    return launch(x, q, scale, bias, chosen_config(x, q, scale, bias, group=group), group=group)


@torch.library.custom_op("pipespec::wgemv4_splitk", mutates_args=())
def wgemv4_splitk(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  group: int) -> torch.Tensor:
    """int4 split-K (``wgemv4``'s contract): one load and unpack of each weight group for all tokens, group scales in
    the loop, v2's deterministic reduction and tuner (first eager call per shape; a capture takes the heuristic)."""
    return wgemv4_splitk_impl(x, q, scale, bias, group)


@wgemv4_splitk.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))
