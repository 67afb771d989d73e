"""The timeline (``trace=`` / ``--trace``): a Chrome trace-event file whose spans nest per track and whose counts
match the generation's statistics."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from pathlib import Path

from helpers import limit
from pipespec.apps.simulate import simulated_pipeline
from pipespec.tracing import LOOP_TID, Tracer, gpu_gaps, gpu_tid, stage_tid

PROMPT = list(range(3, 19))


def _check_schema_and_nesting(events: list[dict]) -> dict[int, list[dict]]:
    """Every event has the trace-event fields; on each track the complete spans nest and never overlap."""
    tracks: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in e, (key, e)
        assert e["ph"] in ("X", "i", "M", "C"), e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
            tracks[e["tid"]].append(e)
    eps = 1e-3  # microseconds
    for tid, spans in tracks.items():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []  # ends of the enclosing spans, innermost last
        for e in spans:
            while open_ends and e["ts"] >= open_ends[-1] - eps:
                open_ends.pop()
            end = e["ts"] + e["dur"]
            if open_ends:  # starts inside a span: must end inside it too (nest, not overlap)
                assert end <= open_ends[-1] + eps, (tid, e, open_ends[-1])
            open_ends.append(end)
    return tracks


@limit(60)
async def test_trace_file_has_every_stage_and_matches_the_stats(tmp_path: Path) -> None:
    path = tmp_path / "gen.json"
    async with simulated_pipeline([0.2, 1.0, 3.0], [0.7, 0.7], seed=3, vocab=1000) as pipe:
        plain = await pipe.generate(PROMPT, max_new_tokens=60)
        g = await pipe.generate(PROMPT, max_new_tokens=60, trace=str(path))
    assert g.token_ids == plain.token_ids  # tracing changes nothing of the output
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    tracks = _check_schema_and_nesting(events)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[LOOP_TID] == "event loop" and names[stage_tid(0)].startswith("stage 0 (sim0")
    assert {stage_tid(i) for i in range(3)} <= set(tracks) and LOOP_TID in tracks
    assert doc["otherData"]["loop_busy_seconds"] > 0
    assert doc["otherData"]["generations"][0]["tokens"] == 60
    for i, st in enumerate(g.stats.stages):
        spans = tracks[stage_tid(i)]
        count = Counter(e["name"] for e in spans)
        instants = Counter(e["name"] for e in events if e["ph"] == "i" and e["tid"] == stage_tid(i))
        assert count["prefill"] == 1 and count["reset"] == 1
        assert instants["rollback adopted"] == st["rollbacks"]
        assert instants["rollback sent"] == st["rollbacks_sent"]
        if i == 0:
            drafts = [e for e in spans if e["name"] == "draft"]
            assert drafts and count["verify"] == 0
            # each draft call says how many tokens it made, and whether it was a block its successor waited for
            assert sum(e["args"]["tokens"] for e in drafts) == st["drafted"]
            assert all(isinstance(e["args"]["block"], bool) for e in drafts)
            continue
        verify = [e for e in spans if e["name"] == "verify"]
        assert len(verify) == st["verifications"]
        assert sum(e["args"]["proposed"] for e in verify) == st["proposed"]
        assert sum(e["args"]["accepted"] for e in verify) == st["accepted"]
        # every verify span holds the runner call it made: a "step" span inside it
        steps = [e for e in spans if e["name"] == "step"]
        for v in verify:
            assert any(v["ts"] <= s["ts"] and s["ts"] + s["dur"] <= v["ts"] + v["dur"] + 1e-3 for s in steps)
    assert not any(e["name"] == "forward" for e in events)  # GPU spans exist only on CUDA


@limit(60)
async def test_one_tracer_collects_several_generations_and_modes() -> None:
    tracer = Tracer()
    async with simulated_pipeline([0.2, 1.0], [0.8], seed=1, vocab=1000) as pipe:
        for mode in ("pipe", "sd", "ar"):
            await pipe.generate(PROMPT, max_new_tokens=20, mode=mode, trace=tracer)
    doc = tracer.to_json()
    _check_schema_and_nesting(doc["traceEvents"])
    assert [g["mode"] for g in doc["otherData"]["generations"]] == ["pipe", "sd", "ar"]
    json.dumps(doc)  # serialisable as is


@limit(60)
async def test_untraced_generation_records_nothing() -> None:
    async with simulated_pipeline([0.2, 1.0], [0.8], seed=1, vocab=1000) as pipe:
        await pipe.generate(PROMPT, max_new_tokens=20)
        assert all(not hasattr(m.runner, "trace") for m in pipe.members)
        loop = asyncio.get_running_loop()
        assert "select" not in vars(loop._selector)  # type: ignore[attr-defined]  # no probe left behind


def test_run_trace_cli_writes_a_loadable_trace(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipespec.cli import main

    path = tmp_path / "run.json"
    result = CliRunner().invoke(main, ["run", "-p", "def add(a, b):", "-n", "12", "--device", "cpu", "--json",
                                       "--trace", str(path)])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    doc = json.loads(path.read_text())
    tracks = _check_schema_and_nesting(doc["traceEvents"])
    assert doc["otherData"]["generations"][0]["tokens"] == stats["tokens"] == 12
    assert len(tracks) >= 2  # the event loop and at least the target's track


def test_gpu_gaps_measures_the_hand_overs_between_forwards_on_one_gpu() -> None:
    """Lock step on one GPU, hand-made: draft 0-3 ms, target 3.5-9 ms, draft 10-13, target 13.2-20 (an overlapping
    draft span 19-21 extends the busy time), then the target alone again at 22-25: gaps 0->1 of 500 and 200 us,
    1->0 of 1000 us, 0->1 after the overlap of 1000 us."""
    t = Tracer(clock=lambda: 0.0)
    host = t.stage(0, "draft")
    t.stage(1, "target")
    t.name_track(gpu_tid(0), "stage 0 GPU")
    t.name_track(gpu_tid(1), "stage 1 GPU")
    ms = 1e-3
    host.span("draft", 0.0, 3 * ms)
    for stage, a, b in ((0, 0, 3), (1, 3.5, 9), (0, 10, 13), (1, 13.2, 20), (0, 19, 21), (1, 22, 25)):
        t.span(gpu_tid(stage), "forward", a * ms, b * ms)
    out = gpu_gaps(t.to_json())
    assert out["wall_ms"] == 25.0
    assert abs(out["gpu_busy_ms"] - (3 + 5.5 + 3 + 7.8 + 3)) < 1e-6  # 0-3, 3.5-9, 10-13, 13.2-21, 22-25
    assert out["gaps"]["0->1"]["count"] == 3 and abs(out["gaps"]["0->1"]["ms"] - 1.7) < 1e-6
    assert out["gaps"]["1->0"] == {"count": 1, "ms": 1.0, "median_us": 1000.0, "p90_us": 1000.0}
    assert gpu_gaps(Tracer().to_json()) == {}  # no GPU spans (a CPU run): nothing to say
