"""``pipespec chat``: interactive, multi-turn generation in a terminal.

A ``Conversation`` is a list of turns. When the tokenizer has a chat template, the template renders it (roles,
special tokens, the assistant's opening); otherwise the prompt is the plain transcript and every reply continues it.
Before each reply the oldest exchanges are dropped if the transcript plus the reply would not fit the chain's context.

One ``asyncio.Runner`` (one event loop) lives for the whole session and runs only while a reply is generated; the
line is read with ``input()`` on the main thread in between, so readline's line editing and history work as usual.
Ctrl-C during a reply: the runner turns SIGINT into cancellation of the reply's task, ``Pipeline.stream`` stops
every stage, and the runner raises KeyboardInterrupt, which ends the reply only. Ctrl-D or ``/quit`` leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from ..errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError, PipespecError
from ..scheduler import Pipeline
from .common import error, load_pipeline, report
from .tui import printable, render

__all__ = ["Conversation", "chat_command"]

PROMPT = "> "
HELP = """\
commands:
  /stats   statistics of the last reply (per stage) and of this session
  /reset   forget the conversation (the system message stays)
  /help    this text
  /quit    leave (Ctrl-D too)
Ctrl-C stops the current reply and returns to the prompt. A line starting with // sends one /."""


@dataclass
class Conversation:
    """The turns so far, oldest first: ``(role, text)`` with role ``user`` or ``assistant``."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": role, "content": text} for role, text in self.turns]

    def transcript(self) -> str:
        """Plain continuation: the turns back to back; a user's line starts on a new line, a reply continues
        the text it answers exactly where it ends."""
        text = self.system or ""
        for role, turn in self.turns:
            if role == "user" and text and not text.endswith("\n"):
                text += "\n"
            text += turn
        return text

    def drop_oldest(self) -> bool:
        """Forget the oldest exchange (a user line and its reply); never the last user line."""
        if len(self.turns) < 3:
            return False
        del self.turns[:2]
        return True


def uses_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(conv: Conversation, tokenizer: Any) -> list[int]:
    """The prompt's token ids: the chat template's rendering (its own special tokens, none added), or the plain
    transcript tokenized as ``pipespec run`` tokenizes a prompt."""
    if uses_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(conv.messages(), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. no system role) becomes one line
            raise ConfigError(f"the tokenizer's chat template failed: {exc}") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(conv.transcript())["input_ids"])


def fit(conv: Conversation, tokenizer: Any, context: int | None, max_new_tokens: int) -> tuple[list[int], int, int]:
    """The prompt for the next reply and its token budget, dropping the oldest exchanges to fit ``context``.

    Returns ``(ids, max_new_tokens, exchanges dropped)``; the reply is shortened only once nothing is left to drop.
    """
    dropped = 0
    while True:
        ids = encode(conv, tokenizer)
        if context is None or len(ids) + max_new_tokens <= context:
            return ids, max_new_tokens, dropped
        if conv.drop_oldest():
            dropped += 1
            continue
        if len(ids) >= context:
            raise ConfigError(f"this line is too long: {len(ids)} tokens, the context of this chain is {context}")
        return ids, context - len(ids), dropped


class ChatSession:
    """The prompt loop: reads lines, runs commands, streams replies."""

    def __init__(self, pipe: Pipeline, options: dict[str, Any], system: str | None, *,
                 out: TextIO | None = None) -> None:
        self.pipe = pipe
        self.options = dict(options)
        self.max_new_tokens = int(self.options.pop("max_new_tokens", 256))
        self.conv = Conversation(system)
        self.context = pipe.context
        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False, soft_wrap=True)
        self.replies = 0
        self.tokens = 0
        self.seconds = 0.0

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self, runner: asyncio.Runner) -> None:
        self.banner()
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
                self.out.write("\n")
                continue
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line.strip()):
                    return
                continue
            try:
                self.respond(runner, line[1:] if line.startswith("//") else line)
            except KeyboardInterrupt:  # Ctrl-C just before or after the generation itself: the reply ends there
                if self.conv.turns and self.conv.turns[-1][0] == "user":
                    self.conv.turns.append(("assistant", ""))
                self.out.write("\n")

    def banner(self) -> None:
        how = "chat template" if uses_template(self.pipe.tokenizer) else "plain continuation (no chat template)"
        devices = sorted({m.device for m in self.pipe.members})
        self.console.print(Text.assemble(("pipespec chat", "bold"), f"  {' -> '.join(self.pipe.names)}  ",
                                         (f"{', '.join(devices)}, {how}", "dim")))
        self.console.print("[dim]/help for commands, Ctrl-C stops a reply, Ctrl-D leaves[/]")

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name = line.split()[0].lower()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/reset":
            self.conv = Conversation(self.conv.system)
            self.console.print("[dim](conversation cleared)[/]")
        elif name == "/stats":
            self.stats()
        else:
            self.console.print(f"unknown command {name}; /help lists them", markup=False)
        return True

    def stats(self) -> None:
        snap = self.pipe.snapshot()
        if snap is None:
            self.console.print("[dim]no reply yet[/]")
        else:
            self.console.print(render(snap, title="last reply", show_text=False))
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        prompt = len(encode(self.conv, self.pipe.tokenizer)) if self.conv.turns else 0
        of = f" of {self.context}" if self.context else ""
        self.console.print(f"session: {self.replies} replies, {self.tokens} tokens in {self.seconds:.1f}s "
                           f"({rate:.1f} tokens/s); conversation: {len(self.conv.turns)} turns, "
                           f"{prompt}{of} context tokens", markup=False)

    # -- one reply --------------------------------------------------------------------------------------------

    def respond(self, runner: asyncio.Runner, line: str) -> None:
        before = list(self.conv.turns)
        self.conv.turns.append(("user", line))
        try:
            ids, budget, dropped = fit(self.conv, self.pipe.tokenizer, self.context, self.max_new_tokens)
        except ConfigError as exc:
            self.conv.turns = before
            self.console.print(f"pipespec: {exc}", markup=False)
            return
        if dropped:
            self.console.print(f"[dim](the {dropped} oldest exchange{'s' if dropped > 1 else ''} dropped to fit "
                               f"the context)[/]")
        pieces: list[str] = []
        stopped = failed = False
        try:
            runner.run(self._stream(ids, budget, pieces))
        except KeyboardInterrupt:
            stopped = True
        except PipespecError as exc:
            failed = True
            self.out.write("\n")
            self.console.print(f"pipespec: error: {exc}", markup=False)
        reply = "".join(pieces)
        if failed and not reply:
            self.conv.turns.pop()  # nothing was said: forget the line too, so it can be sent again
            return
        self.conv.turns.append(("assistant", reply))  # a stopped reply stays: the user saw it
        if not reply.endswith("\n"):
            self.out.write("\n")
        if stopped and not pieces:  # stopped before the first piece: the last snapshot may be the previous reply's
            self.console.print(Text("[stopped]", style="dim"))
        else:
            self.summary(stopped)

    async def _stream(self, ids: list[int], budget: int, pieces: list[str]) -> None:
        # warm_up: before the chat's first reply where it pays (CUDA), so that reply replays CUDA graphs too
        async for piece in self.pipe.stream(ids, **self.options, max_new_tokens=budget, warm_up=True):
            pieces.append(piece)
            self.out.write(printable(piece))
            self.out.flush()

    def summary(self, stopped: bool) -> None:
        snap = self.pipe.snapshot()
        if snap is None:
            return
        self.replies += 1
        self.tokens += snap.committed
        self.seconds += snap.elapsed
        parts = [f"{snap.committed} tokens", f"{snap.tokens_per_second:.1f} tokens/s", f"mode {snap.mode}"]
        target = snap.stages[-1]
        if target.acceptance is not None:
            parts.append(f"acceptance {100 * target.acceptance:.0f}%")
        if len(snap.stages) > 1:
            parts.append(f"rollbacks {sum(s.rollbacks for s in snap.stages)}")
        if stopped:
            parts.insert(0, "stopped")
        self.console.print(Text(f"[{' · '.join(parts)}]", style="dim"))


@contextlib.contextmanager
def line_history() -> Iterator[None]:
    """readline's line editing for ``input()``, and a history kept between sessions (only on a terminal)."""
    if not sys.stdin.isatty():
        yield
        return
    try:
        import readline
    except ImportError:  # no readline (Windows): input() still works, without editing keys
        yield
        return
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    path = Path(os.environ.get("PIPESPEC_HISTORY") or state / "pipespec" / "chat_history")
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def chat_command(names: list[str], options: dict[str, Any], *, device: str | list[str], dtype: str,
                 trust_remote_code: bool, system: str | None = None, backend: Any = "thread",
                 quantize: str | None = None, split: str = "tensor", reprobe: bool = False) -> int:
    """Load the chain, then talk until /quit or Ctrl-D. Returns the process exit code."""
    with asyncio.Runner() as runner:
        try:
            pipe = runner.run(load_pipeline(names, device, dtype, trust_remote_code, sys.stderr.isatty(),
                                            backend, quantize, split, reprobe))
        except KeyboardInterrupt:
            error("interrupted while loading")
            return EXIT_INTERRUPTED
        except PipespecError as exc:
            return report(exc)
        try:
            if pipe.tokenizer is None:
                return report(ConfigError("chat needs a tokenizer, and the target has none"))
            try:
                pipe.make_request([0], **options)  # every bad option fails here, before the first prompt
            except ConfigError as exc:
                return report(exc)
            with line_history():
                ChatSession(pipe, options, system).run(runner)
            return EXIT_OK
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                runner.run(pipe.aclose())
