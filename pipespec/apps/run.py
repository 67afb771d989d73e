"""``pipespec run``: load the chain, generate once, stream the text (or print one JSON object)."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from typing import Any

import click

from ..errors import EXIT_INTERRUPTED, EXIT_OK, PipespecError
from ..scheduler import Pipeline
from ..types import Generation
from .common import load_pipeline, report


def _result_json(g: Generation) -> str:
    return json.dumps({"text": g.text, "token_ids": list(g.token_ids), "stats": g.stats.to_dict()})


def run_command(names: list[str], prompt: str, options: dict[str, Any], *, device: str | list[str], dtype: str,
                trust_remote_code: bool, as_json: bool, use_tui: bool, backend: Any = "thread",
                quantize: str | None = None, split: str = "tensor", reprobe: bool = False) -> int:
    """Returns the process exit code."""
    holder: dict[str, Any] = {}

    async def main() -> int:
        pipe = await load_pipeline(names, device, dtype, trust_remote_code, use_tui, backend, quantize, split,
                                   reprobe)
        holder["pipe"] = pipe
        async with pipe:
            pipe.make_request(prompt, **{k: v for k, v in options.items() if k != "trace"})  # validate first
            # a warm-up first where it pays (CUDA): this process's only generation would otherwise run eagerly
            generation = {**options, "warm_up": True}
            if as_json:
                g = await pipe.generate(prompt, **generation)
                click.echo(_result_json(g))
                return EXIT_OK
            if use_tui:
                from .tui import run_with_live_view

                g = await run_with_live_view(pipe, prompt, generation)
                holder["done"] = True
                return EXIT_OK
            async for piece in pipe.stream(prompt, **generation):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            holder["done"] = True
            return EXIT_OK

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        _report_interrupted(holder, as_json, use_tui)
        # skip the interpreter's final garbage collections over torch's objects (1-2 s): Ctrl-C must exit promptly
        gc.freeze()
        return EXIT_INTERRUPTED
    except PipespecError as exc:
        return report(exc)


def _report_interrupted(holder: dict[str, Any], as_json: bool, use_tui: bool) -> None:
    """Ctrl-C: nothing generated is lost. Streamed text is already on stdout; JSON and the live view print it."""
    pipe: Pipeline | None = holder.get("pipe")
    snap = pipe.snapshot() if pipe is not None else None
    if as_json:
        live = pipe._live if pipe is not None else None  # noqa: SLF001 - the CLI owns this pipeline
        tokens = list(live.output.tokens) if live is not None else []
        text = live.output.text if live is not None else ""
        click.echo(json.dumps({"text": text, "token_ids": tokens, "stats": {"tokens": len(tokens),
                                                                           "stop_reason": "interrupted"}}))
    elif use_tui and snap is not None:
        from .tui import printable

        sys.stdout.write(printable(snap.text) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    click.echo("pipespec: interrupted", err=True)
