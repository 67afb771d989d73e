"""What the decode-attention kernel (``triton_attention``) serves, as a pure rule importable without Triton: the
static path routes a forward by it (``static_llama._attend``), the kernel refuses anything else by the same rule."""

from __future__ import annotations

__all__ = ["MAX_TOKENS", "serves"]

MAX_TOKENS = 16  # new tokens a call (decode and verify); a prefill takes the math layout


def serves(n: int, head_dim: int) -> bool:
    """Whether the kernel takes ``n`` new tokens at this head size (a power of two >= 16, as its tl.arange and tl.dot
    need)."""
    return 1 <= n <= MAX_TOKENS and head_dim >= 16 and head_dim & (head_dim - 1) == 0
