"""The static fast path for the LLaMA-like families beyond LLaMA: Qwen2/2.5 (q/k/v biases, tied embeddings), Qwen3
(per-head q/k norms, head_dim apart from hidden / heads), Mistral (a sliding window), each against HF's own forward.

Tiny random configs on the CPU. HF initialises biases to zero and norm weights to one; both are randomised here so a
forward that ignored them would fail. Windows of 8 tokens are far smaller than the cache, so the windowed mask is
exercised on every long sequence.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import pipespec
from helpers import grow_or_diverge, hf_greedy, limit
from pipespec.workers import make_worker
from pipespec.workers.static import StaticWorker
from pipespec.workers.static_llama import VARIANTS, StaticLlama, choose_variant, supports_static

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, eos_token_id=None, bos_token_id=None, pad_token_id=None)

# name -> (model class, config class, config overrides)
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    # layer 0 full attention, layer 1 an 8-token window (Qwen2's layer_types from max_window_layers)
    "qwen2-window": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=True,
                                                         sliding_window=8, max_window_layers=1)),
    # head_dim 16 with hidden 32 and 4 heads: q is 64 wide, wider than the residual stream (as in Qwen3-0.6B)
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(tie_word_embeddings=True, head_dim=16)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "mistral-window": (MistralForCausalLM, MistralConfig, dict(tie_word_embeddings=False, sliding_window=8)),
    "llama-biases": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False, attention_bias=True,
                                                         mlp_bias=True)),
}


def tiny(family: str, seed: int, *, hidden: int = 32, layers: int = 2, dtype: torch.dtype = torch.float64) -> Any:
    """A random model of ``family`` with random biases and norm weights."""
    model_cls, config_cls, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                        **COMMON, **overrides)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def noisy(model: Any, noise: float, seed: int) -> Any:
    """The same model with Gaussian noise on every weight (a tied embedding stays tied: deepcopy keeps the tie)."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    return other


def test_families_take_the_static_path() -> None:
    for family in FAMILIES:
        model = tiny(family, 0)
        assert supports_static(model) is None, family
        assert isinstance(make_worker(model, "m", torch.device("cpu"), fast="auto"), StaticWorker), family
    reason = supports_static(torch.nn.Linear(2, 2)) or ""
    assert "Linear is not one of" in reason and "Qwen3ForCausalLM" in reason


def test_config_details_are_read_as_hf_reads_them() -> None:
    qwen3 = StaticLlama(tiny("qwen3", 0), 64)
    assert qwen3.head_dim == 16 and qwen3.layers[0]["qkv"].shape == (4 * 16 + 2 * 2 * 16, 32)
    assert qwen3.layers[0]["qk_norm"].shape == (4 + 2, 16)
    qwen2 = tiny("qwen2", 0)
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight  # tied, as in Qwen2.5-0.5B
    static = StaticLlama(qwen2, 64)
    assert static.lm_head is static.embed and static.layers[0]["qkv_b"].shape == (4 * 8 + 2 * 2 * 8,)
    assert static.windows == [None, None]
    assert StaticLlama(tiny("qwen2-window", 0), 64).windows == [None, 8]
    assert StaticLlama(tiny("mistral-window", 0), 64).windows == [8, 8]
    assert StaticLlama(tiny("mistral", 0), 64).windows == [None, None]


@torch.inference_mode()
@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_cache_matches_hf_forward_through_rollbacks(family: str) -> None:
    model = tiny(family, 3)
    reference = copy.deepcopy(model)  # untouched: StaticLlama re-points the weights at fused tensors
    worker = StaticWorker(model, "m", torch.device("cpu"), capacity=300)
    worker.reset(None, 300)
    rng = random.Random(family)
    seq = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
    worker.prefill(seq)
    longest = len(seq)
    for _ in range(40):
        seq = grow_or_diverge(rng, seq, 8, vocab=VOCAB)
        first = rng.randrange(max(1, len(seq) - 7), len(seq) + 1)
        got = worker.logits(seq, first)
        want = reference(torch.tensor([seq])).logits[0, first - 1:]
        assert torch.allclose(got.double(), want, atol=1e-8), (family, len(seq), first)
        longest = max(longest, len(seq))
    assert longest > 24  # well past the 8-token windows
    # the HF model still works after its weights and biases were re-pointed at the fused tensors
    assert torch.allclose(model(torch.tensor([seq])).logits, reference(torch.tensor([seq])).logits, atol=1e-10)


@torch.inference_mode()
@pytest.mark.parametrize("family", ["qwen2-window", "qwen3", "mistral-window"])
def test_float32_matches_hf_forward(family: str) -> None:
    model = tiny(family, 5, hidden=64, dtype=torch.float32)
    reference = copy.deepcopy(model)
    worker = StaticWorker(model, "m", torch.device("cpu"), capacity=300)
    worker.reset(None, 300)
    rng = random.Random(5)
    seq = [rng.randrange(VOCAB) for _ in range(30)]
    worker.prefill(seq[:20])
    got = worker.logits(seq, 20)  # 10 new tokens over a 20-token cache
    seq2 = seq[:25] + [1, 2, 3]  # roll back 5, add 3
    got2 = worker.logits(seq2, 25)
    for s, g, first in ((seq, got, 20), (seq2, got2, 25)):
        want = reference(torch.tensor([s])).logits[0, first - 1:]
        assert torch.allclose(g, want, atol=1e-4, rtol=1e-4), family


@limit(120)
@pytest.mark.parametrize("family", ["qwen2", "qwen2-window", "qwen3", "mistral-window"])
async def test_chain_of_the_family_equals_hf_generate(family: str) -> None:
    target = tiny(family, 0, hidden=48)
    draft = tiny(family, 1, hidden=32, layers=1)  # a smaller model of the family, sharing only the vocabulary
    models = [draft, noisy(target, 0.3, 2), target] if family != "qwen2" else [noisy(target, 0.4, 2), target]
    prompt = [5, 17, 33, 2, 9, 120, 77]
    want = hf_greedy(copy.deepcopy(target), prompt, 30)  # a copy: loading the chain re-points target's weights
    async with pipespec.Pipeline.load(models, device="cpu", fast=True) as pipe:
        assert all(isinstance(m.worker, StaticWorker) for m in pipe.members)
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(prompt, max_new_tokens=30, mode=mode)
            assert list(g.token_ids) == want, (family, mode)


def _padded(model: Any, rows: int, seed: int) -> Any:
    """``model`` with ``rows`` more output (and tied input) rows: padding of its vocabulary, as Qwen2.5-7B has."""
    torch.manual_seed(seed)
    cfg = copy.deepcopy(model.config)
    cfg.vocab_size = model.config.vocab_size + rows
    wide = type(model)(cfg).to(model.dtype).eval()
    with torch.no_grad():
        state = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
        wide.load_state_dict(state, strict=False)
        wide.get_input_embeddings().weight[: model.config.vocab_size] = model.get_input_embeddings().weight
    wide.generation_config.eos_token_id = None
    wide.generation_config.pad_token_id = None
    return wide


def _word_tokenizer(n: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@limit(120)
async def test_widths_that_differ_by_padding_chain_losslessly() -> None:
    """A draft of 160 output rows before a target of 192 (the Qwen2.5 0.5B -> 7B case): greedy equals the target
    alone in every mode, also when the target emits padding ids (rows 160..191) that the draft cannot embed."""
    target = _padded(tiny("qwen2", 0, hidden=48), 32, 3)
    draft = tiny("qwen2", 1, hidden=32, layers=1)
    prompt = [5, 17, 33, 2, 9, 120, 77]
    with torch.no_grad():  # make some padding ids likely: the target then feeds the draft ids it cannot embed
        target.get_input_embeddings().weight[170:180] *= 4
    want = hf_greedy(copy.deepcopy(target), prompt, 30)
    assert any(t >= 160 for t in want), want  # the case under test happens
    tokenizer = _word_tokenizer(150)  # one tokenizer, both widths hold its ids (as Qwen2.5's 151665 ids)
    async with pipespec.Pipeline.load([draft, target], device="cpu", fast=True, tokenizer=tokenizer) as pipe:
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(prompt, max_new_tokens=30, mode=mode)
            assert list(g.token_ids) == want, mode
        # the rejection rule over rows of two widths (zero-padded): runs, and emits only ids the target has
        g = await pipe.generate(prompt, max_new_tokens=30, mode="sd", temperature=1.0, acceptance="rejection",
                                seed=3)
        assert len(g.token_ids) == 30 and all(0 <= t < 192 for t in g.token_ids)


def test_widths_that_differ_by_more_than_padding_are_refused() -> None:
    from pipespec.errors import ConfigError
    from pipespec.scheduler.pipeline import _check_vocabularies

    class M:  # a member as far as the check reads it
        def __init__(self, name: str, size: int) -> None:
            self.name, self.info = name, type("I", (), {"vocab_size": size})()

    _check_vocabularies([M("a", 151936), M("b", 152064)], None)  # padding only
    with pytest.raises(ConfigError, match="do not share a vocabulary"):
        _check_vocabularies([M("a", 32000), M("b", 128256)], None)

    class Tok:
        def __len__(self) -> int:
            return 151665

    _check_vocabularies([M("a", 151936), M("b", 152064)], Tok())
    with pytest.raises(ConfigError, match="do not share a vocabulary: .* hold the tokenizer"):
        _check_vocabularies([M("a", 151000), M("b", 152064)], Tok())

@torch.inference_mode()
@pytest.mark.parametrize("variant", ["base", "lean", "lean-math"])
def test_every_eager_layout_matches_hf_forward(variant: str) -> None:
    """The layouts of issue 16 (additive mask once, fused RMSNorm/RoPE, bmm attention without GQA copies) are the
    same model: 12 prompt tokens, then 3 more over a 16-slot window of the cache, for every family."""
    for family in FAMILIES:
        model = tiny(family, 4)
        reference = copy.deepcopy(model)
        static = StaticLlama(model, 64, variant)
        seq = torch.randint(0, VOCAB, (15,), generator=torch.Generator().manual_seed(4))
        static.forward(seq[:12], torch.arange(12), 16)
        got = static.forward(seq[12:], torch.arange(12, 15), 16)
        want = reference(seq[None]).logits[0, 12:]
        assert torch.allclose(got.double(), want, atol=1e-8), (variant, family)


def test_variant_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipespec.workers import static_llama

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_variant(cpu) == static_llama.CPU_VARIANT
    # CUDA's defaults take the Triton kernels where Triton imports, else the math layout
    monkeypatch.setattr(static_llama, "triton_attention_available", lambda: True)
    assert choose_variant(cuda) == static_llama.CUDA_VARIANT == "lean-fused"
    assert choose_variant(cuda, compile=True) == static_llama.COMPILED_VARIANT == "compile-layer-triton"
    monkeypatch.setattr(static_llama, "triton_attention_available", lambda: False)
    assert choose_variant(cuda) == "lean-math" and choose_variant(cuda, compile=True) == "compile-layer-math"
    assert choose_variant(cpu, compile=True) == "compile-layer-math"  # no Triton attention off CUDA
    monkeypatch.setenv("PIPESPEC_STATIC_VARIANT", "lean-math")
    assert choose_variant(cuda, compile=True) == "lean-math"
    assert StaticWorker(tiny("qwen3", 0), "m", cpu, capacity=64).static.variant == VARIANTS["lean-math"]
    monkeypatch.setenv("PIPESPEC_STATIC_VARIANT", "nope")
    with pytest.raises(ValueError, match="PIPESPEC_STATIC_VARIANT"):
        choose_variant(cpu)


def test_compiled_layer_serves_two_models_with_other_head_counts_in_one_process() -> None:
    # A chain compiles one layer function for every model in the process; after the first model, automatic dynamic
    # shapes make the head counts symbolic. On an H200 every compiled 7B layout then failed after a 70B had compiled
    # ("enable_gqa must be bool, not SymBool"). Inductor on the CPU: ~20 s.
    torch.manual_seed(0)
    with torch.inference_mode():
        for heads, kv_heads in ((8, 2), (4, 4)):  # grouped-query attention first, then one kv head per query head
            config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=256,
                                 max_position_embeddings=512)
            model = LlamaForCausalLM(config).eval()
            static = StaticLlama(model, 256 + 128, "compile-layer")
            ids = torch.randint(0, 256, (8,))
            got = static.forward(ids, torch.arange(8), 256)  # [8, vocab]
            assert torch.allclose(got, model(ids[None]).logits[0], atol=1e-5), (heads, kv_heads)


def test_compiled_layer_runs_while_another_thread_traces() -> None:
    # FX's "tracing now" flag is process-wide: on an H200 a chain under compile-layer-* failed when one stage's
    # thread compiled a new shape (AOT tracing sets the flag) while another stage called its compiled layer. Here the
    # flag is set by hand, as that other thread would, around a compiled forward.
    import torch.fx._symbolic_trace as symbolic_trace

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    with torch.inference_mode():
        static = StaticLlama(model, 256, "compile-layer")
        ids = torch.randint(0, 256, (8,))
        first = static.forward(ids, torch.arange(8), 128)  # compiles
        saved = symbolic_trace._is_fx_tracing_flag
        symbolic_trace._is_fx_tracing_flag = True
        try:
            again = static.forward(ids, torch.arange(8), 128)
        finally:
            symbolic_trace._is_fx_tracing_flag = saved
    assert torch.allclose(first, again, atol=1e-5)
