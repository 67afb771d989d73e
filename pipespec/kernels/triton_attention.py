"""Attention of 1-16 new tokens over the static KV cache in one Triton kernel (flash-decoding), for CUDA.

The math layout (``static_llama._math_attention``: bmm, softmax, bmm) costs a one-token 7B forward ~9 us a layer in
two cuBLAS kernels plus a softmax and copies, for 12 MB of keys and values that take ~3 us to read (H200, 768-slot
bucket; docs/benchmarks.md, "Forward layouts"). This kernel reads each key and value once, does the softmax online
in fp32 and stops at the filled part of the cache: slots past max(pos) are masked for every row (the mask is causal),
so it reads ``max(pos) + 1`` slots of the ``kv`` in the bucket, a bound it takes from ``pos`` on the device (a
CUDA graph replays it for any position).

Layout: program (c, r, s) owns kv head ``c``, a block of ``R`` rows of its group (query head ``c * g + row // n``,
token ``row % n``: HF's repeat_kv grouping) and the ``s``-th of ``SPLITS`` equal ranges of slots. With one split it
writes the output; with more, each writes its unnormalised partial (running max, sum, accumulator) to a workspace
and a second kernel combines them in a fixed order (the same bits on every run). Same model as the math layout,
other roundings: scores and probabilities stay in fp32 (the math layout rounds the scores to the model's dtype);
the probabilities are rounded to the values' dtype for the second product, as the math layout does; float32
models get full-precision dots, not TF32.

``decode_attention`` is a torch custom op, so torch.compile (the compiled layouts) treats it as one opaque call.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .decode_shapes import MAX_TOKENS, serves

__all__ = ["MAX_TOKENS", "decode_attention", "splits_for"]

BLOCK = 64  # slots per step
WARPS = 4
STAGES = 3  # Triton's software pipelining of the slot loop
_SMS: dict[int, int] = {}


def _setting(name: str, default: int) -> int:
    """``PIPESPEC_ATTN_<NAME>`` or the default: measurements (scripts/gpu_forward.py) vary these per layout."""
    value = os.environ.get(f"PIPESPEC_ATTN_{name}")
    return int(value) if value else default


def _rows_block(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))  # tl.dot wants >= 16 rows


def splits_for(kv_heads: int, rows: int, kv: int, sms: int, block: int) -> int:
    """How many slot ranges per (kv head, row block): enough programs to fill the GPU's SMs once, at most one range
    per ``block`` slots. ``PIPESPEC_ATTN_SPLITS`` overrides it (as ``_BLOCK``, ``_WARPS``, ``_STAGES`` do theirs)."""
    forced = _setting("SPLITS", 0)
    if forced:
        return forced
    programs = kv_heads * triton.cdiv(rows, _rows_block(rows))
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(kv, block), 16))


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's interpreter (CPU tests): no launch options


def _launch_options() -> dict[str, int]:
    return {} if _INTERPRET else {"num_warps": _setting("WARPS", WARPS), "num_stages": _setting("STAGES", STAGES)}


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, out_ptr, ws_ptr, ml_ptr,
                 N, KV, G, SPAN, scale,
                 sq_h, sq_n, sk_h, sk_s, sv_h, sv_s, sm_n, so_n, so_h,
                 HD: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr, N_POW: tl.constexpr,
                 SPLITS: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0)
    rb = tl.program_id(1)
    sp = tl.program_id(2)
    rows = rb * R + tl.arange(0, R)
    rows_ok = rows < G * N
    head = c * G + rows // N
    tok = rows % N
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + head[:, None] * sq_h + tok[:, None] * sq_n + d[None, :], mask=rows_ok[:, None], other=0.0)
    pn = tl.arange(0, N_POW)
    filled = tl.minimum(tl.max(tl.load(pos_ptr + pn, mask=pn < N, other=0), axis=0) + 1, KV)
    lo = sp * SPAN
    hi = tl.minimum(lo + SPAN, filled)
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], dtype=tl.float32)
    acc = tl.zeros([R, HD], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_S)
    for start in range(lo, hi, BLOCK_S):
        slots = start + offs
        s_ok = slots < hi
        # the step's three loads issued together: one memory latency a step, not three in a row
        k = tl.load(k_ptr + c * sk_h + slots[:, None] * sk_s + d[None, :], mask=s_ok[:, None], other=0.0)
        v = tl.load(v_ptr + c * sv_h + slots[:, None] * sv_s + d[None, :], mask=s_ok[:, None], other=0.0)
        bias = tl.load(mask_ptr + tok[:, None] * sm_n + slots[None, :], mask=rows_ok[:, None] & s_ok[None, :],
                       other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale + bias.to(tl.float32)  # [R, BLOCK_S] fp32
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * so_n + head[:, None] * so_h + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rows_ok[:, None])
    else:  # partials of (head, token) row at [row, split]: rows indexed head * N + tok
        flat = head * N + tok
        tl.store(ws_ptr + (flat[:, None] * SPLITS + sp) * HD + d[None, :], acc, mask=rows_ok[:, None])
        tl.store(ml_ptr + (flat * SPLITS + sp) * 2, m_i, mask=rows_ok)
        tl.store(ml_ptr + (flat * SPLITS + sp) * 2 + 1, l_i, mask=rows_ok)


@triton.jit
def _combine_kernel(ws_ptr, ml_ptr, out_ptr, N, so_n, so_h, HD: tl.constexpr, SPLITS: tl.constexpr):
    flat = tl.program_id(0)  # head * N + tok
    head = flat // N
    tok = flat % N
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, HD)
    m = tl.load(ml_ptr + (flat * SPLITS + sp) * 2)  # [SPLITS]; -inf where a range held no filled slot
    l = tl.load(ml_ptr + (flat * SPLITS + sp) * 2 + 1)
    big = tl.max(m, axis=0)  # finite: slot pos is always visible
    w = tl.exp(m - big)
    acc = tl.load(ws_ptr + (flat * SPLITS + sp[:, None]) * HD + d[None, :])  # [SPLITS, HD]
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + tok * so_n + head * so_h + d, o.to(out_ptr.dtype.element_ty))


@torch.library.custom_op("pipespec::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """q [h, n, hd] (any strides, last dim contiguous), k/v [1, kvh, kv, hd] (the cache's first kv slots), mask
    [1, 1, n, kv] additive (0 / -inf; causal, so slots past max(pos) are -inf for every row), pos [n] int64
    -> [n, h, hd] in q's dtype: softmax(q k^T / sqrt(hd) + mask) v, query head j reading kv head j // (h / kvh)."""
    h, n, hd = q.shape
    kvh, kv = k.shape[1], k.shape[2]
    if not serves(n, hd):
        raise ValueError(f"decode_attention serves 1-{MAX_TOKENS} tokens at a power-of-two head size >= 16, "
                         f"not {n} tokens of {hd}")
    g = h // kvh
    out = torch.empty((n, h, hd), dtype=q.dtype, device=q.device)
    rows = g * n
    r = _rows_block(rows)
    dev = q.device.index if q.device.index is not None else 0
    if q.device.type == "cuda" and dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(q.device).multi_processor_count
    block = _setting("BLOCK", BLOCK)
    # a power of two (tl.arange in the combine); a range past the filled slots stores an empty partial
    splits = triton.next_power_of_2(splits_for(kvh, rows, kv, _SMS.get(dev, 1), block))
    span = triton.cdiv(triton.cdiv(kv, splits), block) * block
    ws = ml = out  # unused with one split
    if splits > 1:  # every (row, split) is written by exactly one program: no fill kernel
        ws = torch.empty((h * n, splits, hd), dtype=torch.float32, device=q.device)
        ml = torch.empty((h * n, splits, 2), dtype=torch.float32, device=q.device)
    k3, v3, m2 = k[0], v[0], mask[0, 0]
    grid = (kvh, triton.cdiv(rows, r), splits)
    _attn_kernel[grid](q, k3, v3, m2, pos, out, ws, ml, n, kv, g, span, hd ** -0.5,
                       q.stride(0), q.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1), m2.stride(0),
                       out.stride(0), out.stride(1),
                       HD=hd, R=r, BLOCK_S=block, N_POW=triton.next_power_of_2(n), SPLITS=splits,
                       PREC="ieee" if q.dtype == torch.float32 else "tf32", **_launch_options())
    if splits > 1:
        _combine_kernel[(h * n,)](ws, ml, out, n, out.stride(0), out.stride(1), HD=hd, SPLITS=splits)
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    h, n, hd = q.shape
    return q.new_empty((n, h, hd))
