"""Mode "auto"'s choices, remembered across processes: a chain probed once on a placement runs its fastest mode
from the next command's first token on.

``pipespec run`` is one generation per process, and the probes of mode "auto" (``Pipeline.choose_mode``: six short
generations, up to four more to tune sd's lookahead, a runoff of a near tie) would cost every run seconds. So the
CLI gives its pipeline a ``ChoiceStore`` (``apps.common.choice_store``): the first run probes and writes what it
chose, keyed by everything the choice depends on, and later runs with the same key read it back instead of probing.
The CLI's ``--reprobe`` probes again (its words are the store's ``again``).

The key holds what the application loaded (model names or folders, devices, dtype, quantization, backend, the GPUs'
names, the versions of pipespec and torch: ``scope``) and what the request asks that changes a mode's speed (greedy
or sampled and the acceptance rule, a given lookahead, the pipe settings). Not the prompt: a chain's acceptance
differs by prompt, and a chat reuses its first reply's choice for every later one in the same way.

The file is JSON (``$PIPESPEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipespec``, else ``~/.cache/pipespec``, then
``auto-choices.json``), written whole to a temporary file and renamed over the old one, so a reader never sees half
of it; the newest ``MAX_ENTRIES`` keys are kept. A file that cannot be read or written costs the probes, never the
generation: the store then behaves as empty, and says so once in the log.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from ..types import MODES, Mode

FILE_NAME = "auto-choices.json"
MAX_ENTRIES = 64
FORMAT = 1

_log = structlog.get_logger("pipespec.choices")


class Remembered(NamedTuple):
    """A choice read back: the mode, why it was chosen then, sd's tuned lookahead, and when (Unix seconds)."""

    mode: Mode
    reason: str
    lookahead: int | None
    when: float


def default_dir() -> Path:
    """Where the CLI keeps its choices: ``$PIPESPEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/pipespec``, else
    ``~/.cache/pipespec``."""
    if os.environ.get("PIPESPEC_CACHE_DIR"):
        return Path(os.environ["PIPESPEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipespec"


class ChoiceStore:
    """Mode "auto"'s choices in one JSON file, keyed by ``scope`` (what was loaded, where) plus a request's parts."""

    def __init__(self, path: str | os.PathLike[str], scope: Mapping[str, Any], *, reprobe: bool = False,
                 again: str = "") -> None:
        self.path = Path(path)
        self.scope = dict(scope)
        self.reprobe = reprobe  # read nothing back (probe again), still write what is chosen
        self.again = again  # how the user makes it probe again, for a remembered choice's reason (the app's words)
        self._warned = False

    @classmethod
    def default(cls, scope: Mapping[str, Any], *, reprobe: bool = False, again: str = "") -> ChoiceStore:
        return cls(default_dir() / FILE_NAME, scope, reprobe=reprobe, again=again)

    def key(self, parts: Mapping[str, Any]) -> str:
        return json.dumps({**self.scope, **parts}, sort_keys=True, separators=(",", ":"), default=str)

    def get(self, parts: Mapping[str, Any]) -> Remembered | None:
        if self.reprobe:
            return None
        entry = self._read().get(self.key(parts))
        try:
            mode, reason = entry["mode"], str(entry["reason"])  # type: ignore[index]
            lookahead = entry.get("lookahead")  # type: ignore[union-attr]
            if mode not in MODES or not (lookahead is None or (isinstance(lookahead, int) and lookahead > 0)):
                return None
            return Remembered(mode, reason, lookahead, float(entry.get("when", 0.0)))  # type: ignore[union-attr]
        except (TypeError, KeyError, ValueError, AttributeError):
            return None  # no entry, or one this version cannot read

    def put(self, parts: Mapping[str, Any], mode: Mode, reason: str, lookahead: int | None) -> None:
        entries = self._read()
        key = self.key(parts)
        entries.pop(key, None)
        entries[key] = {"mode": mode, "reason": reason, "lookahead": lookahead, "when": time.time()}
        self._write(dict(list(entries.items())[-MAX_ENTRIES:]))  # insertion order: the newest last

    def _write(self, entries: dict[str, Any]) -> None:
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".auto-choices-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "choices": entries}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self._warn("could not write mode auto's choices", exc)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._warn("could not read mode auto's choices", exc)
            return {}
        choices = data.get("choices") if isinstance(data, dict) and data.get("format") == FORMAT else None
        return dict(choices) if isinstance(choices, dict) else {}

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned and structlog.is_configured():
            _log.warning(what, path=str(self.path), error=str(exc))
        self._warned = True
