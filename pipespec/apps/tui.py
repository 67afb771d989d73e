"""The live terminal view: ``render(snapshot)``, the loop that feeds it, and the loading progress.

The event loop publishes an immutable ``Snapshot`` a few times a second; Rich's ``Live`` renders the latest one on
its own refresh thread, so drawing never runs inside a stage and never reads mutable state. ``render`` is pure: the
same snapshot gives the same frame.

Generated text reaches the terminal through ``printable``: a model's output must not be able to move the cursor,
clear the screen or retitle the window, so control characters are shown as symbols instead of being sent raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.segment import Segment
from rich.text import Text

from ..types import Generation, Mode, Snapshot, StageSnapshot

__all__ = ["REFRESH_PER_SECOND", "printable", "render", "initial_snapshot", "run_with_live_view",
           "loading_progress"]

REFRESH_PER_SECOND = 8  # frames drawn, and snapshots published, per second
TEXT_LINES = 14  # lines of generated text on screen (fewer when the terminal is short)
MAX_TEXT_LINES = 30  # ... and at most this many when it is tall

_STATE_STYLE = {"drafting": "cyan", "verifying": "green", "rolling back": "bold red", "waiting": "yellow",
                "bypassed": "magenta", "idle": "dim", "done": "dim"}

# C0 controls (but newline and tab) -> the Unicode "control pictures" (U+2400..); DEL and the C1 controls -> U+FFFD
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {0x7F: 0x2421} | {c: 0xFFFD
                                                                                     for c in range(0x80, 0xA0)}


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: control characters other than newline and tab become visible
    symbols (ESC -> U+241B), so generated text cannot send escape sequences."""
    return text.replace("\r\n", "\n").translate(_VISIBLE)


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def _role(index: int, count: int) -> str:
    return "target" if index == count - 1 else ("draft" if index == 0 else "middle")


# (header, right-justified, the narrow layout's header or None when the narrow layout leaves the column out)
_COLUMNS = (("stage", False, "#"), ("model", False, "model"), ("device", False, None), ("state", False, "state"),
            ("queue", True, "queue"), ("in flight", True, None), ("accept recent", True, None),
            ("accept all", True, "accept"), ("tok/verify", True, "tok/ver"), ("rollbacks", True, "rollbacks"),
            ("fwd/s", True, None), ("busy", True, None))
_MIN_WIDTH = {"state": 12, "fwd/s": 6, "busy": 6, "accept": 6}  # so that columns do not jitter between frames
_GAP = "  "
WIDE = 130  # columns the full table needs; narrower consoles get the narrow layout


def _stage_cells(s: StageSnapshot, count: int, elapsed: float) -> list[str]:
    per_second = 1 / elapsed if elapsed > 0 else 0.0
    apv = s.accepted_per_verification
    checks = s.index > 0  # stage 0 has no predecessor: no inbound queue, nothing in flight
    return [f"{s.index} {_role(s.index, count)}", s.model, s.device, s.state,
            str(s.queue_depth) if checks else "-", str(s.in_flight) if checks else "-",
            _pct(s.recent_acceptance), _pct(s.acceptance), f"{apv:.2f}" if apv is not None else "-",
            str(s.rollbacks), f"{s.forwards * per_second:.1f}",
            _pct(min(1.0, s.busy_seconds * per_second)) if elapsed > 0 else "-"]


def _fit(cell: str, width: int, right: bool) -> str:
    if cell_len(cell) > width:
        return set_cell_size(cell, width - 1) + "\u2026"
    return " " * (width - cell_len(cell)) + cell if right else set_cell_size(cell, width)


def stage_table(snap: Snapshot, title: str = "pipespec", width: int = WIDE) -> Text:
    """One row per stage: what it is, what it is doing, how its verifications and rollbacks go.

    Laid out by hand, not with ``rich.table.Table``: this is drawn several times a second while the stages run, and
    a Table's layout costs milliseconds of the GIL per frame. Below ``WIDE`` columns only the essentials are kept;
    a model name that still does not fit is cut.
    """
    wide = width >= WIDE
    keep = [i for i, (_, _, narrow) in enumerate(_COLUMNS) if wide or narrow is not None]
    heads = [_COLUMNS[i][0] if wide else str(_COLUMNS[i][2]) for i in keep]
    right = [_COLUMNS[i][1] for i in keep]
    rows = []
    for s in snap.stages:
        cells = _stage_cells(s, len(snap.stages), snap.elapsed)
        if not wide:
            cells[0] = str(s.index)
        rows.append([cells[i] for i in keep])
    widths = [max(cell_len(h), _MIN_WIDTH.get(h, 0), *(cell_len(r[j]) for r in rows)) for j, h in enumerate(heads)]
    excess = sum(widths) + len(_GAP) * (len(widths) - 1) - width
    if excess > 0:  # the model column gives way
        widths[1] = max(4, widths[1] - excess)
    text = Text(no_wrap=True, overflow="crop")
    text.append(title, "bold").append("  mode ", "dim").append(snap.mode).append("\n")
    text.append(_GAP.join(_fit(h, w, r) for h, w, r in zip(heads, widths, right)), "bold").append("\n")
    text.append("\u2500" * (sum(widths) + len(_GAP) * (len(widths) - 1)), "dim")
    for s, row in zip(snap.stages, rows):
        text.append("\n")
        for j, (cell, w, r) in enumerate(zip(row, widths, right)):
            if j:
                text.append(_GAP)
            text.append(_fit(cell, w, r), _STATE_STYLE.get(s.state, "") if heads[j] == "state" else "")
    return text


class _StageTable:
    """``stage_table`` laid out for the width it is drawn at."""

    def __init__(self, snap: Snapshot, title: str) -> None:
        self.snap = snap
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield stage_table(self.snap, self.title, options.max_width)


def footer(snap: Snapshot) -> Text:
    return Text.assemble(("committed ", "dim"), (f"{snap.committed}", "bold"), (" tokens  ", "dim"),
                         (f"{snap.tokens_per_second:.1f}", "bold"), (" tokens/s  ", "dim"),
                         ("elapsed ", "dim"), (f"{snap.elapsed:.1f}s", "bold"),
                         ("  done" if snap.done else "", "bold green"),
                         (f"  {snap.note}" if snap.note else "", "yellow"))


class _Tail:
    """The last lines of a text as wrapped at the width it is drawn at: long text scrolls up, the newest line
    stays at the bottom. Always ``lines`` lines tall, so the frame does not jump while text arrives."""

    def __init__(self, text: str, lines: int, reserved: int) -> None:
        self.text = text
        self.lines = lines
        self.reserved = reserved  # screen lines the rest of the frame takes

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.lines
        if console.is_terminal:  # a tall terminal shows more text, a short one less (the table must stay visible)
            lines = max(3, min(MAX_TEXT_LINES, console.size.height - self.reserved))
        width = max(1, options.max_width)
        tail = "\n".join(self.text.rsplit("\n", lines)[-lines:])[-lines * width:]  # bounded work per frame
        rendered = console.render_lines(Text(tail), options.update(height=None), pad=False)[-lines:]
        rendered += [[] for _ in range(lines - len(rendered))]
        for line in rendered:
            yield from line
            yield Segment.line()


def render(snap: Snapshot | None, *, title: str = "pipespec", show_text: bool = True) -> RenderableType:
    """One frame of the live view: the stage table, the totals, and (``show_text``) the generated text's tail."""
    if snap is None:
        return Text("starting...", style="dim")
    parts: list[RenderableType] = [_StageTable(snap, title), footer(snap)]
    if show_text:
        reserved = len(snap.stages) + 8  # the table's title, header and rule; the footer; the panel's border
        parts.append(Panel(_Tail(printable(snap.text), TEXT_LINES, reserved), title="generated text",
                           title_align="left", border_style="blue"))
    return Group(*parts)


def initial_snapshot(names: Iterable[str], devices: Iterable[str], mode: Mode = "pipe") -> Snapshot:
    """What the view shows before the generation's first snapshot: every stage idle, nothing counted yet."""
    stages = tuple(StageSnapshot(index=i, model=name, device=device, state="idle", queue_depth=0, in_flight=0,
                                 forwards=0, proposed=0, accepted=0, recent_proposed=0, recent_accepted=0,
                                 verifications=0, rollbacks=0, busy_seconds=0.0)
                   for i, (name, device) in enumerate(zip(names, devices)))
    return Snapshot(mode=mode, stages=stages, committed=0, elapsed=0.0, text="")


async def run_with_live_view(pipe: Any, prompt: str, options: dict[str, Any],
                             console: Console | None = None) -> Generation:
    """Run one generation under a Live view, then print the whole text and the final statistics.

    The event loop only publishes snapshots (cheap: a few counters per stage); Rich draws on its own thread.
    """
    from rich.live import Live

    console = console or Console()
    title = " -> ".join(pipe.names)
    latest = [initial_snapshot(pipe.names, [m.device for m in pipe.members], options.get("mode", "pipe"))]
    # the generation runs as its own task, and this one redraws until it is done. Plain asyncio on purpose: an AnyIO
    # task group with a ``move_on_after`` per redraw lost a Ctrl-C once in CI (the generation ended cancelled, the
    # group returned normally, and there was no result): a scope whose deadline passes in the same loop cycle as a
    # native ``Task.cancel`` can take that cancellation for its own (agronholm/anyio#1214). ``asyncio.wait``'s
    # timeout cancels nothing, so nothing can be mistaken for it
    task = asyncio.ensure_future(pipe.generate(prompt, **options))

    # redirect_stderr: a stray warning printed during the run goes above the view instead of through it
    with Live(get_renderable=lambda: render(latest[0], title=title), console=console,
              refresh_per_second=REFRESH_PER_SECOND, transient=True, redirect_stderr=True):
        try:
            while not task.done():
                snap = pipe.snapshot()
                if snap is not None and not snap.done:  # a done one is the previous generation's, or the end
                    latest[0] = snap
                elif getattr(pipe, "preparing", None) and latest[0].committed == 0:  # mode auto, before it starts
                    latest[0] = dataclasses.replace(latest[0], note=pipe.preparing)
                await asyncio.wait({task}, timeout=1 / REFRESH_PER_SECOND)
        except BaseException:  # Ctrl-C cancels this task: cancel the generation, wait for it to stop, pass it on
            task.cancel()
            await asyncio.wait({task})
            raise
    g = task.result()  # the generation's error, if it raised one, now that the live view is gone
    console.out(printable(g.text), highlight=False)
    final = pipe.snapshot()
    if final is not None:
        console.print(render(final, title=title, show_text=False))
    if g.stats.mode_chosen is not None:  # mode auto: what it ran and why (the probes' rates, or remembered ones)
        console.print(Text(f"mode auto: {g.stats.reason}", style="dim"))
    return g


@contextlib.contextmanager
def loading_progress(names: list[str], console: Console | None = None) -> Iterator[Callable[[int, str], None]]:
    """One bar per model while the chain loads (a large model takes minutes); gone once everything is loaded.

    Yields ``on_loaded(i, name)`` for ``Pipeline.load``. Draws on stderr, so stdout stays the generated text.
    """
    progress = Progress(SpinnerColumn(finished_text="[green]ok"), TextColumn("{task.description}", markup=False),
                        BarColumn(),
                        TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
    # total=None: a pulsing bar; a folder or hub id is shown by its last part, as the live view names it
    tasks = [progress.add_task(f"loading {Path(name.rstrip('/')).name or name}", total=None) for name in names]

    def on_loaded(i: int, name: str) -> None:
        progress.update(tasks[i], total=1, completed=1, description=f"loaded  {name}")

    with progress:
        yield on_loaded
