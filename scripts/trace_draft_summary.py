"""Where a draft's time goes in a pipeline trace (``pipespec run|bench --trace FILE``): its calls split by whether
they drafted a block its successor waited for (in lock step the only calls the runtime times), each group's count,
tokens per call and host milliseconds per drafted token; its waits by reason; the target's forwards that verified
something against those that decoded alone; what each middle stage did; and when a stage was bypassed.

    python scripts/trace_draft_summary.py TRACE.json [...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from typing import Any


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    events = [e for e in doc["traceEvents"] if e.get("ph") == "X"]
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    # the stages' host tracks ("stage 1 (7b)"), not their GPU tracks ("stage 1 GPU")
    stage_tids = sorted(t for t, n in names.items() if n.startswith("stage ") and not n.endswith(" GPU"))
    draft, target = stage_tids[0], stage_tids[-1]
    out: dict[str, Any] = {"draft": names[draft], "target": names[target]}
    # where a stage was taken out of the chain (the adaptive runtime's bypass): its intervals, in ms from the start
    for tid in stage_tids:
        marks = sorted((e["ts"], e["name"]) for e in doc["traceEvents"]
                       if e.get("tid") == tid and e.get("name") in ("bypass on", "bypass off"))
        if marks:
            out[f"{names[tid]} bypass (ms)"] = [f"{n.split()[1]} at {ts / 1000:.1f}" for ts, n in marks]
    calls: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in events:
        if e["tid"] == draft and e["name"] == "draft" and "args" in e:
            group = "block" if e["args"].get("block") else "free"
            calls[group].append((e["args"].get("tokens", 0), e["dur"] / 1000))
    for group, got in sorted(calls.items()):
        tokens = sum(t for t, _ in got)
        out[f"draft calls ({group})"] = {
            "calls": len(got), "tokens per call": round(tokens / len(got), 2),
            "ms per token": round(sum(ms for _, ms in got) / max(tokens, 1), 4),
            "median ms per call": round(statistics.median(ms for _, ms in got), 4)}
    waits: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e["tid"] == draft and e["name"] == "wait":
            waits[e.get("args", {}).get("reason", "?")].append(e["dur"] / 1000)
    out["draft waits (count, total ms)"] = {r: (len(w), round(sum(w), 2)) for r, w in sorted(waits.items())}
    counted = defaultdict(int)
    for e in events:
        if e["tid"] == target and e["name"] in ("verify", "decode"):
            counted[e["name"]] += 1
    out["target forwards"] = dict(counted)
    for tid in stage_tids[1:-1]:  # the middle stages: what they verified, decoded or relayed
        kinds = defaultdict(int)
        for e in doc["traceEvents"]:
            if e.get("tid") == tid and e.get("name") in ("verify", "decode", "relay"):
                kinds[e["name"]] += 1
        out[f"{names[tid]} (middle)"] = dict(kinds)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(path, json.dumps(summary(json.load(f)), indent=1))
