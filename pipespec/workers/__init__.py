"""Model workers: one model of the chain with its KV cache, served by a runner (``pipespec.runners``).

``base`` (the ``Worker`` protocol, ``StepResult``, ``LogitsWorker``), ``hf`` (HF's forward, any model), ``static`` and
``static_llama`` (LLaMA, Mistral, Qwen2, Qwen3 over a static cache and CUDA graphs), ``simulated`` (sleeps, for
measuring the orchestrator), ``synthetic`` (real-shape forwards, oracle choices). ``make_worker`` picks between the
real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .base import LogitsWorker, ProbRows, StepResult, Worker, WorkerInfo, common_prefix

__all__ = ["LogitsWorker", "ProbRows", "StepResult", "Worker", "WorkerInfo", "adopt_worker", "common_prefix",
           "load_layered_worker", "load_named_worker", "load_worker", "make_worker"]


def make_worker(model: Any, name: str, device: torch.device, fast: bool | str = "auto",
                quantize: str | None = None, prepare_layer: Callable[[Any], None] | None = None) -> LogitsWorker:
    """The fast static-cache worker where it applies (``fast="auto"``: the families of
    ``static_llama.FAMILIES``, i.e. LLaMA, Mistral, Qwen2/2.5, Qwen3), else HF's eager forward.

    ``fast=True`` asks for the static path on any device (CUDA graphs only on CUDA) and fails if the model does
    not support it; ``fast="compile"`` adds torch.compile; ``fast=False`` always uses HF's own forward.
    ``quantize`` ("int8", "fp8": weight-only, ``pipespec.kernels``) needs the static path; HF's forward is refused
    with one line rather than quantized differently. ``prepare_layer``: see ``StaticLlama``.
    """
    from .static_llama import supports_static

    if fast == "auto":  # supported families take the static path anywhere (on the CPU too: ~25% faster)
        fast = supports_static(model, layers_later=prepare_layer is not None) is None
    if quantize is not None and not fast:
        reason = supports_static(model, layers_later=prepare_layer is not None) or "the HF forward was asked for"
        raise ConfigError(f"--quantize {quantize} for {name}: only the static path quantizes ({reason})")
    if not fast:
        from .hf import HFWorker

        return HFWorker(model, name, device)
    from .static import StaticWorker

    # "compile": torch.compile each layer (static_llama.COMPILED_VARIANT: slower start, fewer kernels per step); the
    # layout otherwise is static_llama.CPU_VARIANT / CUDA_VARIANT, or PIPESPEC_STATIC_VARIANT=<name>
    return StaticWorker(model, name, device, compile=fast == "compile", quantize=quantize,
                        prepare_layer=prepare_layer)


def load_worker(source: Any, name: str, device: torch.device, dtype: Any, trust_remote_code: bool,
                fast: bool | str, quantize: str | None = None) -> LogitsWorker:
    """Load a model from a resolved ``loading.Source`` and wrap it in its worker; runs where the worker will live
    (the runner's thread or process), so it is a plain top-level function of plain arguments.

    Quantized onto a GPU: loaded on the CPU, then layer by layer moved, fused and quantized there, so the GPU never
    holds the whole model in bf16 (a 70B in 8 bits fits one H200; in bf16 it does not)."""
    from ..loading import load_model, resolve_dtype

    staged = quantize is not None and device.type == "cuda" and fast is not False
    home = torch.device("cpu") if staged else device
    model = load_model(source, home, resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    if not staged:
        return make_worker(model, name, device, fast, quantize)
    for child_name, child in model.model.named_children():  # everything but the decoder layers goes now
        if child_name != "layers":
            child.to(device)
    model.lm_head.to(device)
    return make_worker(model, name, device, fast, quantize, prepare_layer=lambda layer: layer.to(device))


def load_named_worker(spec: str, name: str, device: torch.device, dtype: Any, trust_remote_code: bool,
                      fast: bool | str, quantize: str | None = None) -> LogitsWorker:
    """``load_worker`` for a model name resolved where the worker lives (another machine: its own installation's
    built-in family, its own folders and hub cache)."""
    from ..loading import resolve_source

    return load_worker(resolve_source(spec), name, device, dtype, trust_remote_code, fast, quantize)


def adopt_worker(model: Any, name: str, device: torch.device, fast: bool | str,
                 quantize: str | None = None) -> LogitsWorker:
    """Wrap an already-loaded HF model (moved to ``device``, in eval mode) in its worker (quantizing it in place)."""
    return make_worker(model.to(device).eval(), name, device, fast, quantize)


def load_layered_worker(source: Any, name: str, devices: Sequence[torch.device], dtype: Any, trust_remote_code: bool,
                        fast: bool | str) -> LogitsWorker:
    """A model split layer-wise over ``devices`` (``--split layers``): loaded on the CPU, then the embedding and the
    first run of layers go to ``devices[0]``, the next run to ``devices[1]`` and so on (``placement.layer_assignment``),
    the final norm and lm_head to the last device (to the first where lm_head is tied to the embedding). Only the
    static forward follows layer devices (HF's eager forward would need accelerate's hooks), so the model must take
    the static path; CUDA graphs are off for it (one graph per device)."""
    from ..errors import ConfigError
    from ..loading import load_model, resolve_dtype
    from ..placement import layer_assignment
    from .static_llama import supports_static

    if fast is False:
        raise ConfigError(f"{name}: a layer-wise split runs the static forward; it cannot run with the fast path off")
    model = load_model(source, torch.device("cpu"), resolve_dtype(dtype, devices[0]),
                       trust_remote_code=trust_remote_code)
    reason = supports_static(model)
    if reason is not None:
        raise ConfigError(f"{name} cannot be split over {len(devices)} devices: the layer-wise split needs the static "
                          f"forward ({reason})")
    inner = model.model
    tied = model.lm_head.weight is inner.embed_tokens.weight
    inner.embed_tokens.to(devices[0])
    inner.rotary_emb.to(devices[0])
    for layer, d in zip(inner.layers, layer_assignment(len(inner.layers), len(devices))):
        layer.to(devices[d])
    inner.norm.to(devices[-1])
    model.lm_head.to(devices[0] if tied else devices[-1])
    return make_worker(model.eval(), name, devices[0], "compile" if fast == "compile" else True)
