"""``pipespec bench``: every decoding method on the same prompts, in one process, on the same devices.

Methods (all greedy, batch 1):

- ``hf``: HF transformers ``generate`` of the target alone, in its strongest configuration: on CUDA a static KV
  cache, which HF compiles (compile time is kept out of the timing by the warm-up; the eager dynamic-cache figure is
  reported too, as ``extra.hf_eager``); on the CPU plain ``generate``.
- ``hf_assisted``: HF assisted generation (``assistant_model=``) with the best single draft of the chain: each
  non-target model is tried on the first prompt and the fastest is kept.
- ``ar``, ``sd``, ``pipe``: pipespec's own modes, through one ``Pipeline`` loaded once. The HF methods reuse its
  already-loaded model objects, on a thread of their own (torch.compile and CUDA graph state is per thread, so
  whatever HF leaves behind cannot reach the pipeline's threads), never while a pipeline generation runs.

Terms: a method's *ms/token* is the wall time of its generations (prefill included) summed over the prompts, divided
by the tokens they generated; *speedup over b* is b's ms/token divided by the method's. Every method must produce the
same token ids (compared up to and including the first EOS): greedy speculation is lossless.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .report import METHODS, build_report
from ...errors import ConfigError, first_line
from ...prompts import load_prompts
from ...runners.backend import as_backend
from ...runners.thread import ThreadRunner
from ...scheduler import Pipeline
from ...types import STAGE_COUNTERS

__all__ = ["METHODS", "BenchSettings", "GpuMonitor", "run_bench"]

GPU_SAMPLE_SECONDS = 0.05

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
    lookahead: int = 8
    verify_cap: int = 64
    adaptive: bool = True  # pipe: the adaptive runtime (caps, run-ahead, stage bypass); off for a static chain
    trust_remote_code: bool = False
    backend: Any = "thread"  # where the workers live (``runners.Backend`` or its kind name)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: use {', '.join(METHODS)}")
        for name, value, low in (("--n", self.n, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--warmup", self.warmup, 0), ("--lookahead", self.lookahead, 1),
                                 ("--verify-cap", self.verify_cap, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        hf = [m for m in self.methods if m.startswith("hf")]
        if hf and not as_backend(self.backend).in_process:
            raise ConfigError(f"the HF baselines ({', '.join(hf)}) run the pipeline's own model objects in this "
                              "process: use --backend thread, or leave them out (--methods ar,sd,pipe)")


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
    """One method's timed generations, one entry per prompt."""

    seconds: list[float] = field(default_factory=list)
    outputs: list[Ids] = field(default_factory=list)
    gpu: GpuSamples = field(default_factory=GpuSamples)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)

    @property
    def ms_per_token(self) -> float:
        return 1000.0 * self.total_seconds / self.tokens if self.tokens else float("inf")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.total_seconds if self.total_seconds > 0 else 0.0


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
    """HF ``generate`` on the pipeline's own model objects, run on one fixed thread of its own (a ``Runner``).

    HF is told to stop exactly where pipespec stops: after ``max_new_tokens`` or at the first EOS (kept), with the
    same EOS ids and no length floor. Settings a model's ``generation_config`` may carry that would change greedy
    output (repetition penalty, n-gram blocking) are reset.
    """

    def __init__(self, pipe: Pipeline, max_new_tokens: int, longest_prompt: int) -> None:
        from transformers import GenerationConfig

        self.pipe = pipe
        self.runner = ThreadRunner("hf", pipe.target.worker.device)
        eos = sorted(pipe.eos_ids())
        tok = pipe.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        self.kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "min_new_tokens": 0, "do_sample": False, "num_beams": 1,
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "eos_token_id": eos or None, "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
        }
        # One static cache size for every prompt, so that a longer prompt does not make HF allocate a new cache
        # and recompile while the clock runs (older transformers lack the option; then the warm-up prompt decides).
        self.static_kwargs: dict[str, Any] = {"cache_implementation": "static"}
        if hasattr(GenerationConfig(), "max_cache_len"):
            self.static_kwargs["max_cache_len"] = longest_prompt + max_new_tokens

    @property
    def compiled(self) -> bool:
        """Whether the strongest HF configuration is the compiled static cache (CUDA), not plain generate."""
        return self.pipe.target.worker.device.type == "cuda"

    async def generate(self, prompt: Ids, *, static: bool = False, assistant: int | None = None) -> Ids:
        target = self.pipe.target
        kwargs = dict(self.kwargs)
        if static:
            kwargs.update(self.static_kwargs)
        if assistant is not None:
            kwargs["assistant_model"] = self.pipe.members[assistant].worker.model
        return await self.runner.run(_hf_generate, target.worker.model, target.worker.device, prompt, kwargs)

    def close(self) -> None:
        self.runner.close(wait=False)


def _hf_generate(model: Any, device: torch.device, prompt: Ids, kwargs: dict[str, Any]) -> Ids:
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, prompt]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, prompt + generated]
    return tuple(out[0, len(prompt):].tolist())  # .tolist() waits for the GPU: the timing covers the whole run


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

    async def warm_up(self, prompt: Ids, pipe: Pipeline) -> None:
        await _settle(pipe)
        await self.generate(prompt)

    async def time_one(self, prompt: Ids, pipe: Pipeline, monitor: GpuMonitor) -> None:
        await _settle(pipe)
        with monitor.measure(self.timing.gpu):
            start = time.perf_counter()
            ids = await self.generate(prompt)
            self.timing.seconds.append(time.perf_counter() - start)
        self.timing.outputs.append(ids)


async def _settle(pipe: Pipeline) -> None:
    """Wait until every model thread is idle (e.g. the KV-cache release queued after a pipeline generation), so
    that nothing of one method runs on the clock, or on the GPU, of the next."""
    for m in pipe.members:
        await m.runner.drain()


def _pipespec(pipe: Pipeline, mode: str, s: BenchSettings) -> Contender:
    options = {"max_new_tokens": s.max_new_tokens, "mode": mode, "verify_cap": s.verify_cap,
               "lookahead": s.lookahead, "adaptive": s.adaptive}

    async def generate(prompt: Ids) -> Ids:
        g = await pipe.generate(prompt, **options)
        if contender.stages is not None:
            contender.stages.add(g.stats.to_dict())
        return g.token_ids

    contender = Contender(mode, generate, stages=_StageTotals() if mode != "ar" else None)
    return contender


async def _prepare(method: str, pipe: Pipeline, hf: HFBaselines | None, first: Ids, s: BenchSettings,
                   extra: dict[str, Any], say: Progress) -> list[Contender]:
    """The contender(s) of one method, warmed up on the first prompt (hf on CUDA also gives ``hf_eager``)."""
    if method in ("ar", "sd", "pipe"):
        made = [_pipespec(pipe, method, s)]
        warmups = s.warmup
    elif hf is None:  # only when no HF method was asked for
        raise ConfigError(f"{method} needs the HF baselines")
    elif method == "hf" and hf.compiled:
        # compile traces on the first call and CUDA graphs record on the next: two warm-ups at least
        made = [Contender("hf", lambda p: hf.generate(p, static=True)), Contender("hf_eager", hf.generate)]
        warmups = max(s.warmup, 2)
    elif method == "hf":
        made, warmups = [Contender("hf", hf.generate)], s.warmup
    else:
        made, warmups = [await _choose_assistant(pipe, hf, first, s, extra, say)], 0  # warmed by its trial
    for c in made:
        for _ in range(warmups):
            await c.warm_up(first, pipe)
        if c.stages is not None:  # warm-up runs do not count
            c.stages = _StageTotals()
    return made


async def _choose_assistant(pipe: Pipeline, hf: HFBaselines, first: Ids, s: BenchSettings, extra: dict[str, Any],
                            say: Progress) -> Contender:
    """HF assisted generation with the single draft of the chain that is fastest on the first prompt."""
    drafts = list(range(len(pipe.members) - 1))
    if not drafts:
        raise _Skip("assisted generation needs a chain of at least two models")
    trials: dict[str, float] = {}
    for i in drafts:
        trial = Contender("trial", lambda p, i=i: hf.generate(p, assistant=i))
        for _ in range(s.warmup):
            await trial.warm_up(first, pipe)
        await trial.time_one(first, pipe, GpuMonitor([]))
        trials[pipe.members[i].name] = round(trial.timing.ms_per_token, 3)
        say(f"hf_assisted: draft {pipe.members[i].name}: {trial.timing.ms_per_token:.2f} ms/token on the first prompt")
    best = min(drafts, key=lambda i: trials[pipe.members[i].name])
    extra["hf_assisted"] = {"assistant": pipe.members[best].name, "trials_ms_per_token": trials}
    return Contender("hf_assisted", lambda p: hf.generate(p, assistant=best))


class _Skip(Exception):
    """A method that cannot run on this chain (reported, not an error)."""


def _failure(exc: Exception) -> str:
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
    async with Pipeline.load(list(s.models), device=list(s.devices) if s.devices else s.device, dtype=s.dtype,
                             trust_remote_code=s.trust_remote_code, backend=s.backend) as pipe:
        prompts = [pipe.encode(t) for t in texts]
        for p in prompts:  # every option and prompt length is checked before anything is timed
            pipe.make_request(p, max_new_tokens=s.max_new_tokens, verify_cap=s.verify_cap, lookahead=s.lookahead)
        # a Ray stage's device is on its node, not here: no GPU samples for those
        local = as_backend(s.backend).kind != "ray"
        monitor = GpuMonitor([torch.device(m.device) for m in pipe.members] if local else [])
        # the HF baselines need the model objects in this process (validate() refused them on other backends)
        wanted = any(m.startswith("hf") for m in s.methods)
        hf = HFBaselines(pipe, s.max_new_tokens, max(len(p) for p in prompts)) if wanted else None
        try:
            outcome, extra = await _run_all(pipe, hf, prompts, s, monitor, say)
        finally:
            if hf is not None:
                hf.close()
        return build_report(s, pipe, prompts, outcome, extra)


async def _run_all(pipe: Pipeline, hf: HFBaselines | None, prompts: Sequence[Ids], s: BenchSettings, monitor: GpuMonitor,
                   say: Progress) -> tuple[dict[str, list[Contender] | str], dict[str, Any]]:
    extra: dict[str, Any] = {}
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
    for k, prompt in enumerate(prompts, 1):
        say(f"timing prompt {k}/{len(prompts)}")
        for c in contenders:
            if c.error is None:
                try:
                    await c.time_one(prompt, pipe, monitor)
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    c.error = _failure(exc)
                    say(f"{c.name}: {c.error}")
    return outcome, extra


def eprint(message: str) -> None:
    print(f"pipespec bench: {message}", file=sys.stderr, flush=True)
