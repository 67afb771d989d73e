"""Tensor parallelism for the static LLaMA-family forward: which slice of every weight a rank keeps, and one
rank's forward over its shard (Megatron's split: attention heads and MLP columns over the ranks).

Terms: *world* is the number of ranks (GPUs) one model is split over, *rank* one of them (0 .. world - 1). With
``h`` query heads, ``kvh`` key/value heads (GQA: query head j reads kv head ``j // (h / kvh)``), ``hd`` head_dim and
``ffn`` the MLP width, rank r keeps

- query heads ``[r*h/W, (r+1)*h/W)`` and kv heads ``[r*kvh/W, (r+1)*kvh/W)``: rows of the fused qkv weight (and of
  its bias). Each rank's query heads read exactly its own kv heads (h/W over kvh/W is the GQA group size), so
  attention needs no communication and each rank's KV cache holds only its kv heads;
- the matching *columns* of o_proj (its input is the concatenated head outputs): each rank's product is a partial
  sum of the full one, summed by one all-reduce; o_proj's bias is added once, after the sum;
- MLP columns ``[r*ffn/W, (r+1)*ffn/W)``: rows of gate and of up (and their biases), columns of down_proj; one
  all-reduce after down_proj, then its bias.

Embedding, final norm and lm_head are replicated (every rank computes the same logits; lm_head is ~0.7% of a 70B
model's bytes). Refused (``ValueError``, one line): a world that does not divide the query heads, the kv heads (no
kv-head replication) or the MLP width. Two all-reduces per layer; the sums' order differs from one unsplit matmul,
so logits agree to rounding (exactly equal in exact arithmetic).

The forward is ``StaticLlama``'s (same static cache, masks, RoPE tables, CUDA-graph friendly: no host syncs, the
all-reduce is captured with the graph on NCCL); only the per-layer loop differs: the unsplit layer with
``_post_attention``'s reduce hook, or, in a compiled layout (``compile="layer"``), two compiled regions per layer with
the all-reduces eager between them (``TPStaticLlama.set_variant``). It is built from weights read by
name (an HF model's state dict, a safetensors folder read slice by slice, or random weights of a named shape), so a
rank never holds more than its shard plus the replicated parts.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.quant import linear
from .static import StaticWorker
from .static_llama import (VARIANTS, FAMILIES, Family, StaticLlama, Variant, _allow_recompiles, _attend, _layer,
                           _post_attention, _pre_attention, _rms, choose_variant, layer_windows, require_attention)

__all__ = ["Shard", "TPStaticLlama", "TPStaticWorker", "model_facts", "plan_shard", "refusal", "shard_fused", "split_refusal", "tp_from_model", "tp_from_folder",
           "tp_random"]

# read(name, rows, cols) -> the tensor ``name`` restricted to those row ranges (concatenated) and column range
Reader = Callable[[str, Sequence[tuple[int, int]] | None, tuple[int, int] | None], torch.Tensor]


def refusal(heads: int, kv_heads: int, ffn: int, world: int) -> str | None:
    """None when a model of these sizes splits over ``world`` ranks, else the reason (one line)."""
    if world < 1:
        return f"tensor parallelism needs at least one rank, got {world}"
    for what, n in (("attention heads", heads), ("key/value heads", kv_heads), ("MLP width", ffn)):
        if n % world:
            return f"tensor parallelism over {world} GPUs needs the {what} ({n}) divisible by {world}"
    return None


def split_refusal(config: Any, world: int) -> str | None:
    """None when a model of this HF config splits over ``world`` ranks (its family, activation, sizes), else why."""
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in FAMILIES:
        return f"tensor parallelism supports {', '.join(FAMILIES)}, not {architecture}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"tensor parallelism: activation {config.hidden_act} is not supported"
    if getattr(config, "quantization_config", None) is not None:
        return "tensor parallelism: quantized weights are not supported"
    heads = config.num_attention_heads
    return refusal(heads, getattr(config, "num_key_value_heads", None) or heads, config.intermediate_size, world)


@dataclass(frozen=True, slots=True)
class Shard:
    """What rank ``rank`` of ``world`` keeps of a model with these sizes (pure arithmetic; see the module doc)."""

    rank: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def local_heads(self) -> int:
        return self.heads // self.world

    @property
    def local_kv(self) -> int:
        return self.kv_heads // self.world

    @property
    def local_ffn(self) -> int:
        return self.ffn // self.world

    def q_rows(self) -> tuple[int, int]:
        """Rows of q_proj (and of the q part of the fused qkv)."""
        n = self.local_heads * self.head_dim
        return self.rank * n, (self.rank + 1) * n

    def kv_rows(self) -> tuple[int, int]:
        """Rows of k_proj and of v_proj (each on its own)."""
        n = self.local_kv * self.head_dim
        return self.rank * n, (self.rank + 1) * n

    def qkv_rows(self) -> list[tuple[int, int]]:
        """Rows of the fused qkv weight [(h + 2 kvh) * hd, hidden]: this rank's q, then k, then v rows."""
        q0, q1 = self.q_rows()
        k0, k1 = self.kv_rows()
        q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        return [(q0, q1), (q_end + k0, q_end + k1), (k_end + k0, k_end + k1)]

    def o_cols(self) -> tuple[int, int]:
        """Columns of o_proj [hidden, h * hd]: the inputs that are this rank's head outputs."""
        return self.q_rows()

    def ffn_rows(self) -> tuple[int, int]:
        """Rows of gate_proj and of up_proj (each on its own); also the columns of down_proj [hidden, ffn]."""
        return self.rank * self.local_ffn, (self.rank + 1) * self.local_ffn

    def gate_up_rows(self) -> list[tuple[int, int]]:
        """Rows of the fused gate_up weight [2 ffn, hidden]: this rank's gate rows, then its up rows."""
        a, b = self.ffn_rows()
        return [(a, b), (self.ffn + a, self.ffn + b)]

    def down_cols(self) -> tuple[int, int]:
        return self.ffn_rows()


def plan_shard(rank: int, world: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> Shard:
    """The ``Shard`` of rank ``rank``; ``ValueError`` (one line) where the sizes do not split over ``world``."""
    reason = refusal(heads, kv_heads, ffn, world)
    if reason is not None:
        raise ValueError(reason)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of 0..{world - 1}")
    return Shard(rank, world, heads, kv_heads, head_dim, ffn)


def take_rows(t: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The rows ``ranges`` of ``t`` (dim 0), concatenated into a fresh contiguous tensor."""
    return torch.cat([t[a:b] for a, b in ranges]).contiguous()


def shard_fused(w: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """One layer's fused weights (``StaticLlama._fuse``'s dict) -> this rank's: rows of qkv/gate_up (and their
    biases and the Qwen3 q/k norm rows), columns of o and down; o's and down's biases whole (added after the sum)."""
    h, lh, lkv = shard.heads, shard.local_heads, shard.local_kv
    out = dict(w)
    out["qkv"] = take_rows(w["qkv"], shard.qkv_rows())
    out["qkv_b"] = None if w["qkv_b"] is None else take_rows(w["qkv_b"], shard.qkv_rows())
    if w["qk_norm"] is not None:  # [h + kvh, hd]: rows per head
        r = shard.rank
        out["qk_norm"] = take_rows(w["qk_norm"], [(r * lh, (r + 1) * lh), (h + r * lkv, h + (r + 1) * lkv)])
    a, b = shard.o_cols()
    out["o"] = w["o"][:, a:b].contiguous()
    out["gate_up"] = take_rows(w["gate_up"], shard.gate_up_rows())
    out["gate_up_b"] = None if w["gate_up_b"] is None else take_rows(w["gate_up_b"], shard.gate_up_rows())
    a, b = shard.down_cols()
    out["down"] = w["down"][:, a:b].contiguous()
    out["ffn"] = shard.local_ffn
    return out


class TPStaticLlama(StaticLlama):
    """``StaticLlama`` on one rank of a tensor-parallel group: ``forward(ids [n], pos [n], kv_len) -> logits
    [n, vocab]`` (float32, the same on every rank); every rank must make the same calls in the same order (each
    layer's two all-reduces pair them up). ``group``: a ``torch.distributed`` process group (NCCL on CUDA, gloo on
    the CPU), registered or built directly; world size and rank are read off it."""

    def __init__(self, config: Any, family: Family, windows: Sequence[int | None], rotary: Any, read: Reader,
                 group: Any, device: torch.device, dtype: torch.dtype, capacity: int) -> None:
        # Not StaticLlama.__init__ (it fuses a whole HF model's modules): the same attributes, from sliced reads.
        self.group = group
        self.config = config
        self.generation_config: Any = None  # EOS ids for ``describe``, where the source has them
        rank, world = group.rank(), group.size()
        self.family = family
        self.device, self.dtype = torch.device(device), dtype
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.shard = plan_shard(rank, world, heads, kv, self.head_dim, config.intermediate_size)
        self.n_heads, self.n_kv = self.shard.local_heads, self.shard.local_kv  # what this rank's cache and pre see
        self.eps = config.rms_norm_eps
        self.n_layers = config.num_hidden_layers
        self.windows = list(windows)[: self.n_layers]

        def get(name: str, rows: Sequence[tuple[int, int]] | None = None,
                cols: tuple[int, int] | None = None) -> torch.Tensor:
            return read(name, rows, cols).to(device=self.device, dtype=dtype)

        self.layers = [self._shard_layer(get, i) for i in range(self.n_layers)]
        self.layer_devices = [self.device] * self.n_layers
        self.devices = [self.device]
        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        self.lm_head = get("lm_head.weight")
        # StaticLlama.ensure_capacity reads the RoPE module as ``self.model.model.rotary_emb``
        self.model = SimpleNamespace(model=SimpleNamespace(rotary_emb=copy.deepcopy(rotary).to(self.device)))
        # the forward's layout as an unsplit worker on this device would run it (lean-fused on CUDA: its attention;
        # the element-wise work stays torch's around the all-reduces; PIPESPEC_STATIC_VARIANT=compile-layer-math:
        # the compiled regions between the all-reduces)
        self.set_variant(choose_variant(self.device))
        self.capacity = 0
        self.cache_k: list[torch.Tensor] = []
        self.cache_v: list[torch.Tensor] = []
        self.rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ensure_capacity(capacity)

    def _shard_layer(self, get: Callable[..., torch.Tensor], i: int) -> dict[str, Any]:
        s, p = self.shard, f"model.layers.{i}."

        def maybe(name: str, rows: Sequence[tuple[int, int]] | None = None) -> torch.Tensor | None:
            try:
                return get(name, rows)
            except KeyError:
                return None

        q, kv = [s.q_rows()], [s.kv_rows()]
        qkv = torch.cat([get(p + "self_attn.q_proj.weight", q), get(p + "self_attn.k_proj.weight", kv),
                         get(p + "self_attn.v_proj.weight", kv)])  # [(lh + 2 lkv) * hd, hidden]
        biases = [maybe(p + f"self_attn.{n}_proj.bias", r) for n, r in (("q", q), ("k", kv), ("v", kv))]
        qkv_b = None
        if any(b is not None for b in biases):  # a missing bias is a zero bias (as in _fuse_linears)
            qkv_b = torch.cat([b if b is not None else qkv.new_zeros((r[0][1] - r[0][0]))
                               for b, r in zip(biases, (q, kv, kv))])
        qk_norm = None
        if self.family.qk_norm:  # [lh + lkv, hd]: the same norm for every q head, another for every k head
            qk_norm = torch.cat([get(p + "self_attn.q_norm.weight").expand(s.local_heads, self.head_dim),
                                 get(p + "self_attn.k_norm.weight").expand(s.local_kv, self.head_dim)])
        f = [s.ffn_rows()]
        gate_up = torch.cat([get(p + "mlp.gate_proj.weight", f), get(p + "mlp.up_proj.weight", f)])  # [2 lffn, hid]
        gb, ub = maybe(p + "mlp.gate_proj.bias", f), maybe(p + "mlp.up_proj.bias", f)
        gate_up_b = None
        if gb is not None or ub is not None:
            zero = gate_up.new_zeros(s.local_ffn)
            gate_up_b = torch.cat([gb if gb is not None else zero, ub if ub is not None else zero])
        return {"ln1": get(p + "input_layernorm.weight"), "qkv": qkv, "qkv_b": qkv_b, "qk_norm": qk_norm,
                "o": get(p + "self_attn.o_proj.weight", None, s.o_cols()), "o_b": maybe(p + "self_attn.o_proj.bias"),
                "ln2": get(p + "post_attention_layernorm.weight"), "gate_up": gate_up, "gate_up_b": gate_up_b,
                "down": get(p + "mlp.down_proj.weight", None, s.down_cols()), "down_b": maybe(p + "mlp.down_proj.bias"),
                "ffn": s.local_ffn}

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (capturable in a CUDA graph on NCCL: no host sync)."""
        if self.shard.world > 1:
            self.group.allreduce([t]).wait()
        return t

    def _layers(self, x: torch.Tensor, per_device: dict[torch.device, Any],
                kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``StaticLlama._layers`` on this rank: (the residual stream before the last MLP's output, that output
        summed over the ranks, its bias added)."""
        h, kvh, hd = self.n_heads, self.n_kv, self.head_dim  # this rank's heads
        pos_d, cos, sin, masks = per_device[self.device]
        fused, attention = self.variant.fused, self.variant.attention
        if self._regions is not None:  # compiled: per layer two regions, each followed by its all-reduce (eager)
            attend_region, mlp_region = self._regions
            delta, delta_b = None, None  # the previous layer's summed down_proj output [n, hidden] and its bias
            for i, w in enumerate(self.layers):
                x, partial = attend_region(x, delta, delta_b, pos_d, cos, sin, masks[self.windows[i]],
                                           self.cache_k[i], self.cache_v[i], w, h, kvh, hd, self.eps, fused, attention)
                x, partial = mlp_region(x, self._all_reduce(partial), w, self.eps, fused)
                delta, delta_b = self._all_reduce(partial), w["down_b"]
            assert delta is not None, "a model without layers"
            return x, delta if delta_b is None else delta + delta_b
        delta = None
        for i, w in enumerate(self.layers):
            # the unsplit layer (static_llama._layer: this rank's heads, its cache [1, lkv, capacity, hd]) with a
            # post-attention that sums the ranks' partial o_proj and down_proj outputs
            x, delta = _layer(self._pre, self._post, x, delta, pos_d, cos, sin, masks[self.windows[i]],
                              self.cache_k[i], self.cache_v[i], w, h, kvh, hd, self.eps, fused, attention)
        return x, delta

    def set_variant(self, variant: str | Variant, backend: str | Callable[..., Any] = "inductor") -> None:
        """``StaticLlama.set_variant`` where the layer holds two all-reduces, which stay eager (a ProcessGroup call,
        captured in our CUDA graphs as in the uncompiled layouts) between compiled regions. ``compile="layer"``: per
        layer, ``_tp_attention`` (the previous layer's summed MLP output added, RMSNorm, qkv, RoPE, cache writes,
        attention, this rank's o_proj partial) and ``_tp_mlp`` (the summed o_proj output added, RMSNorm, gate_up,
        silu * up, this rank's down_proj partial), each compiled once for all layers; ``"parts"``: only the
        pre-attention. ``backend``: torch.compile's (the CPU test passes dynamo's "eager": inductor's CPU build takes
        ~15 s a region). Not functional collectives inside one compiled layer: they need a registered group name
        (a directly built ProcessGroupGloo is refused: "Unsupported group type"), and the runner builds its group
        directly."""
        v = VARIANTS[variant] if isinstance(variant, str) else variant
        if v.attention == "triton":
            require_attention(v, self.device)
        self.variant = v
        self._pre = _pre_attention
        # the unsplit post-attention, summing the ranks' partial o_proj and down_proj outputs
        self._post = functools.partial(_post_attention, reduce=self._all_reduce)
        self._regions: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        if v.compile == "parts":
            self._pre = torch.compile(_pre_attention, dynamic=True, fullgraph=True, backend=backend)
        elif v.compile == "layer":
            _allow_recompiles()
            # dynamic=None as on one device: static at first, symbolic in what changes (tokens, context)
            opts: dict[str, Any] = {"dynamic": None if v.dynamic else False, "fullgraph": True, "backend": backend}
            if v.mode is not None:
                opts["mode"] = v.mode
            self._regions = (torch.compile(_tp_attention, **opts), torch.compile(_tp_mlp, **opts))
        elif v.compile is not None:
            raise ValueError(f"unknown compile {v.compile!r}")


def _residual(x: torch.Tensor, delta: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x + (delta + bias): a summed o_proj or down_proj output and its whole bias (as ``static_llama._out``)."""
    if delta is None:
        return x
    return x + (delta if bias is None else delta + bias)


def _tp_attention(x: torch.Tensor, delta: torch.Tensor | None, delta_b: torch.Tensor | None, pos: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
                  w: dict[str, Any], h: int, kvh: int, hd: int, eps: float, fused: bool,
                  attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled region 1 of a layer on a rank: x [n, hidden] + the previous layer's summed down_proj output (delta,
    its bias; None in the first layer) -> (that x, this rank's o_proj partial [n, hidden], to be summed)."""
    x = _residual(x, delta, delta_b)
    att = _attend(_pre_attention, x, pos, cos, sin, mask, ck, cv, w, h, kvh, hd, eps, fused,
                  attention)  # [1, lh, n, hd]
    return x, linear(att[0].transpose(0, 1).reshape(x.shape[0], -1), w["o"])


def _tp_mlp(x: torch.Tensor, attended: torch.Tensor, w: dict[str, Any], eps: float,
            fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled region 2: x [n, hidden] + the summed o_proj output (and its bias) -> (that x, this rank's
    down_proj partial [n, hidden], to be summed): ``_post_attention``'s MLP over this rank's columns."""
    x = _residual(x, attended, w["o_b"])
    gate, up = linear(_rms(x, w["ln2"], eps, fused), w["gate_up"], w["gate_up_b"]).split(w["ffn"], dim=-1)
    return x, linear(F.silu(gate) * up, w["down"])


# -- where the weights come from ------------------------------------------------------------------------------------


def _slice(t: Any, rows: Sequence[tuple[int, int]] | None, cols: tuple[int, int] | None) -> torch.Tensor:
    """Rows and columns of ``t`` (a tensor, or a safetensors slice: only those bytes are read)."""
    if rows is None:
        rows = [(0, t.shape[0] if hasattr(t, "shape") else t.get_shape()[0])]
    c0, c1 = cols if cols is not None else (None, None)
    parts = [t[a:b] if len(_shape(t)) == 1 else t[a:b, c0:c1] for a, b in rows]
    parts = [p if isinstance(p, torch.Tensor) else torch.as_tensor(p) for p in parts]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _shape(t: Any) -> Sequence[int]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t.get_shape())


def _check_family(config: Any, architecture: str) -> Family:
    family = FAMILIES.get(architecture)
    if family is None:
        raise ValueError(f"tensor parallelism supports {', '.join(FAMILIES)}, not {architecture}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"tensor parallelism: activation {config.hidden_act} is not supported")
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError("tensor parallelism: quantized weights are not supported")
    return family


def _meta_model(config: Any) -> Any:
    """The architecture on the meta device (no memory): its class, windows and RoPE module's class."""
    from transformers import AutoModelForCausalLM

    from ..loading import _CONSTRUCT

    # under the loader's lock: transformers builds a model under process-wide settings (the default dtype: the
    # config's, fp16 for a half-precision folder), which would leak into another stage loading on another thread
    with _CONSTRUCT, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _rotary(meta: Any, config: Any) -> Any:
    from ..loading import _CONSTRUCT

    with _CONSTRUCT:
        return type(meta.model.rotary_emb)(config=config)  # real buffers (the meta module's have no data)


def tp_from_model(model: Any, group: Any, device: torch.device, capacity: int) -> TPStaticLlama:
    """This rank's shard of an HF model already in memory (tests; small models): read from its state dict."""
    state = model.state_dict()
    if "lm_head.weight" not in state:  # tied: the embedding is the output layer
        state["lm_head.weight"] = model.get_input_embeddings().weight

    def read(name: str, rows: Sequence[tuple[int, int]] | None, cols: tuple[int, int] | None) -> torch.Tensor:
        return _slice(state[name], rows, cols).clone()

    family = _check_family(model.config, type(model).__name__)
    static = TPStaticLlama(model.config, family, layer_windows(model, family), model.model.rotary_emb, read, group,
                           device, model.dtype, capacity)
    static.generation_config = getattr(model, "generation_config", None)
    return static


def tp_from_folder(folder: str, group: Any, device: torch.device, dtype: torch.dtype, capacity: int) -> TPStaticLlama:
    """This rank's shard read from a safetensors folder, slice by slice (a rank reads only its rows and columns)."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(folder)
    config = AutoConfig.from_pretrained(str(path))
    index = path / "model.safetensors.index.json"
    where = (json.loads(index.read_text())["weight_map"] if index.exists()
             else {k: "model.safetensors" for k in safe_open(str(path / "model.safetensors"), "pt").keys()})
    files: dict[str, Any] = {}

    def read(name: str, rows: Sequence[tuple[int, int]] | None, cols: tuple[int, int] | None) -> torch.Tensor:
        if name == "lm_head.weight" and name not in where:
            name = "model.embed_tokens.weight"  # tied embeddings
        fname = where[name]  # KeyError: an absent (optional) bias
        if fname not in files:
            files[fname] = safe_open(str(path / fname), "pt")
        return _slice(files[fname].get_slice(name), rows, cols)

    meta = _meta_model(config)
    family = _check_family(config, type(meta).__name__)
    static = TPStaticLlama(config, family, layer_windows(meta, family), _rotary(meta, config), read, group, device,
                           dtype, capacity)
    try:
        from transformers import GenerationConfig

        static.generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:  # no generation_config.json: no EOS beyond the config's
        static.generation_config = None
    return static


def tp_random(shape: tuple[int, int, int, int, int, int], group: Any, device: torch.device, dtype: torch.dtype,
              capacity: int, seed: int = 0) -> TPStaticLlama:
    """A LLaMA of ``shape`` (hidden, layers, heads, kv heads, ffn, vocab; ``synthetic.SHAPES``) with random weights,
    only this rank's shard created, directly on ``device`` (benchmarks: the 70B shape on two GPUs)."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv, ffn, vocab = shape
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=max(4096, capacity), tie_word_embeddings=False)
    hd = hidden // heads
    full = {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
            "o_proj": (hidden, heads * hd), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
            "down_proj": (hidden, ffn)}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 7919 * group.rank())

    def read(name: str, rows: Sequence[tuple[int, int]] | None, cols: tuple[int, int] | None) -> torch.Tensor:
        if name.endswith(".bias"):
            raise KeyError(name)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return torch.ones(hidden, device=device, dtype=dtype)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out, inp = vocab, hidden
        else:
            out, inp = full[name.split(".")[-2]]
        if rows is not None:
            out = sum(b - a for a, b in rows)
        if cols is not None:
            inp = cols[1] - cols[0]
        # random, not zeros (zeros can run faster than real data); made where it lives, in its dtype
        return torch.empty(out, inp, device=device, dtype=dtype).normal_(0, 0.02, generator=gen)

    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return TPStaticLlama(config, FAMILIES["LlamaForCausalLM"], [None] * layers, LlamaRotaryEmbedding(config=config),
                         read, group, device, dtype, capacity)


# -- rank 0's worker ------------------------------------------------------------------------------------------------


class TPStaticWorker(StaticWorker):
    """A ``StaticWorker`` over one rank's ``TPStaticLlama``. On rank 0 (the stage's worker) ``mirror`` sends every
    call that runs the forward to the other ranks first, as a small header (``("forward", tokens, position)``,
    ``("reset", capacity)``, ``("warm_up", buckets, context)``); a follower runs the same worker with no mirror and
    replays the headers (``runners.tensor_parallel``), so every rank forwards, captures and replays the same shapes
    in the same order and the all-reduces pair up. Rollbacks need no header: a forward names its position and the
    follower drops what lies past it. Multi-token device drafts are off (their choices would have to be mirrored):
    a draft is one mirrored forward per token."""

    def __init__(self, static: TPStaticLlama, facts: Any, name: str, device: torch.device,
                 mirror: Callable[[tuple[Any, ...]], None] | None = None, capacity: int = 2048) -> None:
        super().__init__(facts, name, device, capacity=capacity, static=static)
        self.mirror = mirror
        self.device_draft = False

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        if self.mirror is not None:
            self.mirror(("forward", tuple(tokens), position))
        return super().forward(tokens, position, keep)

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        if self.mirror is not None:
            self.mirror(("reset", capacity))
        super().reset(seed, capacity)

    def warm_up(self, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), context: int = 512,
                draft_sizes: Sequence[int] = (), params: Any = None) -> None:
        if self.mirror is not None:
            self.mirror(("warm_up", tuple(buckets), context))
        super().warm_up(buckets, context)

    def replay(self, header: tuple[Any, ...]) -> None:
        """A follower's side: run one header rank 0 sent."""
        op = header[0]
        if op == "forward":
            _, tokens, position = header
            del self.cached[position:]  # rank 0 rolled back (or not): its position is the truth
            self.forward(tokens, position, 1)
        elif op == "reset":
            self.reset(None, header[1])
        elif op == "warm_up":
            self.warm_up(header[1], header[2])
        else:
            raise ValueError(f"unknown tensor-parallel header {op!r}")


def model_facts(config: Any, static: TPStaticLlama, generation_config: Any = None) -> Any:
    """What ``LogitsWorker`` reads of an HF model (config, output size, EOS, dtype), for a rank that has no HF model."""
    lm_head = SimpleNamespace(weight=static.lm_head)
    return SimpleNamespace(config=config, dtype=static.dtype, generation_config=generation_config,
                           get_output_embeddings=lambda: lm_head)
