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

from ..errors import ConfigError, PipelineClosed, PipelineError
from ..runners.backend import Backend
from ..types import MODES, Generation, GenerationStats, Mode, Snapshot, StageStats
from ..verify import SamplingParams
from .loader import first_error, load_chain
from .lockstep import run_lockstep
from .output import Output
from .policy import ChainMonitor
from .request import Member, Request
from .run import LiveRun, build_stages, run_pipe, stage_failed

_log = structlog.get_logger("pipespec.pipeline")


def log(level: str, event: str, **fields: object) -> None:
    """Log only where the application configured structlog (the CLI does): a library must not print to the
    stdout of the program that embeds it, which is what structlog's unconfigured default would do."""
    if structlog.is_configured():
        getattr(_log, level)(event, **fields)

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
             fast: bool | str = "auto", on_loaded: Callable[[int, str], None] | None = None,
             backend: str | Backend = "thread") -> _Loading:
        """Load a chain: model names/folders (see ``pipespec models``) or already-loaded HF models.

        ``device`` is one device for every model or one per model. ``fast``: "auto" runs LLaMA models over a
        static KV cache (with CUDA graphs on CUDA); True insists on it; "compile" adds torch.compile; False keeps
        HF's own forward with a dynamic cache.
        ``backend``: where the workers live: "thread" (this process, the default), "process" (a process per model on
        this machine) or "ray" (an actor per model on a Ray cluster), or a ``runners.Backend`` with its settings.
        Await the result, or use it with ``async with``. ``on_loaded(i, name)`` is called as each model loads.
        """
        async def load() -> Pipeline:
            members, tok = await load_chain(models, device=device, dtype=dtype, tokenizer=tokenizer,
                                            trust_remote_code=trust_remote_code, fast=fast, on_loaded=on_loaded,
                                            backend=backend)
            return cls(members, tok)

        return _Loading(load())

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
        vocab = self.target.info.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ConfigError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})")
        return ids

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        ids.update(self.target.info.eos_ids)
        return ids

    def make_request(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, mode: Mode = "pipe",
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     acceptance: str = "coupled", stop: Sequence[str] | str = (), verify_cap: int = 64,
                     max_ahead: int | None = None, lookahead: int = 8, draft_batch: int = 1,
                     adaptive: bool = True) -> Request:
        """Validate a generation's options; every bad value raises a ConfigError with a one-line message."""
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
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
        limits = [m.info.max_positions for m in self.members if m.info.max_positions]
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
                        await m.runner.call("reset", seed, request.max_len)
                    except Exception as exc:  # noqa: BLE001
                        raise stage_failed(stages[i], exc) from exc
                live.started = time.perf_counter()
                if request.mode == "sd":
                    await run_lockstep(stages, live, request.lookahead)
                else:
                    await run_pipe(stages, live)
            except BaseException as exc:
                live.finished = live.finished or time.perf_counter()
                err = first_error(exc)
                if isinstance(err, PipelineError):
                    log("error", "generation failed", error=str(err))
                    raise err from err.__cause__  # the stage's own error, not the task group wrapping this one
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    for m in members:
                        if not await m.runner.drain(DRAIN_TIMEOUT):
                            log("warning", "forward pass still running after cancel", model=m.name)
                        m.runner.submit("release")
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
    busy = [m.device if m.info.contends else None for m in members]
    return tuple(d is not None and busy.count(d) > 1 for d in busy)


def _replace_mode(request: Request, mode: Mode) -> Request:
    from dataclasses import replace

    return replace(request, mode=mode)


def _stage_dict(stats: StageStats, busy: float) -> dict[str, Any]:
    stats.busy_seconds = busy
    return stats.to_dict()


def _ar_stats_for_chain(stats: GenerationStats, members: Sequence[Member]) -> GenerationStats:
    """In ``ar`` mode only the target runs; still report one entry per model, in chain order."""
    idle = tuple(StageStats(model=m.name, device=m.device).to_dict() for m in members[:-1])
    return GenerationStats(tokens=stats.tokens, seconds=stats.seconds, mode=stats.mode,
                           stages=idle + stats.stages, prompt_tokens=stats.prompt_tokens,
                           stop_reason=stats.stop_reason)


def _check_vocabularies(members: Sequence[Member]) -> None:
    sizes = [m.info.vocab_size for m in members]
    if len(set(sizes)) > 1:
        listing = ", ".join(f"{m.name}={s}" for m, s in zip(members, sizes))
        raise ConfigError(f"the models do not share a vocabulary (output sizes {listing}); "
                          "every model of a chain must use the target's tokenizer")
