"""Loading a chain: resolve every model, check the placement fits, start one runner per model and build its worker
there (all models load at once), load the target's tokenizer, and refuse chains whose models do not share it.

A model whose device entry names several devices (``cuda:0+cuda:1``, ``placement.stage_devices``) is split over
them: ``split="tensor"`` builds rank 0 of a tensor-parallel stage on its runner (``runners.tensor_parallel``: the
other ranks are processes of their own), ``split="layers"`` spreads its layers (``workers.load_layered_worker``).
The runner lives on the first device.

Returns the chain's ``Member``s; ``Pipeline.load`` wraps them in a pipeline. Every failure is one ``ConfigError`` or
``ModelLoadError`` line; a model's own error wins over the tokenizer's (they load concurrently).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import structlog
import torch

from ..errors import ConfigError, ModelLoadError, PipespecError, first_error, first_line
from ..kernels.quant import parse_quantize
from ..loading import load_tokenizer, preload_transformers, resolve_dtype, resolve_source
from ..placement import SPLITS, resolve_device, stage_devices
from ..runners.backend import Backend, as_backend
from ..workers import adopt_worker, load_layered_worker, load_named_worker, load_worker
from ..workers.base import WorkerInfo
from .request import Member

__all__ = ["load_chain"]

_log = structlog.get_logger("pipespec.pipeline")


async def load_chain(models: Sequence[Any] | str, *, device: Any, dtype: Any, tokenizer: Any,
                     trust_remote_code: bool, fast: bool | str,
                     on_loaded: Callable[[int, str], None] | None,
                     backend: str | Backend | None = None,
                     quantize: str | Sequence[str | None] | None = None,
                     split: str = "tensor") -> tuple[list[Member], Any]:
    """The members of a chain (smallest first) and the target's tokenizer (``tokenizer`` when given); ``backend``
    says where the workers live (``runners.backend``: this process's threads by default); ``split`` how a model on
    several devices is split (``placement.SPLITS``)."""
    backend = as_backend(backend)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use {' or '.join(SPLITS)}")
    if isinstance(models, str):
        models = models.split(",")
    if not models:
        raise ConfigError("no models given")
    devices = backend.devices(len(models)) or (
        list(device) if isinstance(device, (list, tuple)) else [device] * len(models))
    if len(devices) != len(models):
        raise ConfigError(f"{len(devices)} devices given for {len(models)} models")
    groups = [stage_devices(d) if isinstance(d, str) else [d] for d in devices]
    if backend.kind == "ray" and any(len(g) > 1 for g in groups):
        raise ConfigError("a stage on several devices is not supported with the ray backend (each actor uses one)")
    # a Ray stage's device is one of its node's (seen from inside its actor), not this machine's
    kinds = (parse_quantize(quantize, len(models)) if quantize is None or isinstance(quantize, str)
             else [parse_quantize(q, 1)[0] for q in quantize])
    if len(kinds) != len(models):
        raise ConfigError(f"quantize has {len(kinds)} entries for {len(models)} models")
    stage_groups = [[resolve_device(d) if backend.kind != "ray" else _remote_device(d) for d in g] for g in groups]
    resolved = [g[0] for g in stage_groups]  # the runner's device: rank 0's, or the split's first
    preload_transformers()
    sources = [None if not isinstance(m, str) else resolve_source(m) for m in models]
    for group, source, model in zip(stage_groups, sources, models):
        if len(group) > 1 and (source is None or source.kind == "gguf"):
            raise ConfigError(f"{source.spec if source else _model_name(model, 0)}: only a model folder, a built-in "
                              "model or a hub id can be split over several devices (not a loaded model or a GGUF file)")
    if backend.kind != "ray":
        _check_memory(sources, stage_groups, dtype, kinds, workers_here=backend.in_process)
    names = [s.name if s is not None else _model_name(m, i) for i, (s, m) in enumerate(zip(sources, models))]
    runners = backend.runners(names, resolved)
    infos: list[WorkerInfo | None] = [None] * len(models)

    async def load_one(i: int) -> None:
        source, dev, group = sources[i], resolved[i], stage_groups[i]
        if len(group) > 1 and kinds[i] is not None:
            raise ConfigError(f"--quantize {kinds[i]} for {names[i]}: a model on several GPUs is not quantized yet "
                              "(place it on one GPU, or leave its weights in 16 bits)")
        if len(group) > 1 and split == "tensor":
            from ..runners.tensor_parallel import load_tp_stage

            infos[i] = await runners[i].start(load_tp_stage, source, names[i], [str(d) for d in group], dtype,
                                              trust_remote_code, fast)
        elif len(group) > 1:
            infos[i] = await runners[i].start(load_layered_worker, source, names[i], group, dtype, trust_remote_code,
                                              fast)
        elif source is None:
            infos[i] = await runners[i].start(adopt_worker, models[i], names[i], dev, fast, kinds[i])
        elif backend.kind == "ray":  # another node: its own paths (the built-in family's install, folders, cache)
            infos[i] = await runners[i].start(load_named_worker, models[i], names[i], dev, dtype, trust_remote_code,
                                              fast, kinds[i])
        else:
            infos[i] = await runners[i].start(load_worker, source, names[i], dev, dtype, trust_remote_code, fast,
                                              kinds[i])
        if structlog.is_configured():
            _log.info("model loaded", stage=i, model=names[i], device="+".join(map(str, group)),
                      split=split if len(group) > 1 else None)
        if on_loaded is not None:
            on_loaded(i, names[i])

    tokenizer_error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(models)):
                tg.start_soon(load_one, i)
            if tokenizer is None and sources[-1] is not None:
                try:
                    tokenizer = await anyio.to_thread.run_sync(
                        lambda: load_tokenizer(sources[-1], trust_remote_code=trust_remote_code))
                except Exception as exc:  # noqa: BLE001 - raised below, unless a model's own error comes first
                    tokenizer_error = exc
        if tokenizer_error is not None:
            raise tokenizer_error
        if len(models) > 1 and tokenizer is not None:
            await anyio.to_thread.run_sync(_check_tokenizers, sources, tokenizer)
    except BaseException as exc:
        for runner in runners:
            runner.close(wait=False)
        err = first_error(exc)
        if isinstance(err, Exception) and not isinstance(err, PipespecError):
            raise ModelLoadError(f"loading the chain failed: {type(err).__name__}: {first_line(err, 300)}"[:300]
                                 ) from err
        raise err from None
    members = [Member(names[i], runners[i], info) for i, info in enumerate(infos) if info is not None]
    return members, tokenizer


def _remote_device(device: Any) -> torch.device:
    """A device on another machine: only its spelling is checked here ('auto' means a GPU where Ray gives one)."""
    if str(device) == "auto":
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!s}: use cpu, cuda or cuda:N")
    return torch.device("cuda", 0) if dev.type == "cuda" else dev


def _model_name(model: Any, index: int) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return path.rstrip("/").split("/")[-1] or f"model{index}"


def _check_tokenizers(sources: Sequence[Any], target_tokenizer: Any) -> None:
    """Compare the token->id maps of every model that ships a tokenizer with the target's."""
    target_vocab = target_tokenizer.get_vocab()
    for source in sources[:-1]:
        if source is None:
            continue
        try:
            other = load_tokenizer(source)
        except Exception:  # noqa: BLE001 - a model without a tokenizer of its own uses the target's
            continue
        if other.get_vocab() != target_vocab:
            raise ConfigError(f"model {source.spec!r} uses a different tokenizer from the target "
                              f"({sources[-1].spec!r}); every model of a chain must share the target's tokenizer")


def _check_memory(sources: Sequence[Any], groups: Sequence[Sequence[torch.device]], dtype: Any,
                  kinds: Sequence[str | None], *, workers_here: bool = True) -> None:
    """Refuse, before loading anything, a placement whose weights cannot fit in the GPUs' free memory (a model on
    several GPUs puts 1/n of its bytes on each: ``placement.check_fits``). ``kinds``: each model's --quantize kind
    (8-bit weights count one byte); ``workers_here``: whether the workers live in this process (else no CUDA
    context is made here to ask)."""
    from ..placement import check_fits, estimate_bytes, free_gpu_memory

    if not any(d.type == "cuda" for g in groups for d in g):
        return
    needs = []
    for source, group, kind in zip(sources, groups, kinds):
        size = None
        if source is not None and source.kind in ("builtin", "folder"):
            # "auto" on CUDA is bf16 or fp16: 2 bytes either way, without asking the GPU (that initialises CUDA)
            dev = group[0]
            width = 2 if dtype == "auto" and dev.type == "cuda" else torch.finfo(resolve_dtype(dtype, dev)).bits // 8
            size = estimate_bytes(source.location, width, quantize=kind)
        needs.append((source.name if source is not None else "model", "+".join(str(d) for d in group), size))
    free = free_gpu_memory(workers_here)
    if free is not None:
        check_fits(needs, free)
