"""Synthetic acceptance at real shapes: real forward passes of random-weight models of real sizes (so every stage
costs what it would on the device), with token choices decided by a seeded ``Oracle`` at a set acceptance rate.

Every figure measured this way is labelled *synthetic acceptance*: it shows what the orchestrator does at real costs
for a given alpha, not how well any real draft model agrees with any real target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .static import StaticWorker
from .tensor_parallel import TPStaticLlama, TPStaticWorker
from .base import ProbRows, StepResult
from ..analysis.oracle import Oracle
from .simulated import OracleChoices
from ..verify import SamplingParams

__all__ = ["SHAPES", "SyntheticChoices", "SyntheticTPWorker", "SyntheticWorker", "build_synthetic",
           "fill_layer", "forward_ms", "random_llama", "split_quantized"]

SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {  # hidden, layers, heads, kv heads, ffn, vocab
    "68m": (768, 2, 12, 12, 3072, 32000),
    "160m": (768, 12, 12, 12, 3072, 32000),
    "1b": (2048, 16, 32, 8, 8192, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "8b": (4096, 32, 32, 8, 14336, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "70b": (8192, 80, 64, 8, 28672, 32000),
}


def random_llama(shape: str, devices: Sequence[str | torch.device], dtype: torch.dtype = torch.bfloat16, *,
                 layers_later: bool = False) -> Any:
    """A LlamaForCausalLM of a real shape with random weights, its layers split evenly over ``devices``.

    ``layers_later``: the decoder layers stay on the meta device; ``fill_layer`` materialises one (StaticLlama's
    ``prepare_layer`` hook, so a quantized 70B is built one layer at a time and its bf16 weights never all exist)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # no real memory yet: weights are created on their devices
    devs = [torch.device(d) for d in devices]
    per = -(-layers // len(devs))
    placement = {"model.embed_tokens": devs[0], "model.norm": devs[-1], "lm_head": devs[-1]}
    if not layers_later:
        for i in range(layers):
            placement[f"model.layers.{i}"] = devs[min(i // per, len(devs) - 1)]
    for name, device in placement.items():
        fill_layer(model.get_submodule(name), device)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(devs[0])  # meta buffers -> real ones
    model.eval()
    return model


def fill_layer(module: torch.nn.Module, device: torch.device) -> None:
    """Materialise ``module`` on ``device`` with random weights (norms 1)."""
    module.to_empty(device=device)
    for p in module.parameters():  # random, not zeros: zeros can run faster than real data
        if p.dim() > 1:
            p.data.normal_(0, 0.02)
        else:
            p.data.fill_(1.0)


def split_quantized(shape: str) -> tuple[str, str | None]:
    """``"70b:int8"`` -> ("70b", "int8"): a shape with weight-only quantized layers (``kernels.quant``)."""
    base, _, kind = shape.partition(":")
    return base, kind or None


def build_synthetic(shape: str, device: str, oracle: Oracle, stage: int, *,
                    dims: tuple[int, int, int, int, int, int] | None = None, dtype: torch.dtype | None = None,
                    capacity: int = 2048) -> SyntheticWorker:
    """A ``SyntheticWorker`` over a fresh ``random_llama`` on ``device``: the factory a runner of any backend is
    handed (``runner.start(build_synthetic, ...)``; top-level and plain arguments, so it pickles into a worker
    process). ``dims``: a shape not in ``SHAPES`` (tiny test shapes), registered where the worker is built.
    ``dtype``: bf16 on CUDA, fp32 on the CPU by default. ``shape`` may name a weight-only quantization after a
    colon (``"70b:int8"``): the layers are then built, fused and quantized one at a time (a 70B in 8 bits fits one
    H200; its bf16 weights would not)."""
    base, kind = split_quantized(shape)
    if dims is not None:
        SHAPES[base] = dims
    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if kind is None:
        return SyntheticWorker(random_llama(base, [dev], dtype), shape, dev, oracle, stage, capacity=capacity)
    model = random_llama(base, [dev], dtype, layers_later=True)
    return SyntheticWorker(model, shape, dev, oracle, stage, capacity=capacity, quantize=kind,
                           prepare_layer=lambda layer: fill_layer(layer, dev))


def forward_ms(worker: StaticWorker, prompt: Sequence[int], sizes: Sequence[int] = (1, 8),
               repeats: int = 10) -> list[float]:
    """Median ms of one warm forward feeding each of ``sizes`` tokens after ``prompt``, host sync included (what a
    stage's call pays for its forward alone). Run on the worker's own thread or process, between generations.

    Each timed forward starts on an idle device (the previous one was read back) and feeds exactly ``n`` tokens at
    the same position (rolled back between repeats), after two untimed ones: not the prefill's tail or a first
    replay after a reset, which the probe's first version timed (about 2x the steady cost of a 7B forward)."""
    worker.reset(None, None)
    worker.prefill(prompt)
    base = len(worker.cached)
    out = []
    for n in sizes:
        times = []
        for i in range(repeats + 2):
            worker.rollback(base)
            t0 = time.perf_counter()
            worker.reader.ints(worker.forward([7] * n, base, 1)[-1, :1].argmax(-1))  # waits for the device
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out.append(1000 * sorted(times)[len(times) // 2])
    worker.release()
    return out


class SyntheticChoices(OracleChoices):
    """The synthetic worker's oracle logic over any ``StaticWorker`` (one model on its devices, or rank 0 of a
    tensor-parallel stage): real forward passes, token choices from the oracle (greedy only).

    Besides the worker calls it serves ``extra_calls`` by name on every backend, for measuring tools (the GPU
    probe): they set and read what a tool would otherwise reach into an in-process worker for. ``_hashes[p]`` names
    ``cached[:p]``: extended by every ``forward`` (on a tensor-parallel rank 0, after the forward was mirrored),
    cut by ``rollback``, restarted by ``release`` and ``reset``; none of those need the followers (they keep no
    hashes: their next mirrored forward names its position)."""

    extra_calls = ("configure", "warm_up", "standalone_ms")
    device_draft_ok = True  # whether multi-token drafts may run on the device (a tensor-parallel stage's may not)

    def _init_choices(self, oracle: Oracle, stage: int) -> None:
        self.oracle = oracle
        self.stage = stage
        self._hashes = [oracle.root]  # _hashes[p] names cached[:p]
        self._prompt_len = None

    def configure(self, *, oracle: Oracle | None = None, stage: int | None = None,
                  device_draft: bool | None = None) -> None:
        """Between generations: a new oracle (another alpha), this worker's index in the chain being measured, and
        whether multi-token drafts run on the device (never on a worker that cannot: asking is not an error, so a
        tool can set it for every stage alike). ``None`` keeps the current setting."""
        if oracle is not None:
            self.oracle = oracle
            self.release()  # the cached tokens' hashes were the old oracle's
        if stage is not None:
            self.stage = stage
        if device_draft is not None:
            self.device_draft = device_draft and self.device_draft_ok

    def warm_up(self, *args: Any, **kwargs: Any) -> int:
        """``StaticWorker.warm_up``; returns how many graphs this worker has captured so far."""
        super().warm_up(*args, **kwargs)
        return self.captures

    def standalone_ms(self, prompt: Sequence[int], sizes: Sequence[int] = (1, 8), repeats: int = 10) -> list[float]:
        """``forward_ms`` of this worker (a named call)."""
        return forward_ms(self, prompt, sizes, repeats)

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        super().reset(seed, capacity)
        self._hashes = [self.oracle.root]
        self._prompt_len = None

    def release(self) -> None:
        super().release()
        self._hashes = [self.oracle.root]

    def rollback(self, length: int) -> None:
        super().rollback(length)
        del self._hashes[length + 1:]

    def _note_fed(self, tokens: Sequence[int]) -> None:
        super()._note_fed(tokens)  # a forward's (on a tensor-parallel rank 0, after it was mirrored) or a draft's
        h = self._hashes[-1]
        for t in tokens:
            h = self.oracle.extend(h, t)
            self._hashes.append(h)

    def _wait(self, logits: torch.Tensor) -> None:
        # the oracle does not read the logits, but the stage must not get ahead of its device: wait as the real
        # worker's read-back would (one value through its reader)
        self.reader.ints(logits[-1, :1].argmax(-1))

    def prefill(self, prompt: Sequence[int]) -> bool:
        self._learn_prompt(len(prompt))
        return super().prefill(prompt)

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult:
        if params.rule != "greedy":
            raise ValueError("synthetic acceptance is greedy only")
        self._learn_prompt(start)
        self._wait(self.logits(seq, start))
        return self._verdict(seq, start)

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        if params.rule != "greedy":
            raise ValueError("synthetic acceptance is greedy only")
        self._learn_prompt(len(seq))
        if self.device_draft:
            return super().draft(seq, n, params)  # StaticWorker.draft: the bookkeeping; tokens from _device_draft
        work = list(seq)
        for _ in range(n):
            self._wait(self.logits(work, len(work)))
            work.append(self._choice(len(work)))
        return StepResult(0, tuple(work[len(seq):]))

    def _device_draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> list[int]:
        """The real multi-token draft's cost (one graph, one sync), then the oracle's ``n`` tokens instead of the
        device's. The cache then holds K/V of the device's own tokens, which nothing reads (the oracle decides),
        while ``cached`` (extended by ``StaticWorker.draft``) and the hashes name the oracle's, as after per-token
        drafts."""
        super()._device_draft(seq, n, params)  # feeds seq's missing tail (hashes kept: ``_note_fed``)
        work = list(seq)
        work.append(self._choice(len(work)))
        for _ in range(n - 1):  # the hashes of the n - 1 drafts fed to the cache
            self._hashes.append(self.oracle.extend(self._hashes[-1], work[-1]))
            work.append(self._choice(len(work)))
        return work[len(seq):]


class SyntheticWorker(SyntheticChoices, StaticWorker):
    """``SyntheticChoices`` over a ``StaticWorker`` of one model (``random_llama``)."""

    def __init__(self, model: Any, name: str, device: torch.device, oracle: Oracle, stage: int,
                 capacity: int = 2048, *, quantize: str | None = None,
                 prepare_layer: Callable[[Any], None] | None = None) -> None:
        super().__init__(model, name, device, capacity=capacity, quantize=quantize, prepare_layer=prepare_layer)
        self._init_choices(oracle, stage)


class SyntheticTPWorker(SyntheticChoices, TPStaticWorker):
    """``SyntheticChoices`` on rank 0 of a tensor-parallel stage (``runners.tensor_parallel.build_synthetic_tp``). Its forwards, resets and
    warm-ups are mirrored to the followers by ``TPStaticWorker`` (the followers stay plain ``TPStaticWorker``s: the
    oracle and the hashes live on rank 0 only); multi-token device drafts stay off (a draft is one mirrored forward
    per token), whatever ``configure`` is asked."""

    device_draft_ok = False

    def __init__(self, static: TPStaticLlama, facts: Any, name: str, device: torch.device, mirror: Any = None,
                 capacity: int = 2048, *, oracle: Oracle, stage: int) -> None:
        super().__init__(static, facts, name, device, mirror, capacity)
        self._init_choices(oracle, stage)
