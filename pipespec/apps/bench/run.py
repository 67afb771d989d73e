"""``pipespec bench``: every decoding method on the same prompts, in one process, on the same devices.

Methods (all greedy, batch 1):

- ``hf``: HF transformers ``generate`` of the target alone, in its strongest configuration: on CUDA a static KV
  cache, which HF compiles (compile time is kept out of the timing by the warm-up; the eager dynamic-cache figure is
  reported too, as ``extra.hf_eager``); on the CPU plain ``generate``.
- ``hf_assisted``: HF assisted generation (``assistant_model=``) with the best single draft of the chain: each
  non-target model is tried on the first prompt and the fastest is kept.
- ``ar``, ``sd``, ``pipe``: pipespec's own modes, through one ``Pipeline`` loaded once.

Where the HF baselines run (``hf_isolation``):

- ``auto`` (the default): ``process`` on CUDA, ``thread`` elsewhere. Why: at 456791d, on two H200s, the default
  bench (all methods, the default prompt set, float32 built-in family) ended in "CUDA error: unspecified launch
  failure" in pipespec's graph replays whenever HF's compiled generate ran in the same process beside the
  speculative modes (``--methods hf,hf_assisted,ar,sd,pipe`` and ``hf,auto`` crashed; ``hf,ar`` and pipespec's
  modes alone did not; the ``code`` prompt set did not crash either). Not root-caused; no static cache grew first.
- ``thread``: HF runs on the pipeline's already-loaded model objects, on one thread of its own, never
  while a pipeline generation runs; every method in one process. Less memory (no second copy of the target).
- ``process``: each HF method (``hf`` with its ``hf_eager`` extra; ``hf_assisted``) runs in a
  child process of its own that loads the models itself, from the same sources, on the same devices, in the same
  dtype. HF's compiled static-cache ``generate`` uses torch.compile's ``reduce-overhead`` mode (inductor CUDA-graph
  trees: a private memory pool, per-thread tree managers, static input addresses it assumes stable); pipespec's
  workers capture CUDA graphs of their own and re-point HF's q/k/v and gate/up weights at views of fused tensors.
  At commit 275cc74 the two in one process ended in "an illegal memory access" on two H200s (issue 13); since the
  static worker captures into a fresh graph pool after its cache grows (captures had gone into a pool whose
  memory was released with the old graphs), five in-process benches in both orders and the minimal reproduction
  ran whole on two H200s (docs/benchmarks.md). In a process of its own HF can neither corrupt nor be corrupted by
  the pipeline, whatever the cause; a crash there is reported as that method's failure and every other method
  still runs. The child times its own generations (the same clock boundaries as in-process: from the call to the
  ids on the host), so the pipe between the processes is not timed. Slower to start (each child loads and
  compiles on its own: a 2-prompt run took over 90 s on an H200).

Terms: a method's *ms/token* is the wall time of its generations (prefill included) summed over the prompts, divided
by the tokens they generated; *speedup over b* is b's ms/token divided by the method's. Every method must produce the
same token ids (compared up to and including the first EOS): greedy speculation is lossless.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import traceback
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .hf import HFProcess, hf_compile_config, hf_generate
from .report import METHODS, build_report
from ...tracing import Tracer
from ...errors import ConfigError, first_line
from ...prompts import load_prompts
from ...runners.backend import as_backend
from ...runners.thread import ThreadRunner
from ...scheduler import Pipeline
from ...types import STAGE_COUNTERS

__all__ = ["METHODS", "BenchSettings", "GpuMonitor", "run_bench"]

GPU_SAMPLE_SECONDS = 0.05
HF_ISOLATION = ("auto", "thread", "process")
# "default" and "max-autotune-no-cudagraphs" compile without CUDA graphs (a diagnostic: is it HF's graphs?)
HF_COMPILE_MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs")

Ids = tuple[int, ...]
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchSettings:
    models: tuple[str, ...]
    prompts: str = "text"
    n: int = 5
    max_new_tokens: int = 128
    device: str = "auto"
    devices: tuple[str, ...] | None = None  # one per model (--placement); overrides ``device``
    dtype: str = "auto"
    methods: tuple[str, ...] = METHODS
    warmup: int = 1
    lookahead: int | None = None  # sd; None: 8, which the auto method may tune (Pipeline.choose_mode)
    verify_cap: int = 64
    adaptive: bool = True  # pipe: the adaptive runtime (caps, run-ahead, stage bypass); off for a static chain
    trust_remote_code: bool = False
    repeats: int = 1  # timed passes over the prompts; ms/token is the median pass, min and max reported beside it
    hf_isolation: str = "auto"  # auto | thread | process (see the module docstring)
    hf_compile_mode: str = "reduce-overhead"  # torch.compile mode of HF's static-cache generate (CUDA)
    trace: str | None = None  # a trace file: the timeline of every timed pipespec generation (pipespec.tracing)
    backend: Any = "thread"  # where the workers live (``runners.Backend`` or its kind name)
    quantize: str | None = None  # --quantize (pipespec.kernels.quant.parse_quantize); pipespec's methods only
    split: str = "tensor"  # how a model on several devices is split (``placement.SPLITS``)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: use {', '.join(METHODS)}")
        lookahead = 8 if self.lookahead is None else self.lookahead
        for name, value, low in (("--n", self.n, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--warmup", self.warmup, 0), ("--lookahead", lookahead, 1),
                                 ("--verify-cap", self.verify_cap, 1), ("--repeats", self.repeats, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.hf_isolation not in HF_ISOLATION:
            raise ConfigError(f"--hf-isolation {self.hf_isolation!r}: use {', '.join(HF_ISOLATION)}")
        if self.hf_compile_mode not in HF_COMPILE_MODES:
            raise ConfigError(f"--hf-compile-mode {self.hf_compile_mode!r}: use {', '.join(HF_COMPILE_MODES)}")
        hf = [m for m in self.methods if m.startswith("hf")]
        if hf and self.quantize is not None:
            raise ConfigError(f"--quantize applies to pipespec's methods; the HF baselines ({', '.join(hf)}) would "
                              "run unquantized: leave them out (--methods ar,sd,pipe,auto)")
        if hf and not as_backend(self.backend).in_process:
            raise ConfigError(f"the HF baselines ({', '.join(hf)}) run the pipeline's own model objects in this "
                              "process: use --backend thread, or leave them out (--methods ar,sd,pipe)")
        if hf and any("+" in str(d) for d in (self.devices or (self.device,))):
            raise ConfigError(f"the HF baselines ({', '.join(hf)}) run each model whole on one device: leave them out "
                              "(--methods ar,sd,pipe) when a model is placed on several GPUs")


@dataclass(slots=True)
class GpuSamples:
    """Running sums of GPU samples: mean utilisation over the chain's GPUs and their total power, per sample."""

    util: float = 0.0
    power: float = 0.0
    count: int = 0

    def result(self) -> dict[str, float] | None:
        if not self.count:
            return None
        return {"util_percent": round(self.util / self.count, 1), "power_watts": round(self.power / self.count, 1),
                "samples": self.count}


@dataclass(slots=True)
class Timing:
    """One method's timed generations: ``passes[r][k]`` is the wall time of prompt k in timed pass r.

    The outputs are those of the first pass; a later pass that gives a prompt other ids is recorded in ``unstable``
    (greedy decoding must repeat itself exactly).
    """

    passes: list[list[float]] = field(default_factory=list)
    outputs: list[Ids] = field(default_factory=list)
    unstable: list[dict[str, int]] = field(default_factory=list)
    gpu: GpuSamples = field(default_factory=GpuSamples)

    def record(self, pass_index: int, prompt_index: int, seconds: float, ids: Ids) -> None:
        while len(self.passes) <= pass_index:
            self.passes.append([])
        self.passes[pass_index].append(seconds)
        if pass_index == 0:
            self.outputs.append(ids)
        elif ids != self.outputs[prompt_index]:
            self.unstable.append({"pass": pass_index, "prompt": prompt_index})

    @property
    def complete_passes(self) -> list[list[float]]:
        return [p for p in self.passes if len(p) == len(self.outputs)]

    @property
    def tokens(self) -> int:
        """Tokens generated in one pass over the prompts."""
        return sum(len(o) for o in self.outputs)

    @property
    def pass_ms_per_token(self) -> list[float]:
        tokens = self.tokens
        return [1000.0 * sum(p) / tokens for p in self.complete_passes] if tokens else []

    @property
    def ms_per_token(self) -> float:
        """The median pass's ms/token (with an even count, the mean of the middle two)."""
        values = self.pass_ms_per_token
        return statistics.median(values) if values else float("inf")

    @property
    def seconds(self) -> list[float]:
        """Per prompt: the median over the passes."""
        full = self.complete_passes
        return [statistics.median(p[k] for p in full) for k in range(len(self.outputs))] if full else []

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        ms = self.ms_per_token
        return 1000.0 / ms if 0 < ms < float("inf") else 0.0


# -- GPU utilisation and power ------------------------------------------------------------------------------------


class GpuMonitor:
    """Samples utilisation and power of the chain's GPUs every 50 ms in a background thread (nvidia-ml-py).

    ``available`` is False without pynvml or without a CUDA device in the chain; ``measure`` then records nothing.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        indices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        if not indices:
            return
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._handles = [_nvml_handle(pynvml, i) for i in indices]
        except Exception:  # noqa: BLE001 - no nvidia-ml-py, or no driver: report no GPU figures
            self._handles = []
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def measure(self, into: GpuSamples) -> Iterator[None]:
        """Sample while the block runs (the first sample at once, so a short block still gets one)."""
        if not self.available:
            yield
            return
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
                    power = [self._nvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for h in self._handles]  # mW -> W
                except Exception:  # noqa: BLE001 - a failed read loses one sample, not the benchmark
                    pass
                else:
                    into.util += sum(util) / len(util)
                    into.power += sum(power)
                    into.count += 1
                stop.wait(GPU_SAMPLE_SECONDS)

        thread = threading.Thread(target=sample, name="pipespec-gpu-monitor", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=1.0)


def _nvml_handle(nvml: Any, index: int) -> Any:
    """NVML numbers GPUs differently from CUDA under CUDA_VISIBLE_DEVICES; match them by PCI bus id."""
    try:
        p = torch.cuda.get_device_properties(index)
        bus_id = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except Exception:  # noqa: BLE001 - older torch without PCI ids: fall back to the index
        return nvml.nvmlDeviceGetHandleByIndex(index)


# -- HF transformers baselines ------------------------------------------------------------------------------------


class HFBaselines:
    """HF ``generate`` of the chain's target, alone or assisted by one of the chain's drafts.

    HF is told to stop exactly where pipespec stops: after ``max_new_tokens`` or at the first EOS (kept), with the
    same EOS ids and no length floor. Settings a model's ``generation_config`` may carry that would change greedy
    output (repetition penalty, n-gram blocking) are reset.

    ``isolation="thread"``: on the pipeline's own model objects, on one fixed thread of its own (a ``Runner``).
    ``isolation="process"``: in child processes that load the models themselves (``apps.bench.hf``): one for ``hf``
    (static and eager), one for ``hf_assisted``, each started on its first use. ``last_seconds`` is then the
    child's own timing of the last generation (None in thread mode: the caller's clock is used).
    """

    def __init__(self, pipe: Pipeline, s: BenchSettings, longest_prompt: int) -> None:
        from transformers import GenerationConfig

        self.pipe = pipe
        self.settings = s
        # auto: a child process on CUDA (see the module docstring: a CUDA fault beside our graphs, not root-caused),
        # this process's thread elsewhere
        self.isolation = s.hf_isolation if s.hf_isolation != "auto" else (
            "process" if str(pipe.target.device).startswith("cuda") else "thread")
        self.runner: ThreadRunner | None = (ThreadRunner("hf", pipe.target.worker.device)
                                            if self.isolation == "thread" else None)
        self.processes: dict[str, Any] = {}
        self.last_seconds: float | None = None
        eos = sorted(pipe.eos_ids())
        tok = pipe.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        self.kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens, "min_new_tokens": 0, "do_sample": False, "num_beams": 1,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "eos_token_id": eos or None, "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        }
        # One static cache size for every prompt, so that a longer prompt does not make HF allocate a new cache
        # and recompile while the clock runs (older transformers lack the option; then the warm-up prompt decides).
        self.static_kwargs: dict[str, Any] = {"cache_implementation": "static"}
        if hasattr(GenerationConfig(), "max_cache_len"):
            self.static_kwargs["max_cache_len"] = longest_prompt + s.max_new_tokens

    @property
    def compiled(self) -> bool:
        """Whether the strongest HF configuration is the compiled static cache (CUDA), not plain generate."""
        return self.pipe.target.worker.device.type == "cuda"

    async def generate(self, prompt: Ids, *, static: bool = False, assistant: int | None = None) -> Ids:
        if self.runner is None:
            return await asyncio.to_thread(self._in_process, prompt, static, assistant)
        target = self.pipe.target
        kwargs = dict(self.kwargs)
        if static:
            kwargs.update(self.static_kwargs)
            config = hf_compile_config(self.settings.hf_compile_mode)
            if config is not None:
                kwargs["compile_config"] = config
        if assistant is not None:
            kwargs["assistant_model"] = self.pipe.members[assistant].worker.model
        self.last_seconds = None
        return await self.runner.run(hf_generate, target.worker.model, target.worker.device, prompt, kwargs)

    def _in_process(self, prompt: Ids, static: bool, assistant: int | None) -> Ids:
        """Blocking (called on a helper thread): one generation in the method's child process."""

        key = "hf" if assistant is None else "hf_assisted"
        proc = self.processes.get(key)
        if proc is None:
            s, members = self.settings, self.pipe.members
            devices = [str(m.worker.device) for m in members]
            if not all(isinstance(m, str) for m in s.models):
                raise ConfigError("--hf-isolation process needs models given by name or folder")
            load = {"target": (s.models[-1], devices[-1]), "dtype": s.dtype, "trust_remote_code": s.trust_remote_code,
                    "drafts": [(s.models[i], devices[i]) for i in range(len(members) - 1)] if key == "hf_assisted"
                    else [], "kwargs": self.kwargs, "static_kwargs": self.static_kwargs,
                    "compile_mode": s.hf_compile_mode}
            proc = self.processes[key] = HFProcess(key, load)
        answer = proc.request({"op": "generate", "prompt": list(prompt), "static": static, "assistant": assistant})
        self.last_seconds = float(answer["seconds"])
        return tuple(answer["ids"])

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close(wait=False)
        for proc in self.processes.values():
            proc.close()
        self.processes.clear()


# -- running the methods ------------------------------------------------------------------------------------------


class _StageTotals:
    """Per-stage counters of pipespec generations, summed over prompts."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, stats: dict[str, Any]) -> None:
        for i, st in enumerate(stats["stages"]):
            if len(self.rows) <= i:
                self.rows.append({"model": st["model"], **{k: 0 for k in STAGE_COUNTERS}})
            row = self.rows[i]
            for k in STAGE_COUNTERS:
                row[k] += st.get(k) or 0

    def result(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            row = dict(row, busy_seconds=round(row["busy_seconds"], 4))
            row["acceptance"] = round(row["accepted"] / row["proposed"], 4) if row["proposed"] else None
            row["accepted_per_verification"] = (round(row["accepted"] / row["verifications"], 3)
                                                if row["verifications"] else None)
            out.append(row)
        return out


@dataclass(slots=True)
class Contender:
    """One method as the timing loop sees it: a way to generate, and what its timed generations gave."""

    name: str
    generate: Callable[[Ids], Awaitable[Ids]]
    timing: Timing = field(default_factory=Timing)
    stages: _StageTotals | None = None  # pipespec's sd / pipe: per-stage counters
    error: str | None = None
    clock: Callable[[], float | None] | None = None  # the generation's own timing, where it has one (HF child)
    tracer: Tracer | None = None  # pipespec methods with --trace: where timed generations add their timeline
    trace_after_warmup: Tracer | None = None  # ... set once the warm-ups are done

    async def warm_up(self, prompt: Ids, pipe: Pipeline) -> None:
        await _settle(pipe)
        await self.generate(prompt)

    async def time_one(self, prompt: Ids, pipe: Pipeline, monitor: GpuMonitor, prompt_index: int = 0,
                       pass_index: int = 0) -> None:
        await _settle(pipe)
        with monitor.measure(self.timing.gpu):
            start = time.perf_counter()
            ids = await self.generate(prompt)
            seconds = time.perf_counter() - start
        own = self.clock() if self.clock is not None else None
        self.timing.record(pass_index, prompt_index, own if own is not None else seconds, ids)


async def _settle(pipe: Pipeline) -> None:
    """Wait until every model thread is idle (e.g. the KV-cache release queued after a pipeline generation), so
    that nothing of one method runs on the clock, or on the GPU, of the next."""
    for m in pipe.members:
        await m.runner.drain()


def _pipespec(pipe: Pipeline, mode: str, s: BenchSettings, tracer: Tracer | None = None,
              extra: dict[str, Any] | None = None) -> Contender:
    options = {"max_new_tokens": s.max_new_tokens, "mode": mode, "verify_cap": s.verify_cap,
               "lookahead": s.lookahead, "adaptive": s.adaptive}

    async def generate(prompt: Ids) -> Ids:
        # warm-ups are not traced: the contender's stage totals are reset after them, the tracer is set then too
        g = await pipe.generate(prompt, trace=contender.tracer, **options)
        if contender.stages is not None:
            contender.stages.add(g.stats.to_dict())
        if g.stats.mode_chosen is not None and extra is not None:
            extra[mode] = {"mode_chosen": g.stats.mode_chosen, "reason": g.stats.reason}
        return g.token_ids

    contender = Contender(mode, generate, stages=_StageTotals() if mode != "ar" else None)
    contender.trace_after_warmup = tracer
    return contender


async def _prepare(method: str, pipe: Pipeline, hf: HFBaselines | None, first: Ids, s: BenchSettings,
                   extra: dict[str, Any], say: Progress) -> list[Contender]:
    """The contender(s) of one method, warmed up on the first prompt (hf on CUDA also gives ``hf_eager``)."""
    clock = lambda: hf.last_seconds if hf is not None else None  # noqa: E731 - the HF child's own timing, if any
    if method in ("ar", "sd", "pipe", "auto"):
        made = [_pipespec(pipe, method, s, extra.get("_tracer"), extra)]
        warmups = max(s.warmup, 1) if method == "auto" else s.warmup  # auto probes in its first run
    elif hf is None:  # only when no HF method was asked for
        raise ConfigError(f"{method} needs the HF baselines")
    elif method == "hf" and hf.compiled:
        # compile traces on the first call and CUDA graphs record on the next: two warm-ups at least
        made = [Contender("hf", lambda p: hf.generate(p, static=True), clock=clock),
                Contender("hf_eager", hf.generate, clock=clock)]
        warmups = max(s.warmup, 2)
    elif method == "hf":
        made, warmups = [Contender("hf", hf.generate, clock=clock)], s.warmup
    else:
        made, warmups = [await _choose_assistant(pipe, hf, first, s, extra, say)], 0  # warmed by its trial
    for c in made:
        for _ in range(warmups):
            await c.warm_up(first, pipe)
        if c.stages is not None:  # warm-up runs do not count
            c.stages = _StageTotals()
        c.tracer = c.trace_after_warmup
    return made


async def _choose_assistant(pipe: Pipeline, hf: HFBaselines, first: Ids, s: BenchSettings, extra: dict[str, Any],
                            say: Progress) -> Contender:
    """HF assisted generation with the single draft of the chain that is fastest on the first prompt."""
    drafts = list(range(len(pipe.members) - 1))
    if not drafts:
        raise _Skip("assisted generation needs a chain of at least two models")
    trials: dict[str, float] = {}
    for i in drafts:
        trial = Contender("trial", lambda p, i=i: hf.generate(p, assistant=i), clock=lambda: hf.last_seconds)
        for _ in range(s.warmup):
            await trial.warm_up(first, pipe)
        await trial.time_one(first, pipe, GpuMonitor([]))
        trials[pipe.members[i].name] = round(trial.timing.ms_per_token, 3)
        say(f"hf_assisted: draft {pipe.members[i].name}: {trial.timing.ms_per_token:.2f} ms/token on the first prompt")
    best = min(drafts, key=lambda i: trials[pipe.members[i].name])
    extra["hf_assisted"] = {"assistant": pipe.members[best].name, "trials_ms_per_token": trials}
    return Contender("hf_assisted", lambda p: hf.generate(p, assistant=best), clock=lambda: hf.last_seconds)


class _Skip(Exception):
    """A method that cannot run on this chain (reported, not an error)."""


def _failure(exc: Exception) -> str:
    if os.environ.get("PIPESPEC_TRACEBACK") == "1":  # a developer hunting a crash: where it was raised
        traceback.print_exception(exc)
    return f"failed: {type(exc).__name__}: {first_line(exc)}"


async def run_bench(s: BenchSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Load the chain once, run every asked-for method on the same prompts, and return the report (a JSON dict).

    Every method is warmed up first; then the prompts are timed round-robin (prompt 1 through every method, then
    prompt 2, ...), so a change in machine load during the run hits every method alike.
    """
    s.validate()
    say = progress or (lambda _msg: None)
    try:
        texts = load_prompts(s.prompts)
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    if s.n > len(texts):
        raise ConfigError(f"--n {s.n} asks for more prompts than {s.prompts!r} has ({len(texts)})")
    texts = texts[:s.n]
    say(f"loading {', '.join(s.models)}")
    extra: dict[str, Any] = {}
    # PIPESPEC_FAST=0: the pipeline on HF's own forward (no static path, no fused weights, no CUDA graphs of ours);
    # a diagnostic (scripts/gpu_suite.sh's crash matrix), not an option: timings are then not pipespec's
    fast: bool | str = False if os.environ.get("PIPESPEC_FAST") == "0" else "auto"
    async with Pipeline.load(list(s.models), device=list(s.devices) if s.devices else s.device, dtype=s.dtype,
                             trust_remote_code=s.trust_remote_code, fast=fast, backend=s.backend,
                             quantize=s.quantize, split=s.split) as pipe:
        prompts = [pipe.encode(t) for t in texts]
        for p in prompts:  # every option and prompt length is checked before anything is timed
            pipe.make_request(p, max_new_tokens=s.max_new_tokens, verify_cap=s.verify_cap, lookahead=s.lookahead)
        # a Ray stage's device is on its node, not here: no GPU samples for those
        local = as_backend(s.backend).kind != "ray"
        monitor = GpuMonitor([torch.device(m.device) for m in pipe.members] if local else [])
        # the HF baselines need the model objects in this process (validate() refused them on other backends)
        wanted = any(m.startswith("hf") for m in s.methods)
        hf = HFBaselines(pipe, s, max(len(p) for p in prompts)) if wanted else None
        if hf is not None:
            extra["hf_isolation"] = hf.isolation
        try:
            outcome, extra = await _run_all(pipe, hf, prompts, s, monitor, say, extra)
        finally:
            if hf is not None:
                hf.close()
        return build_report(s, pipe, prompts, outcome, extra)


async def _run_all(pipe: Pipeline, hf: HFBaselines | None, prompts: Sequence[Ids], s: BenchSettings,
                   monitor: GpuMonitor, say: Progress,
                   extra: dict[str, Any]) -> tuple[dict[str, list[Contender] | str], dict[str, Any]]:
    if s.trace:
        extra["_tracer"] = Tracer()
    outcome: dict[str, list[Contender] | str] = {}  # a string: why the method did not run
    for method in s.methods:
        say(f"{method}: warming up")
        try:
            outcome[method] = await _prepare(method, pipe, hf, prompts[0], s, extra, say)
        except ConfigError:
            raise
        except _Skip as exc:
            outcome[method] = f"skipped: {exc}"
        except Exception as exc:  # noqa: BLE001 - one failing method is reported, the others still run
            outcome[method] = _failure(exc)
            say(f"{method}: {outcome[method]}")
    contenders = [c for made in outcome.values() if not isinstance(made, str) for c in made]
    for r in range(s.repeats):
        for k, prompt in enumerate(prompts):
            say(f"timing prompt {k + 1}/{len(prompts)}" + (f", pass {r + 1}/{s.repeats}" if s.repeats > 1 else ""))
            await _time_prompt(contenders, prompt, pipe, monitor, k, r, say)
    tracer = extra.pop("_tracer", None)
    if tracer is not None and s.trace:
        tracer.write(s.trace)
        say(f"trace of the timed pipespec generations written to {s.trace} (open it in https://ui.perfetto.dev)")
    return outcome, extra


async def _time_prompt(contenders: Sequence[Contender], prompt: Ids, pipe: Pipeline, monitor: GpuMonitor, k: int,
                       r: int, say: Progress) -> None:
    """Prompt k of pass r through every method still running (round-robin: machine load hits all alike)."""
    for c in contenders:
        if c.error is None:
            try:
                await c.time_one(prompt, pipe, monitor, k, r)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001
                c.error = _failure(exc)
                say(f"{c.name}: {c.error}")


def eprint(message: str) -> None:
    print(f"pipespec bench: {message}", file=sys.stderr, flush=True)
