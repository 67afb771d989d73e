"""The live terminal view: ``render(snapshot)`` and the loop that feeds it.

The event loop publishes an immutable ``Snapshot`` a few times a second; Rich's ``Live`` renders the latest one on
its own refresh thread, so drawing never runs inside a stage and never reads mutable state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .types import Generation, Snapshot

REFRESH_PER_SECOND = 8
TEXT_LINES = 14  # lines of generated text kept on screen

_STATE_STYLE = {"drafting": "cyan", "verifying": "green", "rolling back": "red", "waiting": "yellow",
                "idle": "dim", "done": "dim"}


def _pct(x: float | None) -> str:
    return f"{100 * x:5.1f}%" if x is not None else "    -"


def render(snap: Snapshot | None, *, title: str = "pipespec") -> RenderableType:
    """One frame of the live view for a snapshot (pure: the same snapshot gives the same frame)."""
    if snap is None:
        return Text("starting...", style="dim")
    table = Table(expand=True, title=f"{title}  mode={snap.mode}", title_justify="left")
    for col, justify in (("stage", "left"), ("model", "left"), ("device", "left"), ("state", "left"),
                         ("queue", "right"), ("in flight", "right"), ("accept (recent)", "right"),
                         ("accept (all)", "right"), ("tok/verify", "right"), ("rollbacks", "right"),
                         ("fwd/s", "right")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    last = len(snap.stages) - 1
    for s in snap.stages:
        role = "target" if s.index == last else ("draft" if s.index == 0 else "middle")
        rate = s.forwards / snap.elapsed if snap.elapsed > 0 else 0.0
        apv = s.accepted_per_verification
        table.add_row(f"{s.index} {role}", s.model, s.device, Text(s.state, style=_STATE_STYLE.get(s.state, "")),
                      str(s.queue_depth), str(s.in_flight), _pct(s.recent_acceptance), _pct(s.acceptance),
                      f"{apv:.2f}" if apv is not None else "-", str(s.rollbacks), f"{rate:.1f}")
    footer = Text.assemble(("committed ", "dim"), (f"{snap.committed}", "bold"), ("  tokens/s ", "dim"),
                           (f"{snap.tokens_per_second:.1f}", "bold"), ("  elapsed ", "dim"),
                           (f"{snap.elapsed:.1f}s", "bold"), ("  done" if snap.done else "", "green"))
    lines = snap.text.splitlines()[-TEXT_LINES:]
    text_panel = Panel(Text("\n".join(lines)), title="generated text", border_style="blue")
    return Group(table, footer, text_panel)


async def run_with_live_view(pipe: Any, prompt: str, options: dict[str, Any],
                             console: Console | None = None) -> Generation:
    """Run one generation under a Live view; print the full text when done."""
    from rich.live import Live

    console = console or Console()
    latest: list[Snapshot | None] = [None]
    result: list[Generation] = []
    errors: list[BaseException] = []
    names = ",".join(pipe.names)

    async def generate() -> None:
        try:
            result.append(await pipe.generate(prompt, **options))
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the live view is gone
            errors.append(exc)

    with Live(get_renderable=lambda: render(latest[0], title=names), console=console,
              refresh_per_second=REFRESH_PER_SECOND, transient=True, redirect_stderr=False):
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate)
            while not result and not errors:
                latest[0] = pipe.snapshot()
                await anyio.sleep(1 / REFRESH_PER_SECOND)
    if errors:
        raise errors[0]
    final = pipe.snapshot()
    console.print(render(final, title=names))
    console.print(result[0].text, markup=False, highlight=False)
    return result[0]


@contextlib.contextmanager
def loading_progress(names: list[str], console: Console | None = None) -> Iterator[Callable[[int, str], None]]:
    """One spinner per model while the chain loads (a large model takes minutes)."""
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                        TimeElapsedColumn(), console=console or Console(stderr=True), transient=True)
    tasks = [progress.add_task(f"loading {name}", total=1) for name in names]

    def on_loaded(i: int, name: str) -> None:
        progress.update(tasks[i], completed=1, description=f"loaded {name}")

    with progress:
        yield on_loaded
