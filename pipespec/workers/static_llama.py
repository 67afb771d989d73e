"""The LLaMA-family forward pass over a static KV cache, for CUDA-graph capture (the fast path).

One forward serves the decoder-only models built like LLaMA: ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM``. What differs between them is small and described by a ``Family``
(per-head q/k RMSNorm before RoPE, where a sliding window is read); biases are read off the modules themselves
(Qwen2's q/k/v biases, LLaMA's optional ``attention_bias`` / ``mlp_bias``).

It reuses the weights of the loaded HF model (q/k/v and gate/up, with their biases, are fused once; the HF modules
are re-pointed at views of the fused tensors, so no weight is stored twice and the HF model keeps working) and HF's
own rotary-embedding module (so every RoPE variant HF supports gives the same cos/sin tables).

Shapes are static per call signature: ``n`` tokens at positions ``pos`` attend to the first ``kv_len`` cache slots
through a mask ``slot <= pos`` (and ``slot > pos - window`` on sliding-window layers). Slots past the valid length
may hold junk from padding or from tokens since rolled back; the mask never lets a position see a slot it has not
itself written, so a rollback only moves a length. The whole history stays in the cache: a window is only a mask.

With ``quantize`` ("int8", "fp8" or "int4", weight-only: ``pipespec.kernels.quant``) the fused qkv, o, gate_up and down
weights are quantized as each layer is fused, and the HF modules' copies are dropped (re-pointed at meta tensors:
the HF model no longer runs on its own). Embeddings, norms and lm_head stay in the model's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.decode_shapes import MAX_TOKENS as TRITON_ATTENTION_MAX_TOKENS, serves as triton_attention_serves
from ..kernels.quant import QuantWeight, linear, quantize as quantize_weight

# Attention kernels allowed on the static path: both take an explicit mask, both are safe to capture in CUDA
# graphs. (cuDNN's attention was seen failing inside a capture on an H100; flash attention takes no mask.)
_ATTENTION_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

__all__ = ["FAMILIES", "VARIANTS", "Family", "StaticLlama", "Variant", "choose_variant", "family_of", "supports_static"]


@dataclass(frozen=True, slots=True)
class Variant:
    """How the static forward is laid out in kernels. Every variant computes the same model (in float64 they agree
    with HF's forward to 1e-8; in bf16 they differ by roundings: fused reductions, one rounding in place of two).

    Per layer of a 1-token forward the base layout launches ~35 kernels (RMSNorm in fp32: 8 each; RoPE by neg + cat:
    5; SDPA turning the bool mask into an additive one: 3), which in a CUDA graph on Hopper cost ~2 us each."""

    mask: str = "float"  # "bool": SDPA converts it in every layer; "float": additive 0/-inf, built once per forward
    fused: bool = True  # RMSNorm through F.rms_norm (one kernel on CUDA), RoPE as flip + addcmul (3 kernels, not 5)
    # "sdpa" (the efficient kernel), "math" (bmm, softmax, bmm: GQA without copies) or "triton" (one flash-decoding
    # kernel that reads only the filled slots, kernels/triton_attention.py; CUDA; prefills take "math")
    attention: str = "sdpa"
    # None: eager; "parts": _pre/_post_attention compiled with dynamic shapes (one compile serves every bucket);
    # "layer": the whole layer (norms, GEMMs, RoPE, cache writes, attention) compiled, our graphs capture it
    compile: str | None = None
    dynamic: bool = True  # "layer": shapes turn dynamic where they change (~3 compiles in all) or one per bucket
    mode: str | None = None  # "layer": torch.compile's mode (None: default; "max-autotune-no-cudagraphs")
    # "torch": the element-wise work in torch's kernels; "triton": residual add + RMSNorm, RoPE + the cache write and
    # SiLU * up in three Triton kernels (kernels/triton_elementwise.py; CUDA; eager layouts only, and not for
    # families with q/k norms, which keep the torch path)
    elementwise: str = "torch"


VARIANTS: dict[str, Variant] = {
    "base": Variant(mask="bool", fused=False),  # the layout before issue 16
    "lean": Variant(),
    "lean-math": Variant(attention="math"),
    "compile-parts": Variant(mask="bool", fused=False, compile="parts"),  # the earlier compile=True
    "compile-layer": Variant(compile="layer"),
    "compile-layer-math": Variant(attention="math", compile="layer"),
    "compile-layer-static": Variant(compile="layer", dynamic=False),
    "compile-layer-autotune": Variant(compile="layer", dynamic=False, mode="max-autotune-no-cudagraphs"),
    "lean-triton": Variant(attention="triton"),
    "compile-layer-triton": Variant(attention="triton", compile="layer"),
    "lean-fused": Variant(attention="triton", elementwise="triton"),
}
# The variant a static worker runs: ``PIPESPEC_STATIC_VARIANT=<name>`` overrides all three. Measured on an H200
# (scripts/gpu_forward.py, docs/benchmarks.md, 1-token forward, 512 tokens of context): 7B base 6.78 ms, lean 5.92,
# lean-math 5.54, compile-layer 5.31, compile-layer-math 4.69 (floor 3.21); 13B 10.52 / 9.43 / 9.11 / 8.69 / 8.07
# (floor 6.21). Then the Triton attention (seventh session): 7B lean-triton 5.09, compile-layer-triton 4.50; 13B
# 8.40 / 7.64. Then the element-wise kernels (eighth session, 1 / 8 tokens): lean-fused 7B 4.30 / 4.41 (lean-triton
# 5.01 / 5.35), 13B 7.54 / 7.72 (8.31 / 9.00), the drafts 68M 0.112 / 0.126 (0.148 / 0.174) and 1B 0.98 / 1.03
# (1.31 / 1.47). CUDA's default is the fastest layout that compiles nothing (lean-fused; lean-math where Triton does
# not import); it is as fast as the compiled one, which compiles each layer on first use of a shape (3-10 s per
# model, more as shapes vary), during the first generation: opt-in (fast="compile" or PIPESPEC_STATIC_VARIANT).
CPU_VARIANT = "lean"
CUDA_VARIANT = "lean-fused"
COMPILED_VARIANT = "compile-layer-triton"  # fast="compile" (StaticWorker(compile=True))
WITHOUT_TRITON = {"lean-triton": "lean-math", "lean-fused": "lean-math",
                  "compile-layer-triton": "compile-layer-math"}  # fallbacks of the layouts that need Triton


def triton_attention_available() -> bool:
    """Whether the Triton attention's module imports (registering ``torch.ops.pipespec.decode_attention``)."""
    try:
        from ..kernels import triton_attention  # noqa: F401
    except ImportError:
        return False
    return True


def require_attention(variant: Variant, device: torch.device) -> None:
    """Raise ValueError where ``variant``'s Triton kernels (attention, element-wise) cannot run on ``device``;
    registers their ops."""
    if variant.elementwise not in ("torch", "triton"):
        raise ValueError(f"unknown elementwise {variant.elementwise!r}")
    if variant.attention != "triton" and variant.elementwise != "triton":
        return
    what = "attention 'triton'" if variant.attention == "triton" else "elementwise 'triton'"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter: CPU tests
        raise ValueError(f"{what} runs on CUDA, not on {device}")
    if not triton_attention_available():
        raise ValueError(f"{what} needs Triton, which does not import here")
    if variant.elementwise == "triton":
        from ..kernels import triton_elementwise  # noqa: F401 - registers torch.ops.pipespec.rms_norm etc.


def choose_variant(device: torch.device, compile: bool = False) -> str:
    """The variant's name for a worker on ``device``; ``compile``: the caller asked for torch.compile. A default
    with the Triton attention falls back to its math layout where Triton does not import; a name the user set
    (``PIPESPEC_STATIC_VARIANT``) is taken as it is."""
    name = os.environ.get("PIPESPEC_STATIC_VARIANT") or default_variant(device, compile)
    if name not in VARIANTS:
        raise ValueError(f"PIPESPEC_STATIC_VARIANT={name!r}: use one of {', '.join(VARIANTS)}")
    return name


def default_variant(device: torch.device, compile: bool = False) -> str:
    """The layout pipespec picks for ``device`` (``compile``: torch.compile asked for): the Triton attention's on
    CUDA where Triton imports, its math layout otherwise."""
    name = COMPILED_VARIANT if compile else CUDA_VARIANT if device.type == "cuda" else CPU_VARIANT
    if name in WITHOUT_TRITON and not (device.type == "cuda" and triton_attention_available()):
        name = WITHOUT_TRITON[name]
    return name


@dataclass(frozen=True, slots=True)
class Family:
    """How one HF architecture departs from the plain LLaMA forward."""

    qk_norm: bool = False  # RMSNorm over head_dim of every q and k head, before RoPE (``self_attn.q_norm/k_norm``)
    # where a layer's sliding window comes from: None (never windowed), "config" (``config.sliding_window`` on every
    # layer: Mistral), "layer" (the attention module's own ``sliding_window``, set from ``config.layer_types``: Qwen)
    window: str | None = None


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(window="config"),
    "Qwen2ForCausalLM": Family(window="layer"),
    "Qwen3ForCausalLM": Family(qk_norm=True, window="layer"),
}


def family_of(model: Any) -> Family | None:
    """The family of the nearest supported class in the model's MRO (subclasses of a supported model count)."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


def supports_static(model: Any, layers_later: bool = False) -> str | None:
    """None when ``model`` can run on the static path, else the reason it cannot. ``layers_later``: the decoder
    layers may still be on the meta device (StaticLlama's ``prepare_layer`` materialises them one at a time)."""
    family = family_of(model)
    if family is None:
        return f"{type(model).__name__} is not one of {', '.join(FAMILIES)}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(cfg, "quantization_config", None) is not None:
        return "quantized weights"
    layer_params = {id(p) for p in model.model.layers.parameters()} if layers_later else set()
    if any(p.device.type == "meta" and id(p) not in layer_params for p in model.parameters()):
        return "weights offloaded to the meta device"
    for layer in model.model.layers:  # a model may be split over devices, but each layer must sit on one
        if len({p.device for p in layer.parameters()}) > 1:
            return "a layer split over several devices"
        if family.qk_norm and not (hasattr(layer.self_attn, "q_norm") and hasattr(layer.self_attn, "k_norm")):
            return "q/k norms expected but not found on the attention module"
    return None


def layer_windows(model: Any, family: Family) -> list[int | None]:
    """The sliding window of every layer (None: full causal attention), as HF's own forward applies it."""
    cfg = model.config
    layers = model.model.layers
    if family.window == "config":
        return [getattr(cfg, "sliding_window", None)] * len(layers)
    if family.window == "layer":
        return [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    return [None] * len(layers)


def model_devices(model: Any) -> list[torch.device]:
    """The distinct devices a model's weights live on, in layer order (more than one: split layer-wise)."""
    seen: list[torch.device] = []
    for p in model.parameters():
        if p.device not in seen:
            seen.append(p.device)
    return seen


class StaticLlama:
    """Callable as ``forward(ids [n], pos [n], kv_len) -> logits [n, vocab]`` (float32), for any model of
    ``FAMILIES`` (the name is historical: LLaMA came first)."""

    def __init__(self, model: Any, capacity: int, variant: str | Variant = "base", *, quantize: str | None = None,
                 prepare_layer: Callable[[Any], None] | None = None) -> None:
        """``variant``: the forward's layout (``VARIANTS``). ``prepare_layer(layer)`` runs on each decoder layer just
        before it is fused (and quantized): the loader moves a CPU-loaded layer to the GPU there, the GPU benchmark
        materialises random weights, so a model whose bf16 weights would not fit is never whole on the GPU."""
        reason = supports_static(model, layers_later=prepare_layer is not None)
        if reason is not None:
            raise ValueError(f"static path unsupported: {reason}")
        cfg = model.config
        self.model = model
        self.family = family_of(model)
        inner = model.model
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        # the attention module's own head_dim: Qwen3 sets it apart from hidden / heads (0.6B: 16 x 128 > 1024)
        attn0 = inner.layers[0].self_attn
        self.head_dim = (getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None)
                         or cfg.hidden_size // self.n_heads)
        self.eps = cfg.rms_norm_eps
        self.n_layers = cfg.num_hidden_layers
        self.windows = layer_windows(model, self.family)[: self.n_layers]  # per layer: None or a window in tokens
        self.quantize = quantize
        self.layers: list[dict[str, Any]] = []
        # no autograd: a fused (or quantized) weight built from parameters that require grad would keep a graph
        # holding every original weight (and quantize's float32 blocks) alive: twice the memory, or more
        with torch.no_grad():
            for layer in inner.layers[: self.n_layers]:
                if prepare_layer is not None:
                    prepare_layer(layer)
                self.layers.append(self._fuse(layer))
        self.layer_devices = [w["qkv"].device for w in self.layers]  # layer-wise split over GPUs is allowed
        self.devices = list(dict.fromkeys([self.device, *self.layer_devices, model.lm_head.weight.device]))
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight  # the embedding itself where the model ties them (small Qwens)
        self._pre = _pre_attention
        self._post = _post_attention
        self._layer = _layer
        self.variant = VARIANTS["base"]
        self.set_variant(variant)
        self.capacity = 0
        self.cache_k: list[torch.Tensor] = []  # one [1, kv heads, capacity, head_dim] per layer, on its device
        self.cache_v: list[torch.Tensor] = []
        self.rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # cos, sin [capacity, hd] per device
        self.ensure_capacity(capacity)

    def _fuse(self, layer: Any) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_b = _fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up, gate_up_b = _fuse_linears(mlp.gate_proj, mlp.up_proj)
        qk_norm = None
        if self.family.qk_norm:  # one [h + kvh, hd] weight: q heads use q_norm's, k heads k_norm's
            qk_norm = torch.cat([attn.q_norm.weight.expand(self.n_heads, self.head_dim),
                                 attn.k_norm.weight.expand(self.n_kv, self.head_dim)])
        o: torch.Tensor | QuantWeight = attn.o_proj.weight
        down: torch.Tensor | QuantWeight = mlp.down_proj.weight
        if self.quantize is not None:
            qkv, o, gate_up, down = (quantize_weight(w, self.quantize) for w in (qkv, o, gate_up, down))
            for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                m.weight = torch.nn.Parameter(torch.empty(m.weight.shape, dtype=m.weight.dtype, device="meta"),
                                              requires_grad=False)  # frees the bf16 copy
        return {"ln1": layer.input_layernorm.weight, "qkv": qkv, "qkv_b": qkv_b, "qk_norm": qk_norm,
                "o": o, "o_b": attn.o_proj.bias, "ln2": layer.post_attention_layernorm.weight,
                "gate_up": gate_up, "gate_up_b": gate_up_b, "down": down, "down_b": mlp.down_proj.bias,
                "ffn": mlp.gate_proj.weight.shape[0]}

    def ensure_capacity(self, capacity: int) -> bool:
        """Allocate cache and RoPE tables for ``capacity`` slots; True when (re)allocated (graphs must go)."""
        if capacity <= self.capacity:
            return False
        shape = (1, self.n_kv, capacity, self.head_dim)
        self.cache_k = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.layer_devices]
        self.cache_v = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.layer_devices]
        rotary = self.model.model.rotary_emb
        home = next(rotary.buffers()).device if any(True for _ in rotary.buffers()) else self.device
        positions = torch.arange(capacity, device=home).unsqueeze(0)  # [1, capacity]
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=home)
        cos, sin = rotary(probe, positions)  # [1, capacity, head_dim] each
        self.rope = {d: (cos[0].to(d), sin[0].to(d)) for d in self.devices}
        self.capacity = capacity
        return True

    def set_variant(self, variant: str | Variant) -> None:
        """Lay the forward out as ``variant`` (a name of ``VARIANTS`` or a ``Variant``). Graphs captured before
        must go: they replay the old kernels. Compiling happens lazily, at the next forward of each new shape."""
        v = VARIANTS[variant] if isinstance(variant, str) else variant
        require_attention(v, self.device)
        self.variant = v
        self._pre, self._post, self._layer = _pre_attention, _post_attention, _layer
        if v.compile == "parts":
            self._pre = torch.compile(_pre_attention, dynamic=True, fullgraph=True)
            self._post = torch.compile(_post_attention, dynamic=True, fullgraph=True)
        elif v.compile == "layer":
            _allow_recompiles()
            # dynamic=None ("automatic"): static at first, then symbolic in only what changed between calls (tokens,
            # context); dynamic=True would make the head counts symbolic too (and SDPA's enable_gqa a SymBool)
            self._layer = torch.compile(_layer, dynamic=None if v.dynamic else False, fullgraph=True, mode=v.mode)
        elif v.compile is not None:
            raise ValueError(f"unknown compile {v.compile!r}")
        if v.elementwise == "triton":
            if v.compile is not None:
                raise ValueError("elementwise 'triton' is an eager layout: torch.compile fuses the same work itself")
            if not self.family.qk_norm:  # q/k norms (Qwen3) sit between the projection and RoPE: the torch path
                self._layer = _layer_fused

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """ids, pos: [n] int64 on the model's device; returns logits [n, vocab] float32."""
        n = ids.shape[0]
        v = self.variant
        x = F.embedding(ids, self.embed)  # [n, hidden]
        per_device = {}  # what every layer on a device needs: positions, RoPE rows, the attention masks
        for d in self.devices:
            pos_d = pos.to(d, non_blocking=True)
            cos_t, sin_t = self.rope[d]
            slots = torch.arange(kv_len, device=d).unsqueeze(0)  # [1, kv_len]
            causal = slots <= pos_d.unsqueeze(1)  # [n, kv_len]
            # one mask per distinct window: HF's sliding window lets position p see slots p - window + 1 .. p
            masks = {w: (causal if w is None else causal & (slots > pos_d.unsqueeze(1) - w)).view(1, 1, n, kv_len)
                     for w in set(self.windows)}
            if v.mask == "float" or v.attention == "math":  # additive, once here (SDPA would convert it per layer)
                masks = {w: torch.zeros(m.shape, dtype=x.dtype, device=d).masked_fill_(~m, float("-inf"))
                         for w, m in masks.items()}
            cos = cos_t.index_select(0, pos_d).unsqueeze(1).to(x.dtype)  # [n, 1, hd]
            sin = sin_t.index_select(0, pos_d).unsqueeze(1).to(x.dtype)
            if v.fused:  # first half negated: rotate_half(x) * sin == swap_halves(x) * sin (see _rope)
                half = self.head_dim // 2
                sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            per_device[d] = (pos_d, cos, sin, masks)
        with sdpa_kernel(_ATTENTION_BACKENDS):
            x, delta = self._layers(x, per_device, kv_len)
            x = x + delta.to(x.device, non_blocking=True)  # the last layer's MLP output
        x = _rms(x.to(self.norm.device, non_blocking=True), self.norm, self.eps, v.fused)
        return F.linear(x.to(self.lm_head.device, non_blocking=True), self.lm_head).float().to(self.device)

    def _layers(self, x: torch.Tensor, per_device: dict[torch.device, Any],
                kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers: (the residual stream before the last MLP's output, that output) (``_layer``)."""
        h, kvh, hd = self.n_heads, self.n_kv, self.head_dim
        pre, post, layer = self._pre, self._post, self._layer
        fused, attention = self.variant.fused, self.variant.attention
        delta: torch.Tensor | None = None
        for i, w in enumerate(self.layers):
            d = self.layer_devices[i]
            if x.device != d:  # crossing to the next GPU of a layer-wise split: only the hidden state moves
                x = x.to(d, non_blocking=True)
                delta = delta.to(d, non_blocking=True) if delta is not None else None
            pos_d, cos, sin, masks = per_device[d]
            # the mask's width is kv_len: the layer reads the cache's first kv_len slots
            x, delta = layer(pre, post, x, delta, pos_d, cos, sin, masks[self.windows[i]], self.cache_k[i],
                             self.cache_v[i], w, h, kvh, hd, self.eps, fused, attention)
        assert delta is not None, "a model without layers"
        return x, delta

    def compile(self) -> None:
        """torch.compile the forward (``COMPILED_VARIANT``, or its math layout without Triton or off CUDA: fused
        element-wise work, fewer kernels)."""
        self.set_variant(default_variant(self.device, compile=True))


def _allow_recompiles() -> None:
    # one compilation per bucket (static), or ~3 per model of a chain sharing this process (every model's layers
    # are one function): past dynamo's default 8 it would run eagerly, silently
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 256))
    # FX's "tracing now" flag is a process-wide global: while one stage's thread compiles a new shape (AOT tracing
    # sets it), another stage's call of a compiled layer took itself for a nested trace and raised "Detected that
    # you are using FX to symbolically trace a dynamo-optimized function" (H200, a chain under compile-layer-*).
    # Our compiled layers are never called inside an FX trace: run them compiled (or, on a torch without that
    # switch, eagerly: the same model) instead of raising.
    if hasattr(dynamo_config, "force_compile_during_fx_trace"):
        dynamo_config.force_compile_during_fx_trace = True
    if hasattr(dynamo_config, "error_on_nested_fx_trace"):
        dynamo_config.error_on_nested_fx_trace = False


def _layer(pre: Any, post: Any, x: torch.Tensor, delta: torch.Tensor | None, pos: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, mask: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, w: dict[str, Any], h: int,
           kvh: int, hd: int, eps: float, fused: bool, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer over the static cache at positions pos [n]: writes the layer's k/v at ``pos`` into ck, cv
    [1, kvh, capacity, hd] and attends over the first mask.shape[-1] slots. The residual stream comes as x [n,
    hidden] plus ``delta``, the previous layer's MLP output (None in the first layer), and leaves the same way:
    (x after attention, this layer's MLP output). So the add joins this layer's first norm, and a compiled layer's
    down_proj is a plain mm (``x + mm`` would be an addmm that copies x first: a device-to-device copy a layer)."""
    if delta is not None:
        x = _add_before_norm(x, delta)
    att = _attend(pre, x, pos, cos, sin, mask, ck, cv, w, h, kvh, hd, eps, fused, attention)  # [1, h, n, hd]
    return post(x, att, w["o"], w["o_b"], w["ln2"], w["gate_up"], w["gate_up_b"], w["down"], w["down_b"],
                w["ffn"], eps, fused=fused)


def _layer_fused(pre: Any, post: Any, x: torch.Tensor, delta: torch.Tensor | None, pos: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
                 w: dict[str, Any], h: int, kvh: int, hd: int, eps: float, fused: bool,
                 attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``_layer`` with its element-wise work in Triton kernels (``Variant.elementwise == "triton"``): the same
    arithmetic and roundings as the fused torch layout, about half the kernels. ``pre`` and ``post`` are unused
    (the layer is written out here); cos and sin come [n, 1, hd] as ``_layer`` takes them."""
    ops = torch.ops.pipespec
    n = x.shape[0]
    if delta is None:
        normed = ops.rms_norm(x, w["ln1"], eps)
    else:
        x, normed = ops.add_rms_norm(x, delta, w["ln1"], eps)
    qkv = linear(normed, w["qkv"], w["qkv_b"])  # [n, (h + 2 kvh) * hd]
    q = ops.rope_cache(qkv, cos[:, 0], sin[:, 0], pos, ck, cv, h, kvh)  # [h, n, hd]; k, v into the cache
    kv_len = mask.shape[-1]
    keys, values = ck[:, :, :kv_len], cv[:, :, :kv_len]
    if attention == "triton" and triton_attention_serves(n, hd):
        att = ops.decode_attention(q, keys, values, mask, pos).reshape(n, h * hd)  # [n, h, hd] -> [n, h * hd]
    else:
        att = _math_attention(q, keys, values, mask)[0].transpose(0, 1).reshape(n, h * hd)
    x, normed = ops.add_rms_norm(x, linear(att, w["o"], w["o_b"]), w["ln2"], eps)
    act = ops.silu_mul(linear(normed, w["gate_up"], w["gate_up_b"]), w["ffn"])  # [n, ffn]
    return x, linear(act, w["down"], w["down_b"])


def _attend(pre: Any, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
            ck: torch.Tensor, cv: torch.Tensor, w: dict[str, Any], h: int, kvh: int, hd: int, eps: float, fused: bool,
            attention: str) -> torch.Tensor:
    """The first half of ``_layer``: x [n, hidden] -> the heads' outputs [1, h, n, hd] (k/v written to the cache).
    ``attention``: the variant's (``Variant.attention``)."""
    q, k, v = pre(x, cos, sin, w["ln1"], w["qkv"], w["qkv_b"], w["qk_norm"], h, kvh, hd, eps,
                  fused=fused)  # [h|kvh, n, hd]
    ck.index_copy_(2, pos, k.unsqueeze(0))
    cv.index_copy_(2, pos, v.unsqueeze(0))
    kv_len = mask.shape[-1]
    keys, values = ck[:, :, :kv_len], cv[:, :, :kv_len]
    if attention == "triton" and triton_attention_serves(q.shape[1], hd):  # decode and verify; prefills: math
        # [n, h, hd] -> [1, h, n, hd]: a view; _post_attention's transpose back makes it contiguous again
        att = torch.ops.pipespec.decode_attention(q, keys, values, mask, pos).transpose(0, 1).unsqueeze(0)
    elif attention in ("math", "triton"):
        att = _math_attention(q, keys, values, mask)
    elif kvh == h:  # a branch, not enable_gqa=(kvh != h): once a second model with other head counts compiles this
        # layer in the process, automatic dynamic shapes make h and kvh symbolic, and SDPA refuses a SymBool there
        # (H200: every compiled 7B variant failed after a 70B had compiled); a branch is a guard
        att = F.scaled_dot_product_attention(q.unsqueeze(0), keys, values, attn_mask=mask)  # [1, h, n, hd]
    else:
        att = F.scaled_dot_product_attention(q.unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=True)
    return att


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as HF's eager path computes it (scores in the model's dtype, softmax in float32), without copying
    k/v per query head: q [h, n, hd], k/v [1, kvh, kv, hd], mask [1, 1, n, kv] additive -> [1, h, n, hd].
    Query head j reads kv head j // (h / kvh) (HF's repeat_kv), so each kv head's group is one batched matmul."""
    h, n, hd = q.shape
    kvh, kv = k.shape[1], k.shape[2]
    g = h // kvh
    scores = torch.bmm(q.reshape(kvh, g * n, hd), k[0].transpose(1, 2)) * hd ** -0.5  # [kvh, g * n, kv]
    wide = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype  # float64 stays float64
    probs = torch.softmax(scores.view(kvh, g, n, kv) + mask[0], dim=-1, dtype=wide).to(q.dtype)
    return torch.bmm(probs.view(kvh, g * n, kv), v[0]).view(1, h, n, hd)


def _fuse_linears(*linears: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases, if any has one) of linears that read the same input; re-point each
    module at its view of the fused tensors so nothing is stored twice. Returns (weight [sum out, in], bias)."""
    weight = torch.cat([m.weight for m in linears]).contiguous()
    bias = None
    if any(m.bias is not None for m in linears):  # a missing bias is a zero bias
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                          for m in linears]).contiguous()
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[start:start + rows], requires_grad=False)
        if bias is not None and m.bias is not None:
            m.bias = torch.nn.Parameter(bias[start:start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    # the same computation as LlamaRMSNorm (and Qwen's, Mistral's): in float32, then back to the weights' dtype
    if fused:  # F.rms_norm of a 16-bit x computes in float32 and rounds once to x's dtype: 2 kernels with the weight,
        # not 8; float64 goes through float32 as HF's does
        xf = x if x.dtype in (torch.bfloat16, torch.float16) else x.float()
        return weight * F.rms_norm(xf, x.shape[-1:], eps=eps).to(x.dtype)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _pre_attention(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ln: torch.Tensor, qkv_w: Any,
                   qkv_b: torch.Tensor | None, qk_norm: torch.Tensor | None, h: int, kvh: int, hd: int,
                   eps: float, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [n, hidden] -> q [h, n, hd], k and v [kvh, n, hd]; q/k norms (Qwen3) then RoPE on q and k together."""
    n = x.shape[0]
    qkv = linear(_rms(x, ln, eps, fused), qkv_w, qkv_b).view(n, h + 2 * kvh, hd)
    qk, v = qkv[:, : h + kvh], qkv[:, h + kvh:]
    if qk_norm is not None:  # [h + kvh, hd]: per-head RMSNorm over head_dim
        qk = _rms(qk, qk_norm, eps, fused)
    half = hd // 2
    if fused:  # sin's first half comes negated (forward): the halves swapped by one flip, then one addcmul
        swapped = qk.unflatten(-1, (2, half)).flip(-2).flatten(-2)
        qk = torch.addcmul(qk * cos, swapped, sin)
    else:
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        qk = qk * cos + rotated * sin  # cos, sin: [n, 1, hd]
    return qk[:, :h].transpose(0, 1), qk[:, h:].transpose(0, 1), v.transpose(0, 1)


def _post_attention(x: torch.Tensor, att: torch.Tensor, o_w: Any, o_b: torch.Tensor | None,
                    ln: torch.Tensor, gate_up_w: Any, gate_up_b: torch.Tensor | None, down_w: Any,
                    down_b: torch.Tensor | None, ffn: int, eps: float, fused: bool = False,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output and the MLP. att: [1, h, n, hd] -> (x after attention [n, hidden], the MLP's output
    [n, hidden]), unsummed: ``_layer``'s next layer adds them. ``reduce``: on a tensor-parallel rank, the sum over
    the ranks of o_proj's and down_proj's partial outputs (None: one device)."""
    n = x.shape[0]
    x = _add_before_norm(x, _out(att[0].transpose(0, 1).reshape(n, -1), o_w, o_b, reduce))
    gate, up = linear(_rms(x, ln, eps, fused), gate_up_w, gate_up_b).split(ffn, dim=-1)
    return x, _out(F.silu(gate) * up, down_w, down_b, reduce)


def _add_before_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y`` (a residual add that a norm reads next). Under torch.compile a 16-bit sum is spelled through float32
    (the same one rounding as ``x + y``): inductor would fold ``x + mm`` into an ``addmm`` that, out of place on
    CUDA, first copies x into its output (a device-to-device copy per layer, seen in the H200 profile); spelled so,
    the add joins the norm's kernel instead."""
    if x.dtype in (torch.bfloat16, torch.float16) and torch.compiler.is_compiling():
        return (x.float() + y.float()).to(x.dtype)
    return x + y


def _out(x: torch.Tensor, w: Any, b: torch.Tensor | None,
         reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """``linear(x, w, b)``, or with ``reduce`` (tensor parallelism: x @ w.T is this rank's partial sum [n, out])
    the partial summed over the ranks, then the whole bias added once."""
    if reduce is None:
        return linear(x, w, b)  # one device: the same kernels as ever (bias inside the GEMM)
    y = reduce(linear(x, w))
    return y if b is None else y + b
