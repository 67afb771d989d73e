"""The fast path of a model worker: a static KV cache, and on CUDA one captured graph per (tokens, context) bucket.

Forward passes are padded to a token bucket (1, 2, 4, ... 64) and attend over a context bucket (a multiple of 256
slots), so each shape is captured once and replayed: no Python per layer, no kernel-launch gaps, no allocation.
A rollback moves a length (``cached``); nothing is re-allocated. Runs on the model's runner thread, like the
eager worker it replaces.

Graphs are captured only between generations (in ``reset``), never while other stages run: a capture on one
thread while another thread launches work or allocates on the same GPU fails ("operation not permitted when
stream is capturing"). A shape first met during a generation runs eagerly (same kernels, same results) and is
captured at the next ``reset``; captures are serialised across workers by a process-wide lock. ``reset`` also
captures every shape met so far at the larger context buckets the coming generation may reach (``reachable``):
a shape met in the first 256 positions would otherwise run eagerly past them (a 7B: 80 tokens/s instead of 211 for
the last ~130 tokens of a first 256-token generation after a 128-token prompt). ``PIPESPEC_CAPTURE_AHEAD=0`` turns
that off.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..verify import SamplingParams, choose_on_device, seed_hash
from ..kernels.quant import fast_rows
from .base import LogitsWorker, StepResult, WorkerInfo, common_prefix
from .static_llama import StaticLlama, Variant, choose_variant

__all__ = ["StaticWorker", "TOKEN_BUCKETS"]

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXT_STEP = 256  # context buckets are multiples of this
PAD = TOKEN_BUCKETS[-1]  # slack slots past the longest sequence, where padding rows write
# a forward of PAD + 1 .. CHUNKED_MAX tokens runs as forwards of at most PAD (``StaticWorker._chunked``), graphs once
# met; a longer one (a long prompt's prefill, compute-bound) runs as one eager forward
CHUNKED_MAX = 4 * PAD
_CAPTURE = threading.Lock()  # one capture at a time in the process
# context buckets captured ahead of a generation past those its shapes were met at (``reachable``): 4 x 256 positions
CAPTURE_AHEAD = 4
# a device draft feeds at most this many tokens inside its graph: what the cache lacks after a verdict (the correction,
# or the last draft and the bonus); more (a prompt's tail, a catch-up) go through an ordinary forward first
FUSED_FEED = 2


def ceil_bucket(tokens: int) -> int:
    """The context bucket (a multiple of ``CONTEXT_STEP``) that covers ``tokens`` positions."""
    return -(-tokens // CONTEXT_STEP) * CONTEXT_STEP


def reachable(met: Iterable[tuple[Any, ...]], length: int, capacity: int,
              ahead: int = CAPTURE_AHEAD) -> set[tuple[Any, ...]]:
    """The shapes (keys whose first two parts are a token count and a context bucket: a forward's ``(bucket,
    kv_len)``, a device draft's ``(tokens, kv_len, fed, *rule)``) that ``met`` grows into when a generation reaches
    ``length`` tokens: each at the larger context buckets up to the one its last call may attend over (``length``
    plus its tokens, capped at ``capacity``), at most ``ahead`` of them past the one it was met at (a generation
    that ends early must not have paid for many; the next ``reset`` extends them). Not the smaller buckets: a
    generation starts past its prompt."""
    out: set[tuple[Any, ...]] = set()
    for key in met:
        n, kv_len, rest = key[0], key[1], key[2:]
        top = min(ceil_bucket(length + n), kv_len + ahead * CONTEXT_STEP)
        out.update((n, min(k, capacity), *rest) for k in range(kv_len + CONTEXT_STEP, top + 1, CONTEXT_STEP))
    return out


def _bucket(n: int) -> int:
    for b in TOKEN_BUCKETS:
        if n <= b:
            return b
    return n  # longer than every bucket (a long prompt's prefill): eager, unpadded


class StaticWorker(LogitsWorker):
    """A ``LogitsWorker`` whose cache primitives run over ``StaticLlama`` (any supported family; CUDA graphs on
    CUDA)."""

    def __init__(self, model: Any, name: str, device: torch.device, *, graphs: bool | None = None,
                 capacity: int = 2048, compile: bool = False, variant: str | Variant | None = None,
                 static: StaticLlama | None = None, quantize: str | None = None,
                 prepare_layer: Callable[[Any], None] | None = None) -> None:
        super().__init__(model, name, device)
        # the forward's layout (static_llama.VARIANTS): by default per device, compile=True the compiled one,
        # PIPESPEC_STATIC_VARIANT=<name> overrides both; ``static``: a forward built elsewhere (a tensor-parallel
        # rank's shard, ``tensor_parallel``), used as it is
        self.static = static if static is not None else StaticLlama(
            model, capacity + PAD, variant if variant is not None else choose_variant(device, compile),
            quantize=quantize, prepare_layer=prepare_layer)
        # graphs are per device: a model split over GPUs runs its static path eagerly (launches overlap the GPUs);
        # PIPESPEC_CUDA_GRAPHS=0 turns them off (a safety valve: same kernels, launched one by one)
        if graphs is None:
            graphs = device.type == "cuda" and len(self.static.devices) == 1
            graphs = graphs and os.environ.get("PIPESPEC_CUDA_GRAPHS", "1") != "0"
        self.use_graphs = graphs
        pin = device.type == "cuda"
        # host staging buffers per bucket, pinned so the copies to the device are asynchronous
        self._host = {b: (torch.zeros(b, dtype=torch.long, pin_memory=pin), torch.zeros(b, dtype=torch.long,
                                                                                         pin_memory=pin))
                      for b in TOKEN_BUCKETS}
        self._copied: dict[int, Any] = {}  # bucket -> CUDA event recorded after its buffers were last copied out
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None
        self._wanted: set[tuple[int, int]] = set()  # shapes met eagerly, to capture at the next reset
        self.captures = 0  # graphs captured so far (for tests and stats)
        # device drafts: the fed tokens' forward, then n - 1 one-token forwards, and the n choices on the device, as
        # ONE graph per (tokens, context bucket, fed tokens, sampling rule) on CUDA; the same code eagerly elsewhere.
        # Off: one forward and one host sync per drafted token (LogitsWorker.draft). PIPESPEC_DEVICE_DRAFT=0 turns it
        # off.
        self.device_draft = os.environ.get("PIPESPEC_DEVICE_DRAFT", "1") != "0"
        self._draft_graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._draft_wanted: dict[tuple[Any, ...], SamplingParams] = {}  # to capture at the next reset
        self._draft_params: dict[tuple[Any, ...], SamplingParams] = {}  # of every draft graph captured
        # the draft graphs' inputs, shared by all of them: per count of fed tokens a pinned host buffer and its
        # device copy (ids, then positions), and the seed's hash
        self._feed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seed_buf: torch.Tensor | None = None
        self._seed_of: int | None = None

    # -- cache primitives ---------------------------------------------------------------------------------------

    def describe(self) -> WorkerInfo:
        info = super().describe()
        rows = fast_rows(self.device) if getattr(self.static, "quantize", None) is not None else None
        # a verification of n proposals feeds 1 + n tokens (the last verified one, then the proposals)
        return info if rows is None else dataclasses.replace(info, max_window=rows - 1)

    def reset(self, seed: int | None = None, capacity: int | None = None) -> None:
        self.cached = []
        if capacity is not None and self.static.ensure_capacity(capacity + PAD):
            if os.environ.get("PIPESPEC_TRACEBACK") == "1":  # a developer hunting a crash: when graphs are re-made
                print(f"pipespec: {self.name}: static cache grows to {capacity + PAD} slots; "
                      f"{len(self._graphs)} + {len(self._draft_graphs)} graphs dropped", file=sys.stderr)
            self._wanted.update(self._graphs)
            self._graphs.clear()  # captured graphs point at the old cache tensors
            self._draft_wanted.update({key: self._draft_params[key] for key in self._draft_graphs})
            self._draft_graphs.clear()
            # and a fresh pool for the new ones: once its last graph is gone the old pool is released (freeable),
            # and capturing into a released pool id is not something the caching allocator supports
            self._pool = None
        if self.use_graphs and capacity is not None and os.environ.get("PIPESPEC_CAPTURE_AHEAD", "1") != "0":
            limit = self.static.capacity  # the largest context bucket a call attends over (``forward``)
            self._wanted.update(k for k in reachable([*self._graphs, *self._wanted], capacity, limit)
                                if k not in self._graphs)
            drafts = {**self._draft_params, **self._draft_wanted}
            params = {(key[0], *key[2:]): p for key, p in drafts.items()}  # per (steps, rule)
            for key in reachable(drafts, capacity, limit):
                if key not in self._draft_graphs:
                    self._draft_wanted.setdefault(key, params[(key[0], *key[2:])])
        if self.use_graphs and (self._wanted or self._draft_wanted):
            self.capture_pending()
        self._seed(seed)

    def release(self) -> None:
        self.cached = []  # the static cache stays allocated: the next generation reuses it

    def rollback(self, length: int) -> None:
        del self.cached[length:]

    def forward(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        n = len(tokens)
        if self.use_graphs and PAD < n <= CHUNKED_MAX and keep <= PAD:
            return self._chunked(tokens, position, keep)
        return self._forward_one(tokens, position, keep)

    def _chunked(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        """A forward of more than ``PAD`` tokens (a prompt, or lock step's first verify: the prompt and a block) as
        forwards of at most ``PAD``, each a captured graph once met: one eager forward of 142 tokens took a 7B 21-56
        ms on an H200 (launches, and a draft beside it), two graphs ~10. The last chunk holds the ``keep`` rows."""
        n = len(tokens)
        last = max(n % PAD or PAD, keep)
        sizes = [PAD] * ((n - last) // PAD) + ([(n - last) % PAD] if (n - last) % PAD else []) + [last]
        start = 0
        for size in sizes[:-1]:
            self._forward_one(tokens[start:start + size], position + start, 0)
            start += size
        return self._forward_one(tokens[start:], position + start, keep)

    def _forward_one(self, tokens: Sequence[int], position: int, keep: int) -> torch.Tensor:
        assert position == len(self.cached), "forward must continue the cached sequence"
        n = len(tokens)
        end = position + n
        if end + PAD > self.static.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds the static cache ({self.static.capacity - PAD})")
        bucket = _bucket(n)
        # attend over a multiple of CONTEXT_STEP slots that covers every (padded) position of this call
        kv_len = min(ceil_bucket(position + bucket), self.static.capacity)
        staged = bucket in self._host
        if staged:
            ids, pos = self._host[bucket]
            copied = self._copied.get(bucket)
            if copied is not None:  # the last asynchronous copy out of this pinned buffer must be done first
                copied.synchronize()
            ids[:n] = torch.tensor(list(tokens), dtype=torch.long)
            ids[n:] = 0
            torch.arange(position, position + bucket, out=pos)  # padding rows write past the end
        else:
            ids = torch.tensor(list(tokens), dtype=torch.long)
            pos = torch.arange(position, position + bucket, dtype=torch.long)
        if self.use_graphs and bucket in TOKEN_BUCKETS:
            logits = self._replay(ids, pos, kv_len)
        else:
            logits = self.static.forward(ids.to(self.device, non_blocking=True), pos.to(self.device, non_blocking=True),
                                         kv_len)
        if staged and self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[bucket] = event
        self.forwards += 1
        self._note_fed(tokens)
        return logits[n - keep:n]

    def _note_fed(self, tokens: Sequence[int]) -> None:
        """``tokens`` went into the cache (a forward, or a device draft's graph)."""
        self.cached.extend(tokens)

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        key = (ids.shape[0], kv_len)
        entry = self._graphs.get(key)
        if entry is None:  # not captured yet: run eagerly now, capture at the next reset
            self._wanted.add(key)
            return self.static.forward(ids.to(self.device, non_blocking=True),
                                       pos.to(self.device, non_blocking=True), kv_len)
        graph, static_ids, static_pos, out = entry
        static_ids.copy_(ids, non_blocking=True)
        static_pos.copy_(pos, non_blocking=True)
        graph.replay()
        return out

    # -- multi-token drafts on the device ------------------------------------------------------------------------

    def draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> StepResult:
        """Draft ``n`` tokens with one host sync: what the cache lacks of ``seq`` (one or two tokens: a correction,
        or the last draft and the bonus; ``FUSED_FEED``) is fed, and ``n`` forwards and choices run on the device
        (``choose_on_device``), on CUDA as ONE captured graph. Same tokens as one forward and one sync per token.
        The rejection rule (probability rows, the generator) keeps the per-token path."""
        if n < 1 or not self.device_draft or params.rule == "rejection":
            return super().draft(seq, n, params)
        tokens = self._device_draft(seq, n, params)
        self.cached.extend(tokens[:-1])  # the last drafted token is not fed, as in the per-token path
        return StepResult(0, tuple(tokens))

    def _device_draft(self, seq: Sequence[int], n: int, params: SamplingParams) -> list[int]:
        """The ``n`` drafted tokens; feeds ``seq`` (what it lacks) and the first ``n - 1`` drafts into the cache
        (the caller extends ``cached`` with the drafts)."""
        span = self._gpu_span_begin()  # the whole draft as one GPU span (a trace's GPU track)
        start = min(common_prefix(self.cached, seq), len(seq) - 1)  # the graph feeds seq[start:]: 1 token at least
        self.rollback(start)
        if len(seq) - start > FUSED_FEED:  # a prompt's tail or a long catch-up: all but the last token first
            self._timed_forward(seq[start:-1], start, 0)
            start = len(seq) - 1
        fed = list(self._feedable(seq[start:]))
        m = len(fed)
        end = start + m + n - 1  # cache slots used: 0 .. end - 1 (the last draft is not fed)
        if end + PAD > self.static.capacity:
            raise ValueError(f"sequence of {end} tokens exceeds the static cache ({self.static.capacity - PAD})")
        kv_len = min(ceil_bucket(end), self.static.capacity)
        feed = self._feed_input(m, fed, start)
        seed_h = self._seed_input(params.seed)
        key = (n, kv_len, m, *_rule_key(params))
        entry = self._draft_graphs.get(key) if self.use_graphs else None
        if entry is None:
            if self.use_graphs:
                self._draft_wanted[key] = params  # capture at the next reset; eager now (same kernels)
            out = self._draft_steps(feed[:m], feed[m:], n, kv_len, params, seed_h)
        else:
            graph, out = entry
            graph.replay()
        self._note_fed(fed)
        self._gpu_span_end(span, n)
        self.forwards += n
        return self.reader.ints(out)  # the one host sync of the call

    def _draft_steps(self, tok: torch.Tensor, pos: torch.Tensor, n: int, kv_len: int, params: SamplingParams,
                     seed_h: torch.Tensor) -> torch.Tensor:
        """Feed ``tok`` [m] at ``pos`` [m], choose the next token, feed it, ... until ``n`` are chosen: [n] tokens.
        Device tensors only (no host data, no sync): capturable as one CUDA graph."""
        out = []
        for _ in range(n):
            logits = self.static.forward(tok, pos, kv_len)[-1:]  # [1, vocab]
            pos = pos[-1:] + 1  # the position the chosen token takes
            tok = choose_on_device(logits, params, pos, seed_h)
            out.append(tok)
        return torch.cat(out)

    def _feed_input(self, m: int, tokens: Sequence[int], position: int) -> torch.Tensor:
        """The device buffer a draft graph of ``m`` fed tokens reads ([m] ids, then [m] positions), filled by one
        copy from a pinned host buffer. Reusing that host buffer is safe: every draft call ends with a sync."""
        if m not in self._feed:
            pin = self.device.type == "cuda"
            self._feed[m] = (torch.zeros(2 * m, dtype=torch.long, pin_memory=pin),
                             torch.zeros(2 * m, dtype=torch.long, device=self.device))
        host, dev = self._feed[m]
        host.copy_(torch.tensor([*tokens, *range(position, position + m)], dtype=torch.long))
        dev.copy_(host, non_blocking=True)
        return dev

    def _seed_input(self, seed: int) -> torch.Tensor:
        """The device buffer every draft graph reads the seed's hash from; written when the seed changes."""
        if self._seed_buf is None:
            self._seed_buf = seed_hash(seed, self.device)
            self._seed_of = seed
        elif self._seed_of != seed:
            self._seed_buf.copy_(seed_hash(seed, self.device))
            self._seed_of = seed
        return self._seed_buf

    def _capture_drafts(self, stream: Any) -> None:
        for key, params in sorted(self._draft_wanted.items(), key=lambda kv: kv[0][:3]):
            n, kv_len, m = key[:3]
            if key in self._draft_graphs or kv_len > self.static.capacity:
                continue
            feed = self._feed_input(m, [0] * m, 0)
            seed_h = self._seed_input(params.seed)
            for _ in range(2):
                self._draft_steps(feed[:m], feed[m:], n, kv_len, params, seed_h)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                out = self._draft_steps(feed[:m], feed[m:], n, kv_len, params, seed_h)
            self._draft_graphs[key] = (graph, out)
            self._draft_params[key] = params
            self.captures += 1
        self._draft_wanted.clear()

    def capture_pending(self) -> None:
        """Capture every shape met since the last reset. Call only while no generation runs (from ``reset``).

        Warm-up and capture write junk K/V at slots 0..bucket-1: harmless, the cache is logically empty here, and
        every replay copies its own call's ids and positions into the static input buffers first.
        """
        stream = torch.cuda.current_stream(self.device)
        with _CAPTURE:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            for key in sorted(self._wanted):
                bucket, kv_len = key
                if key in self._graphs or bucket + PAD > self.static.capacity:
                    continue
                static_ids = torch.zeros(bucket, dtype=torch.long, device=self.device)
                static_pos = torch.arange(bucket, dtype=torch.long, device=self.device)
                for _ in range(2):  # warm-up on the capturing stream (lazy library initialisation, workspaces)
                    self.static.forward(static_ids, static_pos, kv_len)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    out = self.static.forward(static_ids, static_pos, kv_len)
                self._graphs[key] = (graph, static_ids, static_pos, out)
                self.captures += 1
            self._wanted.clear()
            self._capture_drafts(stream)

    def warm_up(self, buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), context: int = 2 * CONTEXT_STEP,
                draft_sizes: Sequence[int] = (), params: SamplingParams | None = None) -> None:
        """Capture the common shapes ahead of the first generation (optional; benchmarks call it).
        ``draft_sizes``: also the device drafts of n tokens for each n, fed 1 to ``FUSED_FEED`` tokens (``params``:
        greedy by default)."""
        if not self.use_graphs:
            return
        for kv_len in range(CONTEXT_STEP, min(context, self.static.capacity) + 1, CONTEXT_STEP):
            for bucket in buckets:
                if bucket <= kv_len:
                    self._wanted.add((bucket, kv_len))
            p = params or SamplingParams()
            for n in draft_sizes:
                for m in range(1, FUSED_FEED + 1):
                    self._draft_wanted[(n, kv_len, m, *_rule_key(p))] = p
        self.capture_pending()


def _rule_key(params: SamplingParams) -> tuple[Any, ...]:
    """What a captured draft graph bakes in of the sampling options (the seed is an input, not baked)."""
    if params.rule == "greedy":
        return ("greedy",)
    return (params.rule, params.temperature, params.top_k, params.top_p)
