"""What every model worker is: the ``Worker`` protocol the runners serve, the ``StepResult`` of a decision, and
``LogitsWorker``, the decisions (verify, draft, prefill) that every real model shares on top of its KV cache.

A worker is synchronous code, always run by its model's runner (one fixed thread, or a process of its own). The
event loop never calls into a worker directly and never reads a tensor.

The KV cache always holds exactly the keys and values of ``self.cached`` (a token list). A call names the whole
sequence it wants logits for; the worker keeps the longest cached prefix that agrees with it, crops the rest (that
is the rollback: the entries past the divergence point are dropped), and forwards only the new tokens. So a
rollback costs nothing until the next forward, and a stale cache cannot survive a change of sequence.

Terms (proposal, verify, accepted, correction, bonus) as in the glossary of docs/architecture.md.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..verify import SamplingParams, choose, count_accepted, rejection_verify_device
from .readback import HostReader

__all__ = ["Worker", "WorkerInfo", "StepResult", "ProbRows", "LogitsWorker", "common_prefix", "gather_rows"]

# Rows of a proposer's probabilities: (tensor [m, vocab], row index) per proposed position.
ProbRows = Sequence[tuple[torch.Tensor, int]]

# The calls a runner serves by name (``await runner.call("step", ...)``): a worker's whole remote surface.
CALLS = ("prefill", "step", "draft", "reset", "release", "rollback", "describe", "gpu_trace", "gpu_spans")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case: one extends the other; a C-speed comparison
        return n
    lo, hi = 0, n  # binary search on prefix equality keeps it O(n) C work with O(log n) Python steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one forward pass of a stage decided.

    ``accepted`` leading proposals were kept; ``tokens`` are the kept proposals followed by the stage's own next
    token (correction or bonus), so ``len(tokens) == accepted + 1``. ``probs`` (rejection rule only) holds the
    stage's own rows q for those positions, ``[len(tokens), vocab]``: the p of the next stage down the chain.
    """

    accepted: int
    tokens: tuple[int, ...]
    probs: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the orchestrator may know of a worker without touching it (small, plain data: it crosses processes)."""

    name: str
    device: str
    vocab_size: int
    max_positions: int | None  # the model's context limit, if it has one
    contends: bool  # whether its forward passes compete for its device with other stages placed there
    eos_ids: tuple[int, ...] = ()  # end-of-sequence ids from the model's generation config
    dtype: str | None = None
    # proposals past which a verification's forward costs a step more (a quantized model's GEMV serves 16 rows per
    # launch: the 17th token doubles the forward): the stage's verify windows stay within it. None: no such step
    max_window: int | None = None


@runtime_checkable
class Worker(Protocol):
    """One model of the chain with its KV cache, as its runner serves it (every method by name, see ``CALLS``)."""

    name: str
    forwards: int

    def describe(self) -> WorkerInfo: ...

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None: ...

    def release(self) -> None: ...

    def rollback(self, length: int) -> None: ...

    def prefill(self, prompt: Sequence[int]) -> bool: ...

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult: ...

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult: ...


class LogitsWorker(ABC):
    """A real model: the stage decisions over ``forward``; subclasses own the KV cache (dynamic or static)."""

    contends = True

    def __init__(self, model: Any, name: str, device: torch.device) -> None:
        self.model = model
        self.name = name
        self.device = device
        self.config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # rows of the input embedding: ids at or past it cannot be fed. A chain may mix output widths that differ
        # only by padding rows (Qwen2.5: 0.5B/1.5B 151936, 7B/72B 152064); a wider target could in principle emit
        # a padding id, which a narrower stage then feeds as id 0 instead (only a proposer's speed can change).
        get_embeddings = getattr(model, "get_input_embeddings", None)
        embeddings = get_embeddings() if get_embeddings is not None else None
        self.id_limit = int(embeddings.weight.shape[0]) if embeddings is not None else self.vocab_size
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0) or None
        self.cached: list[int] = []
        self.forwards = 0
        self.generator: torch.Generator | None = None
        self.reader = HostReader()  # read-backs that wait for this worker's stream only (readback.py says why)

    def describe(self) -> WorkerInfo:
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        dtype = getattr(self.model, "dtype", None)
        return WorkerInfo(self.name, str(self.device), self.vocab_size, self.max_positions, self.contends,
                          tuple(int(e) for e in eos_ids), str(dtype).removeprefix("torch.") if dtype else None)

    # -- KV cache primitives (the subclass's) ---------------------------------------------------------------------

    @abstractmethod
    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        """Forget the cache (start of a generation); seed this stage's generator for the rejection rule.
        ``capacity`` (the longest sequence of the generation) matters only to static caches."""

    @abstractmethod
    def release(self) -> None:
        """Free what a generation holds (memory stays flat across many generations)."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Drop cache entries past ``length`` tokens."""

    @abstractmethod
    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        """Forward ``tokens`` at ``position`` (== cache length); returns [keep, vocab] float logits of the last
        ``keep`` of them."""

    def _seed(self, seed: int | None) -> None:
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)

    # -- GPU spans for a trace (pipespec.tracing): CUDA events around every forward, read back after the generation --

    _gpu_events: list[tuple[Any, Any, int]] | None = None
    _gpu_anchor: tuple[Any, float] | None = None

    def gpu_trace(self, on: bool) -> bool:
        """Start (or stop) recording the GPU time of every forward pass; CUDA only (returns whether it records).
        Call between generations: it synchronises the worker's stream once, to pin the events to the host clock."""
        if not on or self.device.type != "cuda":
            self._gpu_events = None
            return False
        # The anchor pins the GPU's clock to the host's: an event recorded on the idle stream runs as soon as it is
        # submitted, so its host time is when ``record`` returned (within the launch's few microseconds), the best of
        # three tries. Not when ``synchronize`` returned: that adds the thread's wake-up and, under load, its wait
        # for the GIL (two traces of the same code on one H200 had a stage's GPU track 0.13 ms apart that way).
        torch.cuda.current_stream(self.device).synchronize()
        best = None
        for _ in range(3):
            event = torch.cuda.Event(enable_timing=True)
            before = time.perf_counter()
            event.record()
            after = time.perf_counter()
            event.synchronize()
            if best is None or after - before < best[0]:
                best = (after - before, event, after)
        assert best is not None
        self._gpu_anchor = (best[1], best[2])
        self._gpu_events = []
        return True

    def gpu_spans(self) -> list[tuple[float, float, int]]:
        """The recorded forwards as (start, end, tokens fed), seconds on ``time.perf_counter``'s clock; clears them.
        Waits for the last one to finish (call it after the generation)."""
        events, anchor = self._gpu_events, self._gpu_anchor
        if not events or anchor is None:
            return []
        self._gpu_events = []
        events[-1][1].synchronize()
        event0, host0 = anchor
        return [(host0 + event0.elapsed_time(a) / 1e3, host0 + event0.elapsed_time(b) / 1e3, n) for a, b, n in events]

    def _feedable(self, tokens: Sequence[int]) -> Sequence[int]:
        """``tokens`` as this model can feed them: a padding id of a wider stage becomes 0 (see ``__init__``)."""
        if tokens and max(tokens) >= self.id_limit:
            return [t if t < self.id_limit else 0 for t in tokens]
        return tokens

    def _timed_forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        tokens = self._feedable(tokens)
        events = self._gpu_events
        if events is None:
            return self.forward(tokens, position, keep)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.forward(tokens, position, keep)
        end.record()
        events.append((start, end, len(tokens)))
        return out

    def _gpu_span_begin(self) -> tuple[Any, int] | None:
        """Open one GPU span around work that ``_timed_forward`` does not see (a multi-token draft: its forwards
        replay inside one graph); None when not tracing. Close it with ``_gpu_span_end``."""
        if self._gpu_events is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start, len(self._gpu_events)

    def _gpu_span_end(self, span: tuple[Any, int] | None, tokens: int) -> None:
        """Close ``span`` as one recorded span of ``tokens``; the forwards recorded inside it are dropped (they are
        part of it: a trace's GPU track shows each call's GPU time once)."""
        events = self._gpu_events
        if span is None or events is None:
            return
        start, mark = span
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        del events[mark:]
        events.append((start, end, tokens))

    # -- built on them ---------------------------------------------------------------------------------------------

    def prefill(self, prompt: Sequence[int]) -> bool:
        """Fill the cache with all but the last prompt token, so the first decision forwards a short window.
        Returns whether a forward pass ran (not for a one-token prompt)."""
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)
        self.rollback(keep)
        if keep < len(prompt) - 1:
            self._timed_forward(prompt[keep:-1], keep, 1)
            return True
        return False

    def logits(self, seq: Sequence[int], first: int) -> torch.Tensor:
        """Logits predicting positions ``first .. len(seq)`` of ``seq`` (the last row predicts the next token).

        Returns [len(seq) - first + 1, vocab]. Reuses the cache for the longest agreeing prefix.
        """
        if first < 1 or first > len(seq):
            raise ValueError(f"first={first} must be in [1, {len(seq)}]")
        keep_cache = min(common_prefix(self.cached, seq), first - 1)
        self.rollback(keep_cache)
        return self._timed_forward(seq[keep_cache:], keep_cache, len(seq) - first + 1)

    def step(self, seq: Sequence[int], start: int, params: SamplingParams,
             proposal_probs: ProbRows | None = None) -> StepResult:
        """Verify ``seq[start:]`` (proposals, possibly none) in one forward pass and choose the next token.

        With no proposals this is one ordinary decoding step.
        """
        n = len(seq) - start
        logits = self.logits(seq, start)  # [n + 1, vocab]
        positions = torch.arange(start, len(seq) + 1, device=logits.device)  # [n + 1]
        if params.rule != "rejection" or n == 0:
            own, q = choose(logits, params, positions, self.generator)  # [n + 1], [n + 1, vocab] | None
            choices = self.reader.ints(own)
            accepted = count_accepted(seq[start:], choices)
            tokens = tuple(seq[start:start + accepted]) + (choices[accepted],)
            rows = q[: accepted + 1] if q is not None else None
            return StepResult(accepted, tokens, rows)
        assert proposal_probs is not None and len(proposal_probs) == n, "rejection needs the proposer's rows"
        _, q = choose(logits, params, positions, self.generator)  # q: [n + 1, vocab]
        assert q is not None
        p = gather_rows(proposal_probs, self.device)  # [n, proposer's vocab]
        proposed = torch.tensor(list(seq[start:]), dtype=torch.long, device=self.device)
        p_wide, q_wide = same_width(p, q)  # widths that differ by padding rows: zero probability there
        # decided on the device, read back once (readback.py: a host branch would wait for other stages' work)
        accepted, nxt = self.reader.ints(rejection_verify_device(proposed, p_wide, q_wide, self.generator))
        tokens = tuple(seq[start:start + accepted]) + (nxt,)
        return StepResult(accepted, tokens, q[: accepted + 1])

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        """Draft ``n`` tokens after ``seq``, one forward pass each (``accepted`` is 0: nothing was proposed)."""
        work = list(seq)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(n):
            logits = self.logits(work, len(work))  # [1, vocab]
            positions = torch.tensor([len(work)], device=logits.device)
            own, q = choose(logits, params, positions, self.generator)
            token = self.reader.ints(own[:1])[0]
            tokens.append(token)
            work.append(token)
            if q is not None:
                rows.append(q)
        return StepResult(0, tuple(tokens), torch.cat(rows) if rows else None)


def same_width(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p [n, Vp] and q [n + 1, Vq] zero-padded to one width: a token past a model's output layer has probability 0
    under it, so the rejection rule over the padded rows is the rule over the union of the two vocabularies."""
    width = max(p.shape[-1], q.shape[-1])
    return (torch.nn.functional.pad(p, (0, width - p.shape[-1])) if p.shape[-1] < width else p,
            torch.nn.functional.pad(q, (0, width - q.shape[-1])) if q.shape[-1] < width else q)


def gather_rows(rows: ProbRows, device: torch.device) -> torch.Tensor:
    """Stack per-position probability rows (views into the proposer's tensors) on ``device``: [n, vocab]."""
    pieces: list[torch.Tensor] = []
    i = 0
    while i < len(rows):
        tensor, first = rows[i]
        j = i + 1
        # consecutive rows of one proposal tensor become one slice instead of n single-row copies
        while j < len(rows) and rows[j][0] is tensor and rows[j][1] == first + (j - i):
            j += 1
        pieces.append(tensor[first:first + (j - i)])
        i = j
    out = torch.cat([piece.to(device, non_blocking=False) for piece in pieces])
    return out.float()
