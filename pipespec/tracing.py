"""Timelines of generations: Chrome / Perfetto trace-event JSON (open the file in https://ui.perfetto.dev).

One ``Tracer`` collects the events of one or more generations run one after another and writes them as
``{"traceEvents": [...]}``. Tracks (``tid``), one per thing that runs sequentially, so spans on a track nest and
never overlap:

- ``event loop``: the loop's own busy time between two waits in its selector (``LoopProbe``);
- ``stage i (model)``: what stage i's coroutine does, on the host: runner calls (named after the worker method:
  ``prefill``, ``draft``, ``step``...), the ``verify`` / ``decode`` spans around a ``step`` (args: ``position``,
  ``proposed``, ``accepted``), ``wait`` spans on its doorbell, and instants for rollbacks and bypasses;
- ``stage i GPU``: on CUDA, the GPU time of each forward pass (CUDA events recorded around it on the worker's
  thread and read back after the generation, off the hot path); absent on the CPU.

Timestamps are ``time.perf_counter`` (a monotonic clock shared by every thread of the process) in microseconds from
the tracer's creation. Nothing here touches a tensor or a thread: recording an event is one ``list.append`` (atomic
under the GIL). A generation without a tracer pays one ``is None`` test per stage step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOOP_TID", "LoopProbe", "StageTrace", "Tracer", "gpu_gaps", "gpu_tid", "stage_tid", "summarize"]

LOOP_TID = 1


def stage_tid(index: int) -> int:
    """The host track of stage ``index``."""
    return 100 + 10 * index


def gpu_tid(index: int) -> int:
    """The GPU track of stage ``index``."""
    return 101 + 10 * index


class Tracer:
    """Trace events in memory; ``write`` saves them. Use from one process; any thread may record."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._origin_ns = int(clock() * 1e9)
        self.events: list[dict[str, Any]] = []
        self.pid = os.getpid()
        self._named: set[int] = set()
        self.meta: dict[str, Any] = {"generator": "pipespec", "clock": "time.perf_counter"}
        self.loop_busy_seconds = 0.0

    def _us(self, t: float) -> float:
        # integer nanoseconds first, so that a child span's end never rounds past its parent's
        return (int(t * 1e9) - self._origin_ns) / 1000.0

    def name_track(self, tid: int, name: str) -> None:
        if tid in self._named:
            return
        self._named.add(tid)
        self.events.append({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "ts": 0,
                            "args": {"name": name}})
        self.events.append({"ph": "M", "name": "thread_sort_index", "pid": self.pid, "tid": tid, "ts": 0,
                            "args": {"sort_index": tid}})

    def span(self, tid: int, name: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        ts = self._us(start)
        event: dict[str, Any] = {"ph": "X", "name": name, "pid": self.pid, "tid": tid, "ts": ts,
                                 "dur": max(self._us(end) - ts, 0.0)}
        if args:
            event["args"] = args
        self.events.append(event)

    def instant(self, tid: int, name: str, at: float | None = None, args: dict[str, Any] | None = None) -> None:
        event: dict[str, Any] = {"ph": "i", "s": "t", "name": name, "pid": self.pid, "tid": tid,
                                 "ts": self._us(self.clock() if at is None else at)}
        if args:
            event["args"] = args
        self.events.append(event)

    def counter(self, name: str, values: dict[str, float], at: float | None = None) -> None:
        self.events.append({"ph": "C", "name": name, "pid": self.pid, "tid": LOOP_TID,
                            "ts": self._us(self.clock() if at is None else at), "args": values})

    def stage(self, index: int, label: str) -> StageTrace:
        self.name_track(stage_tid(index), f"stage {index} ({label})")
        return StageTrace(self, stage_tid(index))

    def to_json(self) -> dict[str, Any]:
        meta = dict(self.meta, loop_busy_seconds=round(self.loop_busy_seconds, 6))
        return {"traceEvents": list(self.events), "displayTimeUnit": "ms", "otherData": meta}

    def write(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_json()))
        return out


class StageTrace:
    """One stage's host track: what its coroutine (and its runner wrapper) record."""

    __slots__ = ("tracer", "tid")

    def __init__(self, tracer: Tracer, tid: int) -> None:
        self.tracer = tracer
        self.tid = tid

    def span(self, name: str, start: float, end: float | None = None, **args: Any) -> None:
        self.tracer.span(self.tid, name, start, self.tracer.clock() if end is None else end, args or None)

    def instant(self, name: str, **args: Any) -> None:
        self.tracer.instant(self.tid, name, None, args or None)


class LoopProbe:
    """The event loop's busy spans: the time between two waits in its selector (its own work: coroutine steps,
    callbacks, waiting for the GIL). Works on selector event loops (the default on Linux and macOS); elsewhere
    ``install`` returns False and the track stays empty. Install from the loop's thread; uninstall when done."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._selector: Any = None
        self._had_own: Any = None
        self._busy_from: float | None = None

    def install(self, loop: Any) -> bool:
        selector = getattr(loop, "_selector", None)
        original = getattr(selector, "select", None)
        if original is None:
            return False
        tracer, clock = self.tracer, self.tracer.clock
        tracer.name_track(LOOP_TID, "event loop")
        self._selector, self._had_own = selector, selector.__dict__.get("select") if hasattr(selector, "__dict__") \
            else None
        self._busy_from = clock()

        def select(timeout: float | None = None) -> Any:
            began = clock()
            if self._busy_from is not None:
                tracer.span(LOOP_TID, "busy", self._busy_from, began)
                tracer.loop_busy_seconds += began - self._busy_from
            try:
                return original(timeout)
            finally:
                self._busy_from = clock()

        try:
            selector.select = select
        except AttributeError:  # a selector with slots: no probe
            self._selector = None
            return False
        return True

    def uninstall(self) -> None:
        selector, self._selector = self._selector, None
        if selector is None:
            return
        now = self.tracer.clock()
        if self._busy_from is not None:
            self.tracer.span(LOOP_TID, "busy", self._busy_from, now)
            self.tracer.loop_busy_seconds += now - self._busy_from
        if self._had_own is not None:
            selector.select = self._had_own
        else:
            del selector.select


def _track_names(doc: dict[str, Any]) -> dict[int, str]:
    """A trace file's track names by ``tid`` (its ``thread_name`` metadata events)."""
    return {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}


def summarize(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Where the time went, per track: {track name: {span name: {"count", "ms", "mean_ms"}}} over the top-level
    spans and the nested ones alike (a ``verify`` span's ``step`` is counted under ``step`` too). Instants are
    counted with ``ms`` 0. ``doc``: a trace file's JSON (``Tracer.to_json()``)."""
    names = _track_names(doc)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for e in doc["traceEvents"]:
        if e["ph"] not in ("X", "i"):
            continue
        row = out.setdefault(names.get(e["tid"], str(e["tid"])), {}).setdefault(
            e["name"], {"count": 0, "ms": 0.0, "mean_ms": 0.0})
        row["count"] += 1
        row["ms"] += e.get("dur", 0.0) / 1000.0
    for track in out.values():
        for row in track.values():
            row["ms"] = round(row["ms"], 3)
            row["mean_ms"] = round(row["ms"] / row["count"], 4) if row["count"] else 0.0
    return out


def gpu_gaps(doc: dict[str, Any]) -> dict[str, Any]:
    """Where the GPU waited, from a trace whose ``stage i GPU`` tracks share one device (a chain on one GPU; on
    several, "busy" means any of them is): the generation's wall time (its first host span to its last GPU or host
    span), the time covered by at least one GPU span, and every gap between GPU spans, grouped by the hand-over it
    sits in (``"0->1"``: stage 1's forward waited after stage 0's ended; ``"1->1"``: the same stage twice in a row,
    its own host work between two calls). In lock step every gap is host work: a runner's round trip, the stage
    logic, the next call's launch. Returns {"wall_ms", "gpu_busy_ms", "gpu_busy_fraction", "gaps": {hand-over:
    {"count", "ms", "median_us", "p90_us"}}}; empty when the trace has no GPU spans."""
    names = _track_names(doc)
    spans: list[tuple[float, float, int]] = []  # (start us, end us, stage)
    host: list[tuple[float, float]] = []
    for e in doc["traceEvents"]:
        if e["ph"] != "X":
            continue
        name = names.get(e["tid"], "")
        if name.startswith("stage ") and name.endswith(" GPU"):
            spans.append((e["ts"], e["ts"] + e.get("dur", 0.0), int(name.split()[1])))
        elif name.startswith("stage "):
            host.append((e["ts"], e["ts"] + e.get("dur", 0.0)))
    if not spans:
        return {}
    spans.sort()
    begin = min([s for s, _ in host] + [spans[0][0]])
    end = max([e for _, e in host] + [e for _, e, _ in spans])
    busy, reach, last_stage = 0.0, spans[0][0], spans[0][2]
    cover_from = spans[0][0]
    gaps: dict[str, list[float]] = {}
    for start, stop, stage in spans:
        if start > reach:  # the GPU idled from reach to start
            busy += reach - cover_from
            gaps.setdefault(f"{last_stage}->{stage}", []).append(start - reach)
            cover_from = start
        if stop >= reach:
            reach, last_stage = stop, stage
    busy += reach - cover_from
    wall = max(end - begin, 1e-9)
    out: dict[str, Any] = {"wall_ms": round(wall / 1000, 3), "gpu_busy_ms": round(busy / 1000, 3),
                           "gpu_busy_fraction": round(busy / wall, 4), "gaps": {}}
    for key, values in sorted(gaps.items()):
        values.sort()
        out["gaps"][key] = {"count": len(values), "ms": round(sum(values) / 1000, 3),
                            "median_us": round(values[len(values) // 2], 1),
                            "p90_us": round(values[min(len(values) - 1, int(0.9 * len(values)))], 1)}
    return out
