"""The public ``Pipeline``: load a chain once, then run generations on it one after another.

```python
async with pipespec.Pipeline.load(["a", "b", "c"], device="cpu") as pipe:
    g = await pipe.generate("def add(a, b):", max_new_tokens=64)
    async for piece in pipe.stream("def add(a, b):", max_new_tokens=64):
        print(piece, end="")
```
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any

import anyio
import structlog
import torch

from ..errors import ConfigError, ModelLoadError, PipelineClosed, PipelineError, PipespecError
from ..loading import load_model, load_tokenizer, preload_transformers, resolve_dtype, resolve_source
from ..models import ModelWorker, make_worker
from ..policy import ChainMonitor
from ..runtime import Runner, resolve_device
from ..types import Generation, GenerationStats, Mode, Snapshot
from ..verify import SamplingParams
from .lockstep import run_lockstep
from .output import Output
from .request import Member, Request
from .run import LiveRun, build_stages, run_pipe, stage_failed

_log = structlog.get_logger("pipespec.pipeline")


def log(level: str, event: str, **fields: object) -> None:
    """Log only where the application configured structlog (the CLI does): a library must not print to the
    stdout of the program that embeds it, which is what structlog's unconfigured default would do."""
    if structlog.is_configured():
        getattr(_log, level)(event, **fields)

MODES: tuple[Mode, ...] = ("pipe", "sd", "ar")
DRAIN_TIMEOUT = 10.0  # seconds a finished or cancelled generation waits for in-flight forward passes


class Pipeline:
    """A chain of causal LMs sharing one tokenizer, smallest first; the last one is the target."""

    def __init__(self, members: Sequence[Member], tokenizer: Any | None) -> None:
        if not members:
            raise ConfigError("a pipeline needs at least one model")
        self.members = tuple(members)
        self.tokenizer = tokenizer
        self._lock = anyio.Lock()
        self._live: LiveRun | None = None
        self._closed = False
        _check_vocabularies(self.members)
        # the adaptive runtime's knowledge of this chain; it carries over from one generation to the next
        self.monitor = ChainMonitor(len(self.members), contended=_contended(self.members))

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, models: Sequence[Any], *, device: str | torch.device | Sequence[str] = "auto",
             dtype: str | torch.dtype = "auto", tokenizer: Any | None = None, trust_remote_code: bool = False,
             fast: bool | str = "auto", on_loaded: Callable[[int, str], None] | None = None) -> _Loading:
        """Load a chain: model names/folders (see ``pipespec models``) or already-loaded HF models.

        ``device`` is one device for every model or one per model. ``fast``: "auto" runs LLaMA models over a
        static KV cache (with CUDA graphs on CUDA); True insists on it; "compile" adds torch.compile; False keeps
        HF's own forward with a dynamic cache.
        Await the result, or use it with ``async with``. ``on_loaded(i, name)`` is called as each model loads.
        """
        return _Loading(cls._load(models, device=device, dtype=dtype, tokenizer=tokenizer,
                                  trust_remote_code=trust_remote_code, fast=fast, on_loaded=on_loaded))

    @classmethod
    async def _load(cls, models: Sequence[Any], *, device: Any, dtype: Any, tokenizer: Any,
                    trust_remote_code: bool, fast: bool | str,
                    on_loaded: Callable[[int, str], None] | None) -> Pipeline:
        if isinstance(models, str):
            models = [m for m in models.split(",")]
        if not models:
            raise ConfigError("no models given")
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(models)
        if len(devices) != len(models):
            raise ConfigError(f"{len(devices)} devices given for {len(models)} models")
        resolved = [resolve_device(d) for d in devices]
        preload_transformers()
        sources = [None if not isinstance(m, str) else resolve_source(m) for m in models]
        _check_memory(sources, resolved, dtype)
        runners: list[Runner] = []
        workers: list[ModelWorker | None] = [None] * len(models)
        names = [s.name if s is not None else _model_name(m, i) for i, (s, m) in enumerate(zip(sources, models))]
        for i, name in enumerate(names):
            runners.append(Runner(f"{i}-{name}", resolved[i]))

        async def load_one(i: int) -> None:
            source, dev = sources[i], resolved[i]
            if source is None:
                model = models[i]
                await runners[i].call(lambda: model.to(dev).eval())
            else:
                model = await runners[i].call(load_model, source, dev, resolve_dtype(dtype, dev),
                                              trust_remote_code=trust_remote_code)
            workers[i] = await runners[i].call(make_worker, model, names[i], dev, fast)
            log("info", "model loaded", stage=i, model=names[i], device=str(dev))
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
            err = _first_error(exc)
            if isinstance(err, Exception) and not isinstance(err, PipespecError):
                raise ModelLoadError(f"loading the chain failed: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''}"[:300]) from err
            raise err from None
        members = [Member(names[i], runners[i], w) for i, w in enumerate(workers) if w is not None]
        return cls(members, tokenizer)

    # -- generation ---------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def target(self) -> Member:
        return self.members[-1]

    def snapshot(self) -> Snapshot | None:
        """The running (or last) generation as an immutable snapshot; call it from the event loop thread."""
        return self._live.snapshot() if self._live is not None else None

    def encode(self, prompt: str | Sequence[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this pipeline has no tokenizer: pass the prompt as token ids")
            if not prompt.strip():
                raise ConfigError("the prompt is empty")
            ids = tuple(self.tokenizer(prompt)["input_ids"])
        else:
            ids = tuple(int(t) for t in prompt)
        if not ids:
            raise ConfigError("the prompt is empty")
        vocab = self.target.worker.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})")
        return ids

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.target.worker.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def make_request(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, mode: Mode = "pipe",
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     acceptance: str = "coupled", stop: Sequence[str] | str = (), verify_cap: int = 64,
                     max_ahead: int | None = None, lookahead: int = 8, draft_batch: int = 1,
                     adaptive: bool = True) -> Request:
        """Validate a generation's options; every bad value raises a ConfigError with a one-line message."""
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: use pipe, sd or ar")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        for name, value, low in (("verify_cap", verify_cap, 1), ("lookahead", lookahead, 1),
                                 ("draft_batch", draft_batch, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if max_ahead is not None and max_ahead < 1:
            raise ConfigError(f"max_ahead must be >= 1, got {max_ahead}")
        try:
            params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                    seed=int(seed), acceptance=acceptance)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        ids = self.encode(prompt)
        limits = [m.worker.max_positions for m in self.members if m.worker.max_positions]
        context = min(limits) if limits else None
        if context is not None and len(ids) >= context:
            raise ConfigError(f"the prompt has {len(ids)} tokens; the context of this chain is {context}")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context of this chain ({context}); use at most {context - len(ids)} new tokens")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        return Request(prompt=ids, max_new_tokens=max_new_tokens, mode=mode, params=params, stop=stops,
                       verify_cap=verify_cap, max_ahead=max_ahead or max(verify_cap, lookahead),
                       lookahead=lookahead, draft_batch=draft_batch, adaptive=bool(adaptive))

    async def generate(self, prompt: str | Sequence[int], **options: Any) -> Generation:
        """Generate and return the whole result. Options: see ``make_request``."""
        request = self.make_request(prompt, **options)
        return await self._run(request, None)

    async def stream(self, prompt: str | Sequence[int], **options: Any) -> AsyncIterator[str]:
        """Yield the generated text piece by piece as the target commits it.

        The generation runs in a task this generator owns; leaving the loop early (break, cancellation, a timeout)
        cancels it and waits for every stage to stop.
        """
        request = self.make_request(prompt, **options)
        send, receive = anyio.create_memory_object_stream[str](64)
        result: list[Generation] = []

        async def produce() -> None:
            async with send:
                result.append(await self._run(request, send.send))

        task = asyncio.create_task(produce())
        try:
            async with receive:
                async for piece in receive:
                    yield piece
            await task  # re-raises the generation's error, if any
        finally:
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _run(self, request: Request, on_piece: Callable[[str], Awaitable[None]] | None) -> Generation:
        if self._closed:
            raise PipelineClosed("this pipeline is closed")
        async with self._lock:
            members = self.members if request.mode != "ar" else self.members[-1:]
            if request.mode == "sd" and len(members) == 1:
                request = _replace_mode(request, "ar")
            output = Output(self.tokenizer, request.max_new_tokens, self.eos_ids(), request.stop, on_piece)
            adaptive = request.adaptive and request.mode == "pipe"
            stages = build_stages(members, request, output, self.monitor if adaptive else None)
            live = LiveRun(request, stages, output)
            busy_before = [m.runner.busy_seconds for m in members]
            self._live = live
            try:
                for i, m in enumerate(members):
                    seed = request.params.seed * 1000003 + i if request.params.rule == "rejection" else None
                    try:  # a static KV cache grows here: running out of memory is reported like a stage failure
                        await m.runner.call(m.worker.reset, seed, request.max_len)
                    except Exception as exc:  # noqa: BLE001
                        raise stage_failed(stages[i], exc) from exc
                live.started = time.perf_counter()
                if request.mode == "sd":
                    await run_lockstep(stages, live, request.lookahead)
                else:
                    await run_pipe(stages, live)
            except BaseException as exc:
                live.finished = live.finished or time.perf_counter()
                err = _first_error(exc)
                if isinstance(err, PipelineError):
                    log("error", "generation failed", error=str(err))
                    raise err from err.__cause__  # the stage's own error, not the task group wrapping this one
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    for m in members:
                        if not await m.runner.drain(DRAIN_TIMEOUT):
                            log("warning", "forward pass still running after cancel", model=m.name)
                        m.runner.submit(m.worker.release)
        tokens = tuple(output.tokens)
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True) if self.tokenizer is not None else ""
        stats = GenerationStats(tokens=len(tokens), seconds=live.elapsed, mode=request.mode,
                                stages=tuple(_stage_dict(s.stats, s.runner.busy_seconds - b)
                                             for s, b in zip(stages, busy_before)),
                                prompt_tokens=len(request.prompt), stop_reason=output.stop_reason or "length")
        if request.mode == "ar" and len(self.members) > 1:
            stats = _ar_stats_for_chain(stats, self.members)
        return Generation(text=text, token_ids=tokens, stats=stats)

    # -- lifetime -----------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            for m in self.members:
                await anyio.to_thread.run_sync(m.runner.close)

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


class _Loading:
    """``Pipeline.load(...)``: await it for a pipeline, or ``async with`` it to close the pipeline afterwards."""

    def __init__(self, coro: Awaitable[Pipeline]) -> None:
        self._coro = coro
        self._pipeline: Pipeline | None = None

    def __await__(self) -> Generator[Any, None, Pipeline]:
        return self._coro.__await__()

    async def __aenter__(self) -> Pipeline:
        self._pipeline = await self._coro
        return self._pipeline

    async def __aexit__(self, *exc: object) -> None:
        if self._pipeline is not None:
            await self._pipeline.__aexit__(*exc)


def _contended(members: Sequence[Member]) -> tuple[bool, ...]:
    """Per stage: whether it shares its device with another stage that does real work there."""
    busy = [m.device if getattr(m.worker, "contends", True) else None for m in members]
    return tuple(d is not None and busy.count(d) > 1 for d in busy)


def _replace_mode(request: Request, mode: Mode) -> Request:
    from dataclasses import replace

    return replace(request, mode=mode)


def _model_name(model: Any, index: int) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return path.rstrip("/").split("/")[-1] or f"model{index}"


def _stage_dict(stats: Any, busy: float) -> dict[str, Any]:
    d = stats.to_dict()
    d["busy_seconds"] = round(busy, 4)
    return d


def _ar_stats_for_chain(stats: GenerationStats, members: Sequence[Member]) -> GenerationStats:
    """In ``ar`` mode only the target runs; still report one entry per model, in chain order."""
    idle = tuple({"model": m.name, "device": m.device, "forwards": 0, "proposed": 0, "accepted": 0, "verifications": 0,
                  "acceptance": None, "accepted_per_verification": None, "drafted": 0, "rollbacks": 0,
                  "rollbacks_sent": 0, "bypasses": 0, "busy_seconds": 0.0} for m in members[:-1])
    return GenerationStats(tokens=stats.tokens, seconds=stats.seconds, mode=stats.mode,
                           stages=idle + stats.stages, prompt_tokens=stats.prompt_tokens,
                           stop_reason=stats.stop_reason)


def _first_error(exc: BaseException) -> BaseException:
    """The error to show for a failed task group: the first non-cancellation exception inside it."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_error(inner)
            if not isinstance(found, (asyncio.CancelledError, anyio.get_cancelled_exc_class())):
                return found
        return exc.exceptions[0]
    return exc


def _check_vocabularies(members: Sequence[Member]) -> None:
    sizes = [m.worker.vocab_size for m in members]
    if len(set(sizes)) > 1:
        listing = ", ".join(f"{m.name}={s}" for m, s in zip(members, sizes))
        raise ConfigError(f"the models do not share a vocabulary (output sizes {listing}); "
                          "every model of a chain must use the target's tokenizer")


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


def _check_memory(sources: Sequence[Any], devices: Sequence[torch.device], dtype: Any) -> None:
    """Refuse, before loading anything, a placement whose weights cannot fit in the GPUs' free memory."""
    from ..placement import check_fits, estimate_bytes

    if not any(d.type == "cuda" for d in devices):
        return
    needs = []
    for source, dev in zip(sources, devices):
        size = None
        if source is not None and source.kind in ("builtin", "folder"):
            size = estimate_bytes(source.location, torch.finfo(resolve_dtype(dtype, dev)).bits // 8)
        needs.append((source.name if source is not None else "model", str(dev), size))
    free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    check_fits(needs, free)
