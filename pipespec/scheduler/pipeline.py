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
from dataclasses import replace
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, NamedTuple

import anyio
import structlog
import torch

from ..errors import ConfigError, PipelineClosed, PipelineError, first_error
from ..runners.backend import Backend
from ..types import REQUEST_MODES, Generation, GenerationStats, Mode, RequestMode, Snapshot, StageStats
from ..verify import SamplingParams
from .choices import ChoiceStore
from .loader import load_chain
from .lockstep import run_lockstep
from .output import Output, steady_rate
from .policy import ChainMonitor
from .request import Member, Request
from .run import LiveRun, build_stages, run_pipe, stage_failed
from .tracing import TraceTo, start_trace, traced_members
from ..tracing import Tracer

_log = structlog.get_logger("pipespec.pipeline")


def log(level: str, event: str, **fields: object) -> None:
    """Log only where the application configured structlog (the CLI does): a library must not print to the
    stdout of the program that embeds it, which is what structlog's unconfigured default would do."""
    if structlog.is_configured():
        getattr(_log, level)(event, **fields)

DRAIN_TIMEOUT = 10.0  # seconds a finished or cancelled generation waits for in-flight forward passes
PROBE_TOKENS = 64  # mode "auto": tokens per probe generation, whatever the request asks for (a pipeline needs a few
# dozen tokens to reach its steady state: probes of 16 tokens on an H200 ranked ar first where sd and pipe ran 1.6x it)
PROBE_ROUNDS = 2  # ... and probes per mode (the best counts)
# sd's lookahead, where the request left it unset: the probes also try twice and half the default, one step each
# way, never past this cap. 16, not 32: a 64-token probe holds only 2-3 rounds of 32 (no steady state), and a round
# of 32 gains little (alpha 0.9: 9.7 tokens per round against 8.1 at 16) for twice the drafting. On an H200 ({68m,
# 7b}, one GPU) the best lookahead was 16 at alpha 0.9 (sd:4 470, sd:8 669, sd:16 754 tokens/s) and 8 at 0.7.
SD_LOOKAHEAD_MAX = 16
SD_LOOKAHEAD_MIN = 2  # one draft per round
SD_TUNE_BAND = 0.6  # tune only while sd at the request's lookahead is within this of the leader. Not 0.8: on an
# H200 ({68m,7b,13b} on one GPU, alpha 0.7) sd:8 ran at 0.75x ar while sd:4 beat ar by 8 % (sd:4 is 1.44x sd:8);
# an sd further behind than 0.6 would need a tuning gain over 1.67x to win, and its extra probes would be wasted
RUNOFF_BAND = 0.85  # after the short probes, every mode within this of the leader runs once more over ...
RUNOFF_TOKENS = 128  # ... this many tokens, and that run decides. On an H200 64-token probes rated the speculative
# modes low against their 128-token runs, and auto ran the wrong one of a near tie ({68m,7b,13b} on one GPU: alpha 0.9,
# probes pipe 161.4 / sd:4 166.6 tokens/s, timed 220.0 / 175.5, auto ran sd, 0.80x; alpha 0.7, probes ar 108.0 / sd:4
# 107.4, timed 105.3 / 114.8, auto ran ar, 0.92x). Probing again while pipe's probes gained (its adaptive runtime
# learning across generations) was tried first: it probed pipe a third time and still rated it 161.4.
RUNOFF_MIN_ROUNDS = 2  # runoff runs per mode, interleaved; the best run of each counts, as in the probes; ...
RUNOFF_ROUNDS = 3  # ... one more where the leader is not RUNOFF_CLEAR ahead of every other mode after those
RUNOFF_CLEAR = 1.10
# One run each let a single slow run decide: CI (2 loaded cores, {0.3 ms, 6 ms} at 0.9) ran the runoff pipe 565.8 /
# sd:16 572.0, chose sd, then timed pipe 1.08x sd:16 over 15 paired rounds (a quiet run of pipe: 664-736). With a
# busy loop on one of this VM's two cores one run of pipe fell to 519.9 against sd:16's 606.5, a false 1.17x lead.
WARM_UP_TOKENS = 32  # ``Pipeline.warm_up``: tokens of the short generation that lets the next one replay CUDA graphs


class AutoChoice(NamedTuple):
    """What mode "auto" chose: the mode, why (the probes' rates), and the lookahead sd runs at."""

    mode: Mode
    reason: str
    lookahead: int | None = None  # the tuned lookahead where sd was chosen; None: the request's own


async def tune_lookahead(measure: Callable[[int], Awaitable[float]], start: int, rates: dict[int, float], *,
                         low: int = SD_LOOKAHEAD_MIN, high: int = SD_LOOKAHEAD_MAX) -> int:
    """The best lookahead found by doubling or halving from ``start`` (its rate already in ``rates``), each kept
    within [low, high], measured with ``measure`` (a lookahead -> tokens/s) into ``rates``: twice first, and on while
    doubling wins; where twice did not win, half, and on while halving wins. A hill climb in powers of two: the rate
    over the lookahead has one peak (the analytical model's sd; each step measured, not assumed)."""
    best = start
    for grow in (True, False):
        candidate = min(2 * best, high) if grow else max(best // 2, low)
        while low <= candidate <= high and candidate not in rates:
            rates[candidate] = await measure(candidate)
            if rates[candidate] <= rates[best]:
                break
            best = candidate
            candidate = min(2 * best, high) if grow else max(best // 2, low)
        if best != start:
            break  # doubling won: halving will not
    return max(rates, key=lambda la: rates[la])


def runoff_modes(rates: dict[Mode, float], band: float | None = None) -> list[Mode]:
    """The modes whose probe rate is within ``band`` (default ``RUNOFF_BAND``) of the best one, the leader first; a
    runoff needs two."""
    band = RUNOFF_BAND if band is None else band
    leader = max(rates, key=lambda m: rates[m])
    return [leader] + [m for m in rates if m != leader and rates[m] >= band * rates[leader]]


def runoff_settled(rates: dict[Mode, float], clear: float | None = None) -> bool:
    """Whether a runoff may stop: its leader's rate is at least ``clear`` (default ``RUNOFF_CLEAR``) times every
    other mode's."""
    clear = RUNOFF_CLEAR if clear is None else clear
    top, *rest = sorted(rates.values(), reverse=True)
    return all(top >= clear * r for r in rest)


def choice_parts(request: Request) -> dict[str, Any]:
    """What of a request changes which mode runs fastest (``ChoiceStore``'s key, beside what was loaded where):
    greedy or sampled and the acceptance rule, a lookahead the caller gave, the pipe settings. Not the prompt."""
    sampled = request.params.temperature > 0
    return {"sampled": sampled, "acceptance": request.params.acceptance if sampled else None,
            "lookahead": request.lookahead if request.lookahead_given else None, "verify_cap": request.verify_cap,
            "max_ahead": request.max_ahead, "draft_batch": request.draft_batch, "adaptive": request.adaptive}


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
        _check_vocabularies(self.members, tokenizer)
        # the adaptive runtime's knowledge of this chain; it carries over from one generation to the next
        self.monitor = self.fresh_monitor()
        self.auto_choice: AutoChoice | None = None  # mode "auto": what the probes chose, and why
        # mode "auto"'s choices remembered across processes (the CLI sets one; None: probe in every process)
        self.choices: ChoiceStore | None = None
        # what runs before a generation starts (mode auto's probe, a warm-up), for a live view; else None
        self.preparing: str | None = None
        self._generations = 0  # generations run on this pipeline so far (probes and warm-ups included)

    def fresh_monitor(self) -> ChainMonitor:
        """An adaptive runtime that knows this chain's placement (who shares a device) and nothing it learned:
        assign it to ``monitor`` to forget (benchmarks do, between settings)."""
        return ChainMonitor(len(self.members), contended=_contended(self.members), devices=_gpus(self.members))

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, models: Sequence[Any], *, device: str | torch.device | Sequence[str] = "auto",
             dtype: str | torch.dtype = "auto", tokenizer: Any | None = None, trust_remote_code: bool = False,
             fast: bool | str = "auto", on_loaded: Callable[[int, str], None] | None = None,
             backend: str | Backend = "thread", quantize: str | Sequence[str | None] | None = None,
             split: str = "tensor") -> _Loading:
        """Load a chain: model names/folders (see ``pipespec models``) or already-loaded HF models.

        ``device`` is one device for every model or one per model; ``"cuda:0+cuda:1"`` puts a model on both GPUs,
        split as ``split`` says: "tensor" (tensor-parallel, a process per further GPU; the default) or "layers"
        (layer-wise). ``"cpu+cpu"`` runs a tensor-parallel stage as two CPU ranks (gloo; tests).
        ``fast``: "auto" runs LLaMA models over a static KV cache (with CUDA graphs on CUDA); True insists on it;
        "compile" adds torch.compile; False keeps HF's own forward with a dynamic cache.
        ``backend``: where the workers live: "thread" (this process, the default), "process" (a process per model on
        this machine) or "ray" (an actor per model on a Ray cluster), or a ``runners.Backend`` with its settings.
        ``quantize``: weight-only 8-bit weights on the static path (``pipespec.kernels``): "int8" or "fp8" for every
        model, "target=int8" for the target only, or one entry (a kind or None) per model in chain order. The
        output then equals the *quantized* target decoding alone. An already-loaded model is quantized in place.
        Await the result, or use it with ``async with``. ``on_loaded(i, name)`` is called as each model loads.
        """
        async def load() -> Pipeline:
            members, tok = await load_chain(models, device=device, dtype=dtype, tokenizer=tokenizer,
                                            trust_remote_code=trust_remote_code, fast=fast, on_loaded=on_loaded,
                                            backend=backend, quantize=quantize, split=split)
            return cls(members, tok)

        return _Loading(load())

    # -- generation ---------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def context(self) -> int | None:
        """The chain's context limit in tokens (its smallest model's), or None when no model states one."""
        limits = [m.info.max_positions for m in self.members if m.info.max_positions]
        return min(limits) if limits else None

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

    def make_request(self, prompt: str | Sequence[int], *, max_new_tokens: int = 128, mode: RequestMode = "pipe",
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     acceptance: str = "coupled", stop: Sequence[str] | str = (), verify_cap: int = 64,
                     max_ahead: int | None = None, lookahead: int | None = None, draft_batch: int = 0,
                     adaptive: bool = True) -> Request:
        """Validate a generation's options; every bad value raises a ConfigError with a one-line message.

        ``lookahead``: None (not given) means 8, which mode "auto" may tune (``choose_mode``); a given one is kept."""
        lookahead_given = lookahead is not None
        lookahead = 8 if lookahead is None else lookahead
        if mode not in REQUEST_MODES:
            raise ConfigError(f"unknown mode {mode!r}: use {', '.join(REQUEST_MODES)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        for name, value, low in (("verify_cap", verify_cap, 1), ("lookahead", lookahead, 1),
                                 ("draft_batch", draft_batch, 0)):
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
        context = self.context
        if context is not None and len(ids) >= context:
            raise ConfigError(f"the prompt has {len(ids)} tokens; the context of this chain is {context}")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context of this chain ({context}); use at most {context - len(ids)} new tokens")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        return Request(prompt=ids, max_new_tokens=max_new_tokens, mode=mode, params=params, stop=stops,
                       verify_cap=verify_cap, max_ahead=max_ahead or max(verify_cap, lookahead),
                       lookahead=lookahead, lookahead_given=lookahead_given, draft_batch=draft_batch,
                       adaptive=bool(adaptive))

    async def generate(self, prompt: str | Sequence[int], *, trace: TraceTo = None, warm_up: bool = False,
                       **options: Any) -> Generation:
        """Generate and return the whole result. Options: see ``make_request``.

        ``trace``: a file name to write this generation's timeline to (Chrome / Perfetto trace-event JSON, see
        ``pipespec.tracing`` and docs/usage.md), or a ``Tracer`` to add it to (the caller writes it).
        ``warm_up``: first a short untimed generation where it pays (``warm_up``; the CLI asks for it)."""
        request = self.make_request(prompt, **options)
        if warm_up:
            await self.warm_up(request)
        return await self._run(request, None, trace)

    async def stream(self, prompt: str | Sequence[int], *, trace: TraceTo = None, warm_up: bool = False,
                     **options: Any) -> AsyncIterator[str]:
        """Yield the generated text piece by piece as the target commits it (``trace``: as for ``generate``).

        The generation runs in a task this generator owns; leaving the loop early (break, cancellation, a timeout)
        cancels it and waits for every stage to stop.
        """
        request = self.make_request(prompt, **options)
        send, receive = anyio.create_memory_object_stream[str](64)
        result: list[Generation] = []

        async def produce() -> None:
            async with send:
                if warm_up:
                    await self.warm_up(request)
                result.append(await self._run(request, send.send, trace))

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

    async def warm_up(self, request: Request, tokens: int = WARM_UP_TOKENS) -> bool:
        """Before this pipeline's first generation, where a model is on CUDA: one short generation of ``request``
        (``tokens`` tokens, no stop strings, not published, its output dropped), so that the generation after it
        replays CUDA graphs. A static worker captures the shapes a generation met at the next one's start
        (``StaticWorker.reset``), so a process's first generation runs every shape eagerly, and ``pipespec run`` (one
        generation per process) would never replay one: the built-in family on an H200 took 1.9 s for 256 tokens
        of ``ar`` eagerly, 0.15 s replayed. Mode auto resolves first: its probes warm up too, and then nothing more
        runs. Returns whether a warm-up generation ran."""
        if self._generations or not _on_cuda(self.members):
            return False
        if request.mode == "auto":
            await self.choose_mode(request)
            if self._generations:  # the probes ran: they met the shapes
                return False
        self.preparing = "warming up: a short generation, so the next one replays CUDA graphs"
        try:
            await self._run(replace(request, max_new_tokens=min(tokens, request.max_new_tokens), stop=()), None,
                            publish=False)
        finally:
            self.preparing = None
        return True

    async def choose_mode(self, request: Request) -> AutoChoice:
        """Mode "auto": the mode that measures fastest on this chain and placement, and why; probed once per
        Pipeline (``auto_choice``; set it to None to probe again), or read back from ``choices`` where an earlier
        process probed the same chain, placement and kind of request (``scheduler.choices``; written there after
        probing). The probes are not published (``snapshot``); ``preparing`` says which one runs.

        Every mode runs ``PROBE_ROUNDS`` short generations of the request's own prompt and sampling options
        (``PROBE_TOKENS`` tokens, interleaved ar, sd, pipe, ar, ...), and the best rate of each mode counts, so a
        first run that pays for warm-up (graph captures, caches) does not decide. Modes within ``RUNOFF_BAND`` of the
        leader then run over ``RUNOFF_TOKENS`` tokens, interleaved, ``RUNOFF_MIN_ROUNDS`` times each, once more
        (``RUNOFF_ROUNDS``) unless one leads by ``RUNOFF_CLEAR`` (``runoff_settled``), and the best run of each
        decides (short probes rate the speculative modes low, so a near tie is decided on longer runs). Greedy
        outputs are identical in every mode (lossless), so which one runs changes only the speed.

        sd's lookahead: where the request left it unset (``lookahead_given``) and sd is within ``SD_TUNE_BAND`` of
        the leader, sd is probed at doubled or halved lookaheads too (``tune_lookahead``), and sd counts at its best
        one, which the choice remembers. A lookahead the caller gave is respected: only it is probed."""
        if self.auto_choice is not None:
            return self.auto_choice
        if len(self.members) == 1:
            self.auto_choice = AutoChoice("ar", "one model: the target alone")
            return self.auto_choice
        parts = choice_parts(request)
        found = self.choices.get(parts) if self.choices is not None else None
        if found is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(found.when))
            again = f" ({self.choices.again})" if self.choices.again else ""
            self.auto_choice = AutoChoice(found.mode, f"remembered from the probes of {when}{again}: {found.reason}",
                                          found.lookahead)
            return self.auto_choice
        try:
            self.auto_choice = await self._probe_modes(request)
        finally:
            self.preparing = None
        if self.choices is not None:
            self.choices.put(parts, *self.auto_choice)
        return self.auto_choice

    async def _probe_modes(self, request: Request) -> AutoChoice:
        """``choose_mode``'s measurements: the probes, sd's tuning and the runoff; the choice and why."""
        room = self.context - len(request.prompt) if self.context else max(PROBE_TOKENS, RUNOFF_TOKENS)
        n = max(1, min(PROBE_TOKENS, room))

        runs = 0

        async def rate(mode: Mode, lookahead: int, tokens: int = n) -> float:
            nonlocal runs
            runs += 1
            self.preparing = f"mode auto: probe {runs}, {mode}" + (f":{lookahead}" if mode == "sd" else "")
            probe = _replace_mode(request, mode, max_new_tokens=tokens, stop=(), lookahead=lookahead)
            stats = (await self._run(probe, None, publish=False)).stats
            # the steady decode rate: a short probe's start (prefills, first round) and cut-off last round cost the
            # speculative modes more than ar, whose rounds are one token (H200, {68m,7b,13b}, alpha 0.7: 64-token
            # probes rated sd:8 13 % and pipe 9 % under their 128-token medians, ar 2 %; auto then ran ar, 0.91x)
            return stats.steady_tokens_per_second or stats.tokens_per_second

        async def sd_rate(lookahead: int) -> float:  # another lookahead: its own PROBE_ROUNDS, the best counts
            return max([await rate("sd", lookahead) for _ in range(PROBE_ROUNDS)])

        rates: dict[Mode, float] = {"ar": 0.0, "sd": 0.0, "pipe": 0.0}
        for _ in range(PROBE_ROUNDS):
            for mode in rates:
                rates[mode] = max(rates[mode], await rate(mode, request.lookahead))
        sd_rates = {request.lookahead: rates["sd"]}
        if not request.lookahead_given and rates["sd"] >= SD_TUNE_BAND * max(rates["ar"], rates["pipe"]):
            tuned = await tune_lookahead(sd_rate, request.lookahead, sd_rates)
            rates["sd"] = sd_rates[tuned]
        lookahead = max(sd_rates, key=lambda la: sd_rates[la])
        best = max(rates, key=lambda m: rates[m])
        listing = ", ".join([f"ar {rates['ar']:.1f}"] + [f"sd:{la} {sd_rates[la]:.1f}" for la in sorted(sd_rates)]
                            + [f"pipe {rates['pipe']:.1f}"])
        close = runoff_modes(rates)
        longer = max(1, min(RUNOFF_TOKENS, room))
        if len(close) > 1 and longer > n:  # a near tie: longer runs decide
            final = {m: 0.0 for m in close}
            for rounds in range(1, RUNOFF_ROUNDS + 1):
                for m in close:
                    final[m] = max(final[m], await rate(m, lookahead if m == "sd" else request.lookahead, longer))
                if rounds >= RUNOFF_MIN_ROUNDS and runoff_settled(final):
                    break
            best = max(final, key=lambda m: final[m])
            listing += "; runoff over {} tokens, best of {}: {}".format(longer, rounds, ", ".join(
                f"{m}:{lookahead} {final[m]:.1f}" if m == "sd" else f"{m} {final[m]:.1f}" for m in close))
        what = f"sd (lookahead {lookahead})" if best == "sd" else best
        log("debug", "mode chosen", mode=what, tokens_per_s=listing)  # debug: at -v it would land in a streamed reply
        return AutoChoice(best, f"{what}: fastest in probes on this placement ({PROBE_ROUNDS} x {n} tokens per mode, "
                                f"best run each; tokens/s: {listing})", lookahead if best == "sd" else None)

    async def _run(self, request: Request, on_piece: Callable[[str], Awaitable[None]] | None,
                   trace: TraceTo = None, publish: bool = True) -> Generation:
        """One generation. ``publish``: whether ``snapshot`` shows it (not mode auto's probes: a live view, or
        the text printed on Ctrl-C, would show a probe's text as the caller's)."""
        if self._closed:
            raise PipelineClosed("this pipeline is closed")
        if request.mode == "auto":
            chosen, reason, tuned = await self.choose_mode(request)
            changes: dict[str, Any] = {}
            if chosen == "sd" and tuned is not None and tuned != request.lookahead:
                if request.lookahead_given:  # the caller's lookahead wins over one tuned on an earlier request
                    reason += f"; lookahead {request.lookahead} as requested"
                else:
                    changes["lookahead"] = tuned
            g = await self._run(_replace_mode(request, chosen, **changes), on_piece, trace, publish=publish)
            stats = replace(g.stats, mode_chosen=chosen, reason=reason)
            return Generation(text=g.text, token_ids=g.token_ids, stats=stats)
        tracer = trace if isinstance(trace, Tracer) or trace is None else Tracer()
        self._generations += 1
        async with self._lock:
            members: Sequence[Member] = self.members if request.mode != "ar" else self.members[-1:]
            if request.mode == "sd" and len(members) == 1:
                request = _replace_mode(request, "ar")
            if tracer is not None:
                members = traced_members(members, tracer)
            output = Output(self.tokenizer, request.max_new_tokens, self.eos_ids(), request.stop, on_piece)
            adaptive = request.adaptive and request.mode == "pipe"
            stages = build_stages(members, request, output, self.monitor if adaptive else None)
            live = LiveRun(request, stages, output)
            busy_before = [m.runner.busy_seconds for m in members]
            if publish:
                self._live = live
            recording = None
            try:
                if tracer is not None:
                    recording = await start_trace(tracer, members, stages)
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
                    idle = True
                    for m in members:
                        if not await m.runner.drain(DRAIN_TIMEOUT):
                            idle = False
                            log("warning", "forward pass still running after cancel", model=m.name)
                        m.runner.submit("release")
                    if recording is not None:
                        recording.probe.uninstall()  # first, whatever happens to the reads below
                        # reading the GPU spans back waits on the runners: bounded, and skipped behind a stuck one
                        with anyio.move_on_after(DRAIN_TIMEOUT if idle else 0):
                            await recording.finish()
        tokens = tuple(output.tokens)
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True) if self.tokenizer is not None else ""
        stats = GenerationStats(tokens=len(tokens), seconds=live.elapsed, mode=request.mode,
                                stages=tuple(_stage_dict(s.stats, s.runner.busy_seconds - b)
                                             for s, b in zip(stages, busy_before)),
                                prompt_tokens=len(request.prompt), stop_reason=output.stop_reason or "length",
                                steady_tokens_per_second=steady_rate(output.commits))
        if request.mode == "ar" and len(self.members) > 1:
            stats = _ar_stats_for_chain(stats, self.members)
        if tracer is not None:
            tracer.meta.setdefault("generations", []).append(stats.to_dict())
            if not isinstance(trace, Tracer):
                tracer.write(trace)  # type: ignore[arg-type]
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


def _gpus(members: Sequence[Member]) -> tuple[frozenset[str] | None, ...]:
    """Per stage: the CUDA devices it computes on (``cuda:0+cuda:1``: both), None where it does no real work there."""
    out: list[frozenset[str] | None] = []
    for m in members:
        parts = frozenset(p for p in str(m.device).split("+") if p.startswith("cuda"))
        out.append(parts if parts and m.info.contends else None)
    return tuple(out)


def _on_cuda(members: Sequence[Member]) -> bool:
    """Whether a model of the chain runs on CUDA (where its static worker replays CUDA graphs)."""
    return any(m.device.startswith("cuda") for m in members)


def _replace_mode(request: Request, mode: Mode, **changes: Any) -> Request:
    return replace(request, mode=mode, **changes)


def _stage_dict(stats: StageStats, busy: float) -> dict[str, Any]:
    stats.busy_seconds = busy
    return stats.to_dict()


def _ar_stats_for_chain(stats: GenerationStats, members: Sequence[Member]) -> GenerationStats:
    """In ``ar`` mode only the target runs; still report one entry per model, in chain order."""
    idle = tuple(StageStats(model=m.name, device=m.device).to_dict() for m in members[:-1])
    return replace(stats, stages=idle + stats.stages)  # every other field as it was


def _check_vocabularies(members: Sequence[Member], tokenizer: Any | None) -> None:
    """Output widths may differ only by padding rows (Qwen2.5: 151936 rows for 0.5B/1.5B, 152064 for 7B/72B, one
    tokenizer): every width must hold the tokenizer's ids, or, with no tokenizer to ask, the narrowest must be within
    1 % of the widest. Tokens past a model's width have probability 0 under it (``workers.base.same_width``)."""
    sizes = [m.info.vocab_size for m in members]
    if len(set(sizes)) == 1:
        return
    listing = ", ".join(f"{m.name}={s}" for m, s in zip(members, sizes))
    if tokenizer is not None:
        ids = len(tokenizer)
        if ids <= min(sizes):
            return
        raise ConfigError(f"the models do not share a vocabulary: their output sizes ({listing}) do not all hold "
                          f"the tokenizer's {ids} ids; every model of a chain must use the target's tokenizer")
    if min(sizes) >= 0.99 * max(sizes):
        return
    raise ConfigError(f"the models do not share a vocabulary (output sizes {listing}); "
                      "every model of a chain must use the target's tokenizer")
