"""The live view: ``render`` on hand-made snapshots against a recording Console, ``run_with_live_view`` on a real
chain, and ``pipespec run`` in a real pseudo-terminal (160x48), read back byte for byte."""

from __future__ import annotations

import asyncio
import io
import json
import re
from types import SimpleNamespace
from pathlib import Path

import torch
from rich.console import Console

from helpers import limit
from terminal import Terminal, needs_pty
from pipespec import Pipeline
from pipespec.apps.tui import initial_snapshot, loading_progress, printable, render, run_with_live_view
from pipespec.types import Snapshot, StageSnapshot


def stage(index: int, model: str, **changes: object) -> StageSnapshot:
    fields: dict[str, object] = dict(index=index, model=model, device="cpu", state="verifying", queue_depth=0,
                                     in_flight=0, forwards=100, proposed=80, accepted=60, recent_proposed=10,
                                     recent_accepted=5, verifications=20, rollbacks=0, busy_seconds=1.0)
    fields.update(changes)
    return StageSnapshot(**fields)  # type: ignore[arg-type]


def snapshot(text: str = "def add(a, b):\n    return a + b\n", **changes: object) -> Snapshot:
    stages = (stage(0, "tiny-draft", state="drafting", proposed=0, accepted=0, recent_proposed=0,
                    recent_accepted=0, verifications=0, rollbacks=4, forwards=300),
              stage(1, "tiny-middle", queue_depth=7, in_flight=12, rollbacks=3),
              stage(2, "tiny-target", state="rolling back", queue_depth=2, in_flight=5, proposed=40, accepted=30,
                    verifications=8, forwards=50, busy_seconds=1.5))
    fields: dict[str, object] = dict(mode="pipe", stages=stages, committed=40, elapsed=2.0, text=text)
    fields.update(changes)
    return Snapshot(**fields)  # type: ignore[arg-type]


def frame(snap: Snapshot | None, width: int = 160, **kw: object) -> str:
    console = Console(record=True, width=width, height=48)
    console.print(render(snap, **kw))  # type: ignore[arg-type]
    return console.export_text()


def row(text: str, model: str) -> list[str]:
    """The cells of the table row of ``model`` (columns are two or more spaces apart)."""
    line = next(line for line in text.splitlines() if re.match(rf"\d+( \w+)?  +{re.escape(model)}  ", line))
    return re.split(r"  +", line.strip())


def test_render_shows_every_stage_and_the_totals() -> None:
    text = frame(snapshot(), title="tiny-draft -> tiny-middle -> tiny-target")
    for header in ("stage", "model", "device", "state", "queue", "in flight", "accept recent", "accept all",
                   "tok/verify", "rollbacks", "fwd/s", "busy"):
        assert header in text
    assert "mode pipe" in text
    # stage, model, device, state, queue, in flight, recent, overall, tok/verify, rollbacks, fwd/s, busy
    assert row(text, "tiny-draft") == ["0 draft", "tiny-draft", "cpu", "drafting", "-", "-", "-", "-", "-", "4",
                                       "150.0", "50.0%"]
    assert row(text, "tiny-middle") == ["1 middle", "tiny-middle", "cpu", "verifying", "7", "12", "50.0%", "75.0%",
                                        "3.00", "3", "50.0", "50.0%"]
    assert row(text, "tiny-target") == ["2 target", "tiny-target", "cpu", "rolling back", "2", "5", "50.0%",
                                        "75.0%", "3.75", "0", "25.0", "75.0%"]
    assert "committed 40 tokens  20.0 tokens/s  elapsed 2.0s" in text
    assert "done" not in text
    assert "generated text" in text and "    return a + b" in text


def test_render_is_pure_and_marks_the_end() -> None:
    snap = snapshot(done=True)
    first = frame(snap)
    other = frame(snapshot(done=False, text="something else"))  # no state carried from one frame to the next
    assert other != first and "something else" in other and "done" not in other
    assert frame(snap) == first and snap == snapshot(done=True)  # the same frame again; the snapshot untouched
    assert "elapsed 2.0s  done" in first


def test_render_without_text_and_before_the_first_snapshot() -> None:
    text = frame(snapshot(text="SECRET"), show_text=False)
    assert "generated text" not in text and "SECRET" not in text and "tiny-target" in text
    assert "starting" in frame(None)
    idle = frame(initial_snapshot(["a", "b"], ["cpu", "cuda:0"], "sd"))
    assert row(idle, "a")[:5] == ["0 draft", "a", "cpu", "idle", "-"]
    assert row(idle, "b")[:5] == ["1 target", "b", "cuda:0", "idle", "0"]
    assert "mode sd" in idle and "committed 0 tokens" in idle


def test_text_panel_keeps_the_newest_lines_at_a_fixed_height() -> None:
    lines = [f"line {i:03d}" for i in range(200)]
    short, long = frame(snapshot(text="one line")), frame(snapshot(text="\n".join(lines)))
    assert len(short.splitlines()) == len(long.splitlines())  # the frame does not jump as text arrives
    assert "line 199" in long and "line 186" in long and "line 185" not in long
    wrapped = frame(snapshot(text="x" * 5000))  # one long line: its wrapped tail, not its head
    assert wrapped.count("x" * 100) >= 10 and len(wrapped.splitlines()) == len(short.splitlines())


def test_generated_text_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[2Jb\tc\nd\r\ne\x07\x7f\x9b") == "a\u241b[2Jb\tc\nd\ne\u2407\u2421\ufffd"
    console = Console(record=True, width=160, force_terminal=True, color_system=None)
    console.print(render(snapshot(text="clear\x1b[2J\x1b]0;title\x07")))
    out = console.export_text(styles=False)
    assert "\x1b" not in out and "\x07" not in out and "\u241b[2J" in out


def test_model_names_are_not_markup_and_narrow_consoles_keep_the_essentials() -> None:
    snap = Snapshot(mode="pipe", stages=(stage(0, "[bold]x"), stage(1, "y")), committed=1, elapsed=1.0, text="")
    text = frame(snap, title="[red]t")
    assert "[bold]x" in text and "[red]t" in text
    narrow = frame(snapshot(), width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert row(narrow, "tiny-middle") == ["1", "tiny-middle", "verifying", "7", "75.0%", "3.00", "3"]
    assert "…" not in narrow
    long = frame(Snapshot(mode="pipe", stages=(stage(0, "m" * 100), stage(1, "y")), committed=1, elapsed=1.0,
                          text=""), width=80)
    assert all(len(line) <= 80 for line in long.splitlines()) and "mmm…" in long


def test_loading_progress_shows_one_bar_per_model() -> None:
    console = Console(record=True, width=100, force_terminal=True)
    with loading_progress(["alpha", "beta"], console=console) as on_loaded:
        on_loaded(1, "beta")
        on_loaded(0, "alpha")
    text = console.export_text()
    assert "alpha" in text and "beta" in text


# -- a real chain ------------------------------------------------------------------------------------------------

@limit(60)
async def test_run_with_live_view_returns_the_generation_and_prints_it(folder_chain: list[str]) -> None:
    torch.set_num_threads(1)
    console = Console(record=True, width=160, force_terminal=True, color_system=None)
    async with Pipeline.load(folder_chain, device="cpu") as pipe:
        want = await pipe.generate("def add(a, b):", max_new_tokens=24)
        got = await run_with_live_view(pipe, "def add(a, b):", {"max_new_tokens": 24}, console=console)
    assert got.token_ids == want.token_ids
    out = console.export_text(styles=False)
    assert printable(got.text) in out
    tail = out[out.rindex(printable(got.text)):]  # after the live view: the text, then the final table
    assert all(name in tail for name in ("draft", "middle", "target")) and "done" in tail


@limit(120)
async def test_mode_auto_in_the_live_view_says_which_probe_runs_and_then_what_it_chose(folder_chain: list[str]) -> None:
    assert "mode auto: probe 3, pipe" in frame(snapshot(committed=0, note="mode auto: probe 3, pipe"))
    torch.set_num_threads(1)
    console = Console(record=True, width=160, force_terminal=True, color_system=None)
    async with Pipeline.load(folder_chain, device="cpu") as pipe:
        want = await pipe.generate("def add(a, b):", max_new_tokens=24, mode="ar")
        got = await run_with_live_view(pipe, "def add(a, b):", {"max_new_tokens": 24, "mode": "auto"},
                                       console=console)
    assert got.token_ids == want.token_ids and got.stats.mode_chosen is not None
    out = console.export_text(styles=False)
    assert printable(got.text) in out
    after_table = out[out.rindex(" done"):]  # the final table's footer, then what auto ran and why
    assert f"\nmode auto: {got.stats.mode_chosen}" in after_table and "fastest in probes" in after_table, out[-600:]


# -- a real terminal ---------------------------------------------------------------------------------------------



@needs_pty
class _Endless:
    """A pipeline whose generation runs until it is cancelled, and says so."""

    names = ["d", "t"]
    members = [SimpleNamespace(device="cpu"), SimpleNamespace(device="cpu")]
    preparing = None

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), 0

    def snapshot(self) -> None:
        return None

    async def generate(self, prompt: str, **options: object) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


@limit(60)
async def test_a_cancelled_live_view_cancels_its_generation_and_passes_the_cancellation_on() -> None:
    """Ctrl-C cancels the task showing the live view; at whatever point of a redraw's wait it comes, the generation
    is cancelled and the cancellation goes on to ``asyncio.run`` (which the CLI turns into its Ctrl-C exit). With an
    AnyIO task group and a ``move_on_after`` per redraw, CI once saw it lost: no result, and an IndexError."""
    from pipespec.apps import tui

    console = Console(file=io.StringIO(), force_terminal=False)
    for i in range(24):  # cancels spread over two redraw periods
        pipe = _Endless()
        task = asyncio.ensure_future(run_with_live_view(pipe, "hi", {}, console=console))
        await pipe.started.wait()
        await asyncio.sleep(i / 12 / tui.REFRESH_PER_SECOND)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done and task.cancelled(), i
        assert pipe.cancelled == 1, i


def test_run_in_a_terminal_shows_the_live_view_while_text_streams(folder_chain: list[str], tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    term = Terminal(["run", "--models", ",".join(folder_chain), "--device", "cpu", "--prompt", "def add(a, b):",
                     "--max-new-tokens", "300", "--mode", "pipe", "--log-file", str(log), "-vv"], tmp_path)
    try:
        assert term.wait(120) == 0, term.text
    finally:
        term.close()
    screen = term.text
    *_, final = re.finditer(r"elapsed [0-9.]+s  done", screen)  # the final table, once the live view is gone
    live = screen[:final.start()]
    assert all(f"loading {name}" in screen for name in ("draft", "middle", "target"))  # one bar per model
    for word in ("queue", "rollbacks", "in flight", "generated text"):
        assert word in live, word
    for row in (r"0 draft +draft +cpu +\w+ +- +- ", r"1 middle +middle +cpu +[a-z ]+? +\d+ +\d+ ",
                r"2 target +target +cpu +[a-z ]+? +\d+ +\d+ "):  # name, device, state, queue depth, in flight
        assert re.search(row, live), row
    counts = [int(n) for n in re.findall(r"committed (\d+) tokens", live)]
    assert any(0 < n < 300 for n in counts), counts  # frames drawn while the text was still coming
    assert "\x1b[" in term.raw.decode(errors="replace")  # drawn with cursor movement, on a real terminal
    assert '"event"' not in screen  # the logs went to the file only
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {e["stage"] for e in events if e["event"] == "model loaded"} == {0, 1, 2}
    stage_events = [e for e in events if e["event"] in ("verified", "rollback sent", "rollback adopted")]
    assert stage_events and all({"stage", "epoch", "position"} <= set(e) for e in stage_events)
