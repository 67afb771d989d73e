"""Weight-only 8- and 4-bit linears: bf16 weights quantized at load time, activations and accumulation stay wide.

A ``QuantWeight`` holds ``q [out, in]`` (int8, or fp8 e4m3) and ``scale [out]`` (float32, one per output channel,
symmetric: ``w ~= q * scale[:, None]``; int8 maps the row's max |w| to 127, fp8 to 448, e4m3's largest finite).
``linear(x, w, b)`` is ``F.linear`` for a plain tensor and the quantized product for a ``QuantWeight``:

    y[m, n] = (sum_k x[m, k] * q[n, k]) * scale[n] + b[n]

int4 (weight-only, group-wise): ``q [out, in / 2]`` uint8, two weights a byte (even k in the low nibble, odd k in
the high one, each stored as q + 8 in [1, 15]), and ``scale [out, ceil(in / group)]`` float32, one per ``group``
(128) consecutive inputs of a row, the last group of a row shorter when ``in`` is not a multiple:

    y[m, n] = sum_g (sum_{k in g} x[m, k] * q[n, k]) * scale[n, g] + b[n]

The range is symmetric, [-7, 7] with scale = the group's max |w| / 7: the largest weight maps exactly and the
round trip is within half a step; [-8, 7] would buy one level on the negative side only (a biased grid, or a clip of
the largest positive weight). Scales stay float32 (exact, as for int8): 4 bytes / 128 weights is 0.03 byte a weight
on top of 0.5 (bf16 scales would save 3 % of the bytes read; not worth a second rounding before it is measured).

Which kernel computes it is a process-wide choice (``set_backend`` or ``PIPESPEC_QLINEAR``), read when a forward is
traced or captured:

- ``auto``: on CUDA where Triton imports, ``wgemm`` for an int8 / fp8 weight at ``GEMM_ROWS`` rows (by default
  past 16), else ``triton`` up to ``CHUNKED_MAX_TOKENS`` rows (once per 16 past 16: int4, or the GEMM turned off);
  else ``torch``.
- ``wgemm``: our GEMM (``triton_wgemm``) at any number of rows: each weight byte read once per block of rows and
  converted in registers, ``tl.dot`` on the tensor cores. int8 and fp8; int4 takes the torch path.
- ``triton``: our GEMV (``triton_gemv``): reads each weight byte once, converts in registers, fp32 accumulation.
  Two versions (``set_gemv`` or ``PIPESPEC_WGEMV``): ``v1`` and ``splitk`` (split-K, deterministic two-pass
  reduction), and ``mixed``, the default: splitk for one token, where it measured faster on an H200, v1 for more.
  At 1-16 tokens a forward is bound by weight bytes, so halving them is the whole gain.
- ``torch``: gpt-fast's ``F.linear(x, q.to(x.dtype)) * scale``. Eager it writes a bf16 copy of the weight first
  (slower than bf16 on a GPU); under torch.compile inductor may fuse the conversion. The CPU's path: the same math.
- int4: ``triton`` is ``triton_gemv.wgemv4_splitk`` (split-K, each weight group unpacked once for every token,
  group scales in the loop) under ``splitk`` and ``mixed``, for 1-16 tokens: the older ``wgemv4`` (v1's structure)
  measured 600-1400 GB/s at one token and 2-3x slower at 4-16 on an H200, so it serves only ``v1``. ``torch`` (and
  ``int8pack``) dequantizes to x's dtype and calls ``F.linear``: correct, not fast.
- ``int8pack``: ``torch._weight_int8pack_mm`` (int8 only). Torch's CUDA kernel (added in 2.9-ish) gives one output
  element to one thread, uncoalesced (pytorch#190529 rewrites it); measured by scripts/gpu_quant.py, not the default.

Losslessness is relative to the quantized target: the chain's output equals the quantized target decoding alone,
greedy. These kernels are not batch-invariant: a row's logits differ in the last bits between a one-token forward
(split-K GEMV), a 2-16-token window (v1 GEMV) and more rows (the GEMM), so under sampling the coupled rule's choice
can flip at a near-tie and seed-for-seed equality with ``ar`` is not guaranteed on CUDA (measured: a tiny int8
target's sampled ``sd`` left ``ar`` at token 18 of 128, with the GEMM and without it). The distribution is the
target's, up to that rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["BACKENDS", "CHUNKED_MAX_TOKENS", "GEMVS", "INT4_GROUP", "KINDS", "QuantWeight", "by_rows", "dequantize",
           "fast_rows", "gemv", "linear", "parse_quantize", "quantize", "set_backend", "set_gemv", "unpack_int4"]

KINDS = ("int8", "fp8", "int4")
INT4_GROUP = 128  # inputs per int4 scale (GPTQ/AWQ's usual size: 3 % of scale bytes over the 4-bit payload)
BACKENDS = ("auto", "triton", "wgemm", "torch", "int8pack")
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}  # the largest magnitude each format holds exactly (e4m3fn: 448)
_TRITON_MAX_TOKENS = 16  # the GEMV kernels serve 1..16 rows (tokens) per launch
# Up to this many rows ``auto`` runs the GEMV once per 16 rows rather than the torch path: that path converts the
# whole weight to x's dtype per call (5 bytes moved per weight against the GEMV's 1), so a 70B forward of 17-128 rows
# cost ~215 ms on an H200 against ~23 ms per 16 rows by GEMV. Past it the torch path's matmul wins (a long prompt).
# Settable for measurements (scripts/gpu_quant_rows.py); 16 is the behaviour before chunking.
CHUNKED_MAX_TOKENS = 64


def _gemm_rows(spec: str) -> tuple[int, int]:
    """``PIPESPEC_WGEMM_ROWS``: "LO-HI" or "LO-" (rows that take the GEMM under ``auto``), or "off"."""
    if spec == "off":
        return (1 << 62, 0)
    lo, _, hi = spec.partition("-")
    try:
        return int(lo), int(hi) if hi else 1 << 62
    except ValueError:
        raise ConfigError(f"PIPESPEC_WGEMM_ROWS={spec!r}: use LO-HI, LO- or off (e.g. 17-)") from None


# Under ``auto`` on CUDA, an int8 / fp8 linear of this many rows (inclusive) runs the Triton GEMM
# (``triton_wgemm``): one pass over the weight bytes, converted in registers, instead of the GEMV once per 16 rows
# or the torch path's bf16 copy of the weight per call. ``PIPESPEC_WGEMM_ROWS`` sets it ("LO-HI", or "off").
# Measured on an H200 (scripts/gpu_quant_rows.py --compare gemm, whole forward, CUDA-graph replay; docs/benchmarks.md):
# faster than both at every count past 16 rows: the 70B in int8 46.0 -> 33.2 ms at 17 rows, 92.5 -> 44.6 at 64,
# 218.2 -> 56.5 at 65, 293.3 -> 181.1 at 512; the 7B 6.8 -> 5.5 at 17, 22.8 -> 8.0 at 65. So from 17 rows.
# None: read from the environment at the first quantized forward (a malformed value is a stage's one-line error then,
# not an import failure); scripts and tests set it directly
GEMM_ROWS: tuple[int, int] | None = None


def gemm_rows() -> tuple[int, int]:
    """``GEMM_ROWS``, read from ``PIPESPEC_WGEMM_ROWS`` the first time (default: from 17 rows, no upper end)."""
    global GEMM_ROWS
    if GEMM_ROWS is None:
        GEMM_ROWS = _gemm_rows(os.environ.get("PIPESPEC_WGEMM_ROWS", f"{_TRITON_MAX_TOKENS + 1}-"))
    return GEMM_ROWS

_backend = os.environ.get("PIPESPEC_QLINEAR", "auto")
# which Triton GEMV the ``triton`` backend calls: ``splitk`` (v2: split-K, deterministic two-pass reduction; its own
# tuner picks tiles once per shape), ``v1`` (one program per output tile over all of K), or ``mixed``: splitk for one
# token, v1 for 2-16. Measured on an H200 (scripts/gpu_quant.py --gemv, int8, docs/benchmarks.md): splitk won at one
# token on every shape timed (70B down 0.075 vs 0.090 ms, qkv 0.035 vs 0.039, gate_up 0.136 vs 0.140; 7B 8-27 %) and
# lost at 4-16 tokens on all but 7B down (70B gate_up 0.150 vs 0.118 ms). The whole 70B forward on one H200
# (compile-layer, CUDA graphs): int8 1 token 28.7 ms with v1 -> 26.0 with ``mixed`` (8 tokens 25.5 -> 25.4: v1 both
# times), fp8 26.2 -> 24.9. So ``mixed`` is the default.
GEMVS = ("splitk", "v1", "mixed")
_gemv = os.environ.get("PIPESPEC_WGEMV", "mixed")


@dataclass(frozen=True, slots=True, eq=False)
class QuantWeight:
    """One quantized weight matrix. int8/fp8: q [out, in] int8 or float8_e4m3fn, scale [out] float32. int4: q
    [out, in / 2] uint8 (two weights a byte), scale [out, ceil(in / group)] float32; ``group`` is 0 for int8/fp8."""

    q: torch.Tensor
    scale: torch.Tensor
    kind: str
    group: int = 0

    @property
    def shape(self) -> torch.Size:
        """The logical [out, in] (int4's q holds half as many columns)."""
        return torch.Size((self.q.shape[0], 2 * self.q.shape[1])) if self.kind == "int4" else self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()


@torch.no_grad()  # a scale that required grad would hold the float32 blocks and ``w`` alive through its graph
def quantize(w: torch.Tensor, kind: str, group: int = INT4_GROUP) -> QuantWeight:
    """w: [out, in] floating -> QuantWeight, symmetric per output channel (int8, fp8) or per ``group`` inputs of a
    row (int4). Row by row blocks bound the fp32 copy."""
    if kind not in _QMAX:
        raise ValueError(f"unknown quantization {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "int4":
        return _quantize_int4(w, group)
    qmax = _QMAX[kind]
    out_dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn
    q = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(1, w.shape[1]))  # ~64 MiB of fp32 at a time
    for r in range(0, w.shape[0], step):
        block = w[r:r + step].float()  # [rows, in]
        s = block.abs().amax(dim=1).clamp(min=1e-12) / qmax  # [rows]; an all-zero row gets a tiny scale, q = 0
        scaled = block / s[:, None]
        if kind == "int8":
            q[r:r + step] = scaled.round().clamp(-127, 127).to(torch.int8)
        else:  # the cast rounds to nearest; |scaled| <= 448 by construction
            q[r:r + step] = scaled.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
        scale[r:r + step] = s
    return QuantWeight(q, scale, kind)


def _quantize_int4(w: torch.Tensor, group: int) -> QuantWeight:
    """int4 of ``quantize``: scale [out, groups] = the group's max |w| / 7, q = round(w / scale) in [-7, 7], packed."""
    out, k = w.shape
    if k % 2 or group < 2 or group % 2:
        raise ValueError(f"int4 packs two weights a byte: in ({k}) and group ({group}) must be even")
    groups = -(-k // group)
    q = torch.empty((out, k // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((out, groups), dtype=torch.float32, device=w.device)
    step = max(1, (1 << 24) // max(1, k))  # ~64 MiB of fp32 at a time
    for r in range(0, out, step):
        block = w[r:r + step].float()  # [rows, in]
        rows = block.shape[0]
        padded = F.pad(block, (0, groups * group - k)).view(rows, groups, group)  # the tail group padded with zeros
        s = padded.abs().amax(dim=2).clamp(min=1e-12) / 7.0  # [rows, groups]; an all-zero group: q = 0
        qi = (padded / s[:, :, None]).round().clamp(-7, 7).view(rows, groups * group)[:, :k].to(torch.int16) + 8
        q[r:r + step] = (qi[:, 0::2] | (qi[:, 1::2] << 4)).to(torch.uint8)  # [rows, in / 2]: even k low, odd high
        scale[r:r + step] = s
    return QuantWeight(q, scale, "int4", group)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in / 2] uint8 -> [out, in] int8 in [-8, 7] (quantize writes [-7, 7])."""
    lo = (q & 0xF).to(torch.int8) - 8
    hi = (q >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=2).view(q.shape[0], 2 * q.shape[1])


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] in ``dtype``: q * scale, computed in float32 (float64 when asked for: exact)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if w.kind == "int4":  # row blocks of ~16M weights: the wide temporaries stay ~200 MiB whatever the matrix
        out, k = w.shape
        result = torch.empty((out, k), dtype=dtype, device=w.q.device)
        step = max(1, (1 << 24) // max(1, k))
        for r in range(0, out, step):
            q = unpack_int4(w.q[r:r + step]).to(wide)  # [rows, in]
            scale = w.scale[r:r + step].to(wide).repeat_interleave(w.group, dim=1)[:, :k]  # [rows, in]: each group's
            result[r:r + step] = q * scale
        return result
    return (w.q.to(wide) * w.scale.to(wide)[:, None]).to(dtype)


def set_backend(name: str) -> None:
    """Choose the quantized-linear kernel for this process (graphs captured earlier keep theirs)."""
    global _backend
    if name not in BACKENDS:
        raise ConfigError(f"unknown quantized-linear backend {name!r}: use one of {', '.join(BACKENDS)}")
    _backend = name


def set_gemv(name: str) -> None:
    """Choose the Triton GEMV (``GEMVS``) of the ``triton`` backend for this process (captured graphs keep theirs)."""
    global _gemv
    if name not in GEMVS:
        raise ConfigError(f"unknown Triton GEMV {name!r}: use one of {', '.join(GEMVS)}")
    _gemv = name


def gemv() -> str:
    """The Triton GEMV the ``triton`` backend calls now."""
    return _gemv


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x: [n, in] -> [n, out]; ``F.linear`` unless ``w`` is quantized."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, b)
    backend = _backend
    if backend == "auto":
        rows, (lo, hi) = x.shape[0], gemm_rows()
        if not (x.is_cuda and _triton_ok()):
            backend = "torch"
        elif lo <= rows <= hi and w.kind != "int4":
            backend = "wgemm"
        else:
            backend = "triton" if rows <= CHUNKED_MAX_TOKENS else "torch"
    if backend == "wgemm" and w.kind != "int4":
        from . import triton_wgemm

        return triton_wgemm.wgemm(x, w.q, w.scale, b)
    if backend == "triton" and _gemv_serves(w):
        if x.shape[0] > _TRITON_MAX_TOKENS:
            return by_rows(lambda part: _gemv_linear(part, w, b), x, _TRITON_MAX_TOKENS)
        return _gemv_linear(x, w, b)
    if backend == "int8pack" and w.kind == "int8":
        y = torch._weight_int8pack_mm(x.contiguous(), w.q, w.scale.to(x.dtype))  # [n, out]
        return y if b is None else y + b
    if w.kind == "int4":  # torch (and int8pack's fallback): unpack, apply the group scales, one matmul. The weight is
        # rounded to x's dtype once (as a model holding dequantize(w, x.dtype) would be); a wide copy per call: the
        # CPU's path and a reference, not a fast one
        return F.linear(x, dequantize(w, x.dtype), b)
    # torch (and int8pack's fallback for fp8): exact conversion of q to x's dtype (|q| <= 127 fits bf16's 8-bit
    # significand; e4m3 values are bf16 values), one matmul, then the per-channel scale on the output
    y = F.linear(x, w.q.to(x.dtype)) * w.scale.to(x.dtype)
    return y if b is None else y + b


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn`` over ``x`` in slices of at most ``rows`` rows, concatenated (``fn`` maps [m, in] -> [m, out] row-wise)."""
    return torch.cat([fn(x[i:i + rows]) for i in range(0, x.shape[0], rows)])


def _gemv_serves(w: QuantWeight) -> bool:
    """Whether a Triton GEMV serves ``w`` (int4 needs groups that are a multiple of 32; else the torch path)."""
    if w.kind != "int4":
        return True
    from . import triton_gemv

    return bool(triton_gemv.int4_block_k(w.group))


def _gemv_linear(x: torch.Tensor, w: QuantWeight, b: torch.Tensor | None) -> torch.Tensor:
    """One Triton GEMV launch for 1..16 rows of ``x``."""
    from . import triton_gemv

    if w.kind == "int4":
        if _gemv == "v1" or not triton_gemv.int4_splitk_ok(x.shape[-1], w.group):
            return triton_gemv.wgemv4(x, w.q, w.scale, b, w.group)
        return triton_gemv.wgemv4_splitk(x, w.q, w.scale, b, w.group)
    use_v1 = _gemv == "v1" or (_gemv == "mixed" and x.shape[0] > 1)
    kernel = triton_gemv.wgemv if use_v1 else triton_gemv.wgemv_splitk
    return kernel(x, w.q, w.scale, b)


def fast_rows(device: torch.device) -> int | None:
    """The most rows (tokens) a quantized linear on ``device`` serves in ONE GEMV launch: past them a forward costs
    the GEMM (a 70B in int8 on an H200: 23.3 ms for 16 rows, 33.2 for 17, 44.6 for 64; int4: one GEMV launch per 16
    rows up to ``CHUNKED_MAX_TOKENS``, then the torch path, which converts the whole weight per call, ~215 ms). None
    where no such step exists (the torch path at every size)."""
    if device.type != "cuda" or _backend not in ("auto", "triton") or not _triton_ok():
        return None
    return _TRITON_MAX_TOKENS


_TRITON: bool | None = None


def _triton_ok() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_gemv  # noqa: F401

            _TRITON = True
        except Exception:  # noqa: BLE001 - no Triton (CPU wheels, other platforms): the torch path serves
            _TRITON = False
    return _TRITON


def parse_quantize(spec: str | None, n_models: int) -> list[str | None]:
    """The quantization of every model of a chain (smallest first), from what the user typed.

    ``None``/``""``/``none`` -> none; ``int8`` -> every model; ``target=fp8`` -> the target only; ``none,int8,int8``
    -> one entry per model in chain order.
    """
    if spec is None or spec.strip().lower() in ("", "none", "bf16", "off"):
        return [None] * n_models
    text = spec.strip().lower()

    def kind(word: str) -> str | None:
        word = word.strip()
        if word in ("none", "bf16", "-", ""):
            return None
        if word not in KINDS:
            raise ConfigError(f"--quantize: unknown kind {word!r}: use {', '.join(KINDS)} or none")
        return word

    if "=" in text:
        who, _, what = text.partition("=")
        if who.strip() != "target" or "," in what:
            raise ConfigError(f"--quantize {spec!r}: write target=KIND, KIND (every model) or a comma list "
                              "with one KIND or none per model")
        return [None] * (n_models - 1) + [kind(what)]
    parts = text.split(",")
    if len(parts) == 1:
        return [kind(parts[0])] * n_models
    if len(parts) != n_models:
        raise ConfigError(f"--quantize {spec!r} has {len(parts)} entries for {n_models} models")
    return [kind(p) for p in parts]
