"""Compute kernels of the static path that torch does not ship in the form we need.

``quant`` (weight-only 8-bit weights: quantize at load time, ``linear`` that dispatches on a quantized weight, the
CPU's eager fallback), ``triton_gemv`` (the CUDA kernel for few-token forwards: int8 or fp8 weights, per-output-
channel scales, fp32 accumulation), ``triton_attention`` (attention of 1-16 new tokens over the filled cache),
``triton_elementwise`` (a layer's residual add + RMSNorm, RoPE + cache write, SiLU * up) and ``decode_shapes``
(what the attention kernel serves, importable without Triton). Kernels are pure functions of tensors: no
threads, no model objects.
"""

from .quant import BACKENDS, KINDS, QuantWeight, dequantize, linear, parse_quantize, quantize, set_backend

__all__ = ["BACKENDS", "KINDS", "QuantWeight", "dequantize", "linear", "parse_quantize", "quantize", "set_backend"]
