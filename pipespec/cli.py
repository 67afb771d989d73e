"""The ``pipespec`` command line (the console script is ``pipespec.cli:main``). Logging and the Console are
configured here and nowhere else.

Every bad input ends with one line on stderr and exit code 2; a failed generation with exit code 1; Ctrl-C prints
what was generated so far and exits with code 130, at any moment: while this module's own imports run (click,
asyncio: the first few hundred milliseconds of the command) the handler installed first thing below answers it;
from ``main`` on, ``_Group`` does. Only a SIGINT during the interpreter's own start-up, before this module runs,
ends the process by the signal.
"""

from __future__ import annotations

import signal
import sys
import threading


def _interrupted_while_starting(_signum: int, _frame: object) -> None:
    sys.stderr.write("pipespec: interrupted\n")
    raise SystemExit(130)


# until main() restores Python's own handler; only where Ctrl-C still has Python's default handler on the main thread
# (a program that imports this module from another thread, or handles SIGINT itself, keeps what it has)
if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import asyncio  # noqa: E402 - after the start-up handler, on purpose
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NoReturn, TypeVar  # noqa: E402

import click  # noqa: E402

from .errors import (  # noqa: E402
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    PipespecError,
    exit_code,
)
from .placement import SPLITS  # noqa: E402
from .types import BACKENDS, CALL_DEADLINE_S, MODES, REQUEST_MODES  # noqa: E402

T = TypeVar("T")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"pipespec: error: {message}", err=True)
    sys.exit(code)


def configure_logging(verbose: int, log_file: str | None, console_ok: bool) -> None:
    """structlog, once: JSON lines to --log-file; readable lines on stderr with -v when no live view runs."""
    import logging

    import structlog

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    processors: list[Any] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso")]
    if log_file:
        try:
            stream = open(log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives for the process
        except OSError as exc:
            fail(f"cannot open log file {log_file}: {exc.strerror}")
        structlog.configure(processors=[*processors, structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(stream),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                            cache_logger_on_first_use=True)
    elif console_ok and verbose:
        structlog.configure(processors=[*processors, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())],
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(level),
                            cache_logger_on_first_use=True)
    else:
        structlog.configure(processors=processors, logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                            cache_logger_on_first_use=True)
    # transformers and the hub talk on their own (warnings, progress bars); keep them off the screen unless -v
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if verbose:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()


def parse_models(models: str | None) -> list[str]:
    from .loading import DEFAULT_CHAIN

    if models is None:
        return list(DEFAULT_CHAIN)
    names = [m.strip() for m in models.split(",")]
    if not all(names):
        fail(f"--models {models!r} has an empty entry; list models smallest first, separated by commas")
    return names


def resolve_devices(n_models: int, device: str, placement: str | None) -> list[str]:
    """--device and --placement -> one device per model (a bad value ends with a one-line error)."""
    import torch

    from .placement import devices_for

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        return list(devices_for(n_models, device, placement, n_gpus))
    except ConfigError as exc:
        fail(str(exc))


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        fail("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read prompt file {prompt_file}: {exc.strerror}")
        except UnicodeDecodeError:
            fail(f"prompt file {prompt_file} is not UTF-8 text")
    elif prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        fail("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    if not text.strip():
        fail("the prompt is empty")
    return text


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """asyncio.run with our error policy. asyncio turns Ctrl-C into cancellation of the main task first, so the
    pipeline stops its stages cleanly before KeyboardInterrupt reaches us."""
    try:
        return asyncio.run(main())
    except PipespecError as exc:
        fail(str(exc), exit_code(exc))


# -- shared options ----------------------------------------------------------------------------------------------

def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--models", "-m", default=None, metavar="A,B,C",
                     help="Models smallest first, target last (aliases, folders, .gguf files or hub ids). "
                          "Default: the built-in family."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="auto: float32 on CPU, bfloat16 on CUDA."),
        click.option("--trust-remote-code", is_flag=True, help="Allow model folders to run their own Python code."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """run's and chat's generation options. The mode is auto by default: its probes' choice is remembered per chain,
    placement and kind of request (``scheduler.choices``), so only the first command of a kind pays for them."""
    opts = [
        click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 means greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 means no top-k filter."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold."),
        click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed."),
        click.option("--acceptance", type=click.Choice(["coupled", "rejection"]), default="coupled",
                     show_default=True, help="How sampled drafts are verified (see docs/sampling.md)."),
        click.option("--mode", type=click.Choice(REQUEST_MODES), default="auto", show_default=True,
                     help="pipe: asynchronous; sd: lock-step; ar: the target alone; auto: probe the three on this "
                          "placement, run the fastest, and remember the choice for later commands."),
        click.option("--reprobe", is_flag=True,
                     help="Mode auto: probe again instead of using the choice remembered from an earlier command."),
        click.option("--verify-cap", type=int, default=64, show_default=True,
                     help="Most proposed tokens a stage checks in one forward pass."),
        click.option("--lookahead", type=int, default=None,
                     help="Tokens per round in sd mode. Default: 8, which --mode auto may tune (4, 8 or 16)."),
        click.option("--max-ahead", type=int, default=None,
                     help="Most tokens a stage may run ahead of its successor (pipe mode). Default: --verify-cap."),
        click.option("--adaptive/--no-adaptive", default=True, show_default=True,
                     help="Adapt verify caps and run-ahead limits to the acceptance and latency seen (pipe mode); "
                          "--no-adaptive keeps --verify-cap and --max-ahead fixed."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f




quantize_option = click.option(
    "--quantize", default=None, metavar="KIND|target=KIND|K,K,K",
    help="Weight-only quantized weights on the static path: int8, fp8 or int4 for every model, target=KIND for the "
         "target only, or one KIND (or none) per model in chain order. The output is then the quantized target's.")


def check_quantize(spec: str | None, n_models: int) -> None:
    """A bad --quantize fails here, in one line, before anything loads."""
    from .kernels.quant import parse_quantize

    try:
        parse_quantize(spec, n_models)
    except ConfigError as exc:
        fail(str(exc))


placement_option = click.option(
    "--placement", default=None, metavar="0,0,1",
    help="GPU index (or 'cpu') per model, smallest first; default: one stage per GPU, the target alone if GPUs are few. "
         "G+G puts a model on several GPUs (split as --split says), e.g. 0,0,1+2. "
         "With --backend ray, NODE:GPU (or NODE:cpu) per model, e.g. node1:0,node1:1,node2:0.")
split_option = click.option(
    "--split", type=click.Choice(SPLITS), default=SPLITS[0], show_default=True,
    help="How a model placed on several GPUs (--placement ...,0+1) is split: tensor-parallel (heads and MLP columns, "
         "all GPUs read at once) or layer-wise (consecutive layers per GPU, one GPU at a time).")


def backend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--backend and --ray-address, shared by run, chat, bench and plan (``runners.backend``)."""
    f = click.option("--ray-address", default=None, metavar="ADDR",
                     help="--backend ray: the cluster to join ('auto': the one this machine is part of); default: "
                          "start a local Ray.")(f)
    f = click.option("--call-deadline", type=float, default=CALL_DEADLINE_S, show_default=True, metavar="S",
                     help="--backend process/ray: seconds one call into a worker may take before the generation "
                          "fails.")(f)
    return click.option("--backend", type=click.Choice(BACKENDS), default="thread", show_default=True,
                        help="Where each model's worker runs: a thread of this process, a process of its own on "
                             "this machine, or a Ray actor (see docs/usage.md, several machines).")(f)


def resolve_chain(n_models: int, device: str, placement: str | None, backend: str, ray_address: str | None,
                  deadline: float) -> tuple[list[str], Any]:
    """--device, --placement and --backend -> one device per model and the ``Backend`` (one-line errors)."""
    from .runners.backend import Backend

    try:
        if placement and ":" in placement:
            if backend != "ray":
                raise ConfigError(f"--placement {placement!r} names nodes: that needs --backend ray")
            from .placement import parse_node_placement

            chosen = Backend("ray", deadline, ray_address, tuple(parse_node_placement(placement, n_models)))
            return chosen.devices(n_models) or [], chosen
        chosen = Backend(backend, deadline, ray_address)  # type: ignore[arg-type]
    except ConfigError as exc:
        fail(str(exc))
    return resolve_devices(n_models, device, placement), chosen
log_file_option = click.option("--log-file", default=None, metavar="PATH", help="Write JSON-lines logs here.")
trace_option = click.option(
    "--trace", default=None, metavar="FILE",
    help="Write a timeline of every stage (Chrome/Perfetto trace-event JSON; open in https://ui.perfetto.dev).")


def generation_options(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("temperature", "top_k", "top_p", "seed", "acceptance", "mode", "verify_cap", "lookahead", "max_ahead",
            "adaptive")
    return {k: kw[k] for k in keys if k in kw}


class _Group(click.Group):
    """click's group with pipespec's error policy: a usage error is one line and exit code 2 (click prints three),
    and Ctrl-C at any point, even while torch is still importing, ends with exit code 130 and no traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # Ctrl-C: a KeyboardInterrupt again,
            signal.signal(signal.SIGINT, signal.default_int_handler)        # handled below
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `pipespec`: the help, not an error
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(EXIT_OK)
        except click.UsageError as exc:
            hint = f" (see 'pipespec {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
            fail(f"{exc.format_message()}{hint}")
        except click.ClickException as exc:
            fail(exc.format_message())
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo("pipespec: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipespec", prog_name="pipespec")
def main() -> None:
    """PipeSpec: faster generation from a chain of language models, exactly the target's output."""


@main.command()
@model_options
@sampling_options
@placement_option
@quantize_option
@split_option
@backend_options
@click.option("--prompt", "-p", default=None, help="The prompt text.")
@click.option("--prompt-file", default=None, metavar="FILE", help="Read the prompt from a file.")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--stop", multiple=True, help="Stop after this string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object when done instead of streaming text.")
@click.option("--tui/--no-tui", default=None, help="Live view of every stage (default: on when stdout is a terminal).")
@trace_option
@log_file_option
@click.option("-v", "--verbose", count=True, help="Readable logs on stderr (when no live view runs).")
def run(models: str | None, device: str, dtype: str, trust_remote_code: bool, placement: str | None,
        prompt: str | None,
        prompt_file: str | None, max_new_tokens: int, stop: tuple[str, ...], as_json: bool, tui: bool | None,
        trace: str | None, log_file: str | None, verbose: int, backend: str, ray_address: str | None,
        call_deadline: float, quantize: str | None, split: str, **kw: Any) -> None:
    """Generate a continuation of a prompt with a chain of models."""
    from .apps.run import run_command

    use_tui = (sys.stdout.isatty() and not as_json) if tui is None else (tui and not as_json)
    configure_logging(verbose, log_file, console_ok=not use_tui)
    text = read_prompt(prompt, prompt_file)
    names = parse_models(models)
    check_quantize(quantize, len(names))
    options = generation_options(kw)
    options.update(max_new_tokens=max_new_tokens, stop=stop)
    if trace:
        options["trace"] = trace
    devices, chosen = resolve_chain(len(names), device, placement, backend, ray_address, call_deadline)
    code = run_command(names, text, options, device=devices, dtype=dtype, trust_remote_code=trust_remote_code,
                       as_json=as_json, use_tui=use_tui, backend=chosen, quantize=quantize, split=split,
                       reprobe=kw["reprobe"])
    sys.exit(code)


@main.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models_cmd(as_json: bool) -> None:
    """List the built-in family and the model aliases."""
    from .loading import ALIASES, BUILTIN

    rows = [{"name": k, "kind": "built-in", "source": str(v), "installed": (v / "config.json").exists()}
            for k, v in BUILTIN.items()]
    rows += [{"name": k, "kind": "alias", "source": v} for k, v in ALIASES.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pipespec models")
    for col in ("name", "kind", "source"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["kind"], row["source"])
    Console().print(table)
    click.echo("Any other name is a local folder, a .gguf file or a hub id (org/name).")


@main.command()
@model_options
@sampling_options
@placement_option
@quantize_option
@split_option
@backend_options
@click.option("--max-new-tokens", "-n", type=int, default=256, show_default=True, help="Most tokens per reply.")
@click.option("--system", default=None, metavar="TEXT",
              help="A system message (the chat template's system turn; else the start of the transcript).")
@click.option("--stop", multiple=True, help="End a reply after this string (repeatable).")
@log_file_option
@click.option("-v", "--verbose", count=True, help="Readable logs on stderr.")
def chat(models: str | None, device: str, dtype: str, trust_remote_code: bool, placement: str | None,
         max_new_tokens: int, system: str | None, stop: tuple[str, ...], log_file: str | None, verbose: int,
         backend: str, ray_address: str | None, call_deadline: float, quantize: str | None, split: str, **kw: Any) -> None:
    """Talk to a chain of models in the terminal: multi-turn, replies stream, /help lists the commands."""
    from .apps.chat import chat_command

    configure_logging(verbose, log_file, console_ok=True)
    names = parse_models(models)
    check_quantize(quantize, len(names))
    options = generation_options(kw)
    options.update(max_new_tokens=max_new_tokens, stop=stop)
    devices, chosen = resolve_chain(len(names), device, placement, backend, ray_address, call_deadline)
    sys.exit(chat_command(names, options, device=devices, dtype=dtype, trust_remote_code=trust_remote_code,
                          system=system, backend=chosen, quantize=quantize, split=split, reprobe=kw["reprobe"]))


# -- pipespec bench ----------------------------------------------------------------------------------------------

@main.command()
@model_options
@click.option("--prompts", default="text", show_default=True, metavar="NAME|FILE",
              help="A prompt set (text, code, humaneval) or a .txt / .jsonl file.")
@click.option("--n", "n", type=int, default=5, show_default=True, help="How many prompts (the first N).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--methods", default="hf,hf_assisted,ar,sd,pipe,auto", show_default=True, metavar="LIST",
              help="Comma-separated: hf, hf_assisted, ar, sd, pipe, auto (pipespec's mode auto: probes the three "
                   "modes while warming up, then runs the fastest).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Untimed runs of each method on the first prompt.")
@click.option("--lookahead", type=int, default=None,
              help="Tokens per round in sd mode. Default: 8, which the auto method may tune (4, 8 or 16).")
@click.option("--verify-cap", type=int, default=64, show_default=True,
              help="Most proposed tokens a stage checks in one forward pass.")
@placement_option
@quantize_option
@split_option
@backend_options
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="pipe: adapt verify caps and run-ahead, and bypass stages that slow the chain; "
                   "--no-adaptive runs the whole chain with --verify-cap fixed.")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Timed passes over the prompts; ms/token is the median pass (min and max reported).")
@click.option("--hf-isolation", type=click.Choice(["auto", "thread", "process"]), default="auto", show_default=True,
              help="Where the HF baselines run: on a thread of this process with the pipeline's model objects, or "
                   "each in a child process of its own that loads the models itself; auto: a child process on CUDA "
                   "(HF's compiled generate beside our graphs in one process faulted there), a thread elsewhere.")
@click.option("--hf-compile-mode", type=click.Choice(["reduce-overhead", "default", "max-autotune-no-cudagraphs"]),
              default="reduce-overhead", show_default=True,
              help="torch.compile mode of HF's static-cache generate on CUDA (reduce-overhead uses CUDA graphs).")
@click.option("--out", default="bench-out", show_default=True, metavar="DIR",
              help="Where bench.json, bench.md and bench.png go (not with --json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table; write no files.")
@trace_option
@log_file_option
@click.option("-v", "--verbose", count=True, help="Readable logs on stderr.")
def bench(models: str | None, device: str, dtype: str, trust_remote_code: bool, prompts: str, n: int,
          max_new_tokens: int, methods: str, warmup: int, lookahead: int | None, verify_cap: int, placement: str | None,
          adaptive: bool, repeats: int, hf_isolation: str, hf_compile_mode: str, out: str, as_json: bool,
          trace: str | None, log_file: str | None, verbose: int, backend: str, ray_address: str | None,
          call_deadline: float, quantize: str | None, split: str) -> None:
    """Time HF generate, HF assisted generation and pipespec's ar / sd / pipe on the same prompts."""
    from .apps.bench.run import BenchSettings, eprint, run_bench

    configure_logging(verbose, log_file, console_ok=True)
    chosen = tuple(dict.fromkeys(m.strip() for m in methods.split(",")))  # in order, each once
    names = tuple(parse_models(models))
    check_quantize(quantize, len(names))
    found, where = resolve_chain(len(names), device, placement, backend, ray_address, call_deadline)
    devices = tuple(found)  # by default one stage per GPU, as `run`
    settings = BenchSettings(models=names, prompts=prompts, n=n, max_new_tokens=max_new_tokens,
                             device=device, devices=devices, dtype=dtype, methods=chosen,
                             warmup=warmup, lookahead=lookahead, verify_cap=verify_cap, adaptive=adaptive,
                             trust_remote_code=trust_remote_code, repeats=repeats, hf_isolation=hf_isolation,
                             hf_compile_mode=hf_compile_mode, trace=trace, backend=where, quantize=quantize,
                          split=split)
    try:
        settings.validate()
    except ConfigError as exc:
        fail(str(exc))
    report = run_async(lambda: run_bench(settings, progress=None if as_json else eprint))
    failed = any("error" in m for m in report["methods"].values())
    if as_json:
        click.echo(json.dumps(report))
        sys.exit(EXIT_FAILURE if failed else EXIT_OK)
    from rich.console import Console

    from .apps.bench.report import rich_table, write_outputs

    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(report))
    try:
        written = write_outputs(report, Path(out))
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror}", EXIT_FAILURE)
    for line in written:
        eprint(line)
    sys.exit(EXIT_FAILURE if failed else EXIT_OK)


# -- simulate and plan: the orchestrator on simulated models, and a measured plan for a real chain --------------

def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} {text!r}: expected numbers separated by commas")


@main.command(name="simulate")
@click.option("--latencies-ms", default="0.5,5,20", show_default=True, metavar="L0,L1,...",
              help="Milliseconds per forward pass of each simulated model, smallest first.")
@click.option("--acceptance", default="0.8,0.8", show_default=True, metavar="A0,A1,...",
              help="Per-token acceptance between neighbours (one value fewer than models).")
@click.option("--acceptance-trace", default=None, metavar="FILE",
              help="JSON: one list of 0/1 per neighbouring pair (recorded acceptances), instead of --acceptance.")
@click.option("--tokens", "-n", type=int, default=400, show_default=True, help="Tokens per generation.")
@click.option("--mode", type=click.Choice(MODES), default="pipe", show_default=True)
@click.option("--verify-cap", type=int, default=64, show_default=True)
@click.option("--lookahead", type=int, default=8, show_default=True)
@click.option("--max-ahead", type=int, default=None, help="Default: max(--verify-cap, --lookahead).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True, help="Generations (one prompt each).")
@click.option("--verify-cost-ms", type=float, default=0.0, show_default=True,
              help="Extra milliseconds per token a forward feeds past the first.")
@click.option("--draft-batch", type=int, default=0, show_default=True,
              help="Drafts per call into the draft model; 0: adaptive (more per call while its successor is busy).")
@click.option("--compare", is_flag=True, help="Also run the other modes on the same chain.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate_cmd(latencies_ms: str, acceptance: str, acceptance_trace: str | None, tokens: int, mode: str,
                 verify_cap: int, lookahead: int, max_ahead: int | None, seed: int, repeats: int,
                 verify_cost_ms: float, draft_batch: int, compare: bool, as_json: bool) -> None:
    """Run the real orchestrator on simulated models (sleeps, a seeded acceptance oracle); compare it with the
    analytical model and the discrete-event simulation. See docs/analysis.md."""
    from .apps.simulate import print_report, run_on_clock, simulate_report

    configure_logging(0, None, console_ok=False)
    lat = _floats(latencies_ms, "--latencies-ms")
    acc: list[Any]
    if acceptance_trace is not None:
        try:
            acc = json.loads(Path(acceptance_trace).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            fail(f"cannot read acceptance trace {acceptance_trace}: {exc}")
        if not isinstance(acc, list) or not all(isinstance(t, list) for t in acc):
            fail(f"{acceptance_trace}: expected a JSON list of 0/1 lists, one per neighbouring pair")
    else:
        acc = _floats(acceptance, "--acceptance")
    for name, value in (("--tokens", tokens), ("--verify-cap", verify_cap), ("--lookahead", lookahead),
                        ("--repeats", repeats)):
        if value < 1:
            fail(f"{name} must be >= 1, got {value}")
    if draft_batch < 0:
        fail(f"--draft-batch must be >= 0 (0: adaptive), got {draft_batch}")
    if max_ahead is not None and max_ahead < 1:
        fail(f"--max-ahead must be >= 1, got {max_ahead}")
    if verify_cost_ms < 0:
        fail(f"--verify-cost-ms must be >= 0, got {verify_cost_ms}")
    options = dict(tokens=tokens, verify_cap=verify_cap, lookahead=lookahead, max_ahead=max_ahead, seed=seed,
                   repeats=repeats, verify_cost_per_token_ms=verify_cost_ms, draft_batch=draft_batch)
    modes = [mode] + ([m for m in MODES if m != mode] if compare else [])
    reports = []
    for m in modes:
        try:
            reports.append(run_on_clock(lambda clock, m=m: simulate_report(clock, lat, acc, mode=m, **options)))
        except (ConfigError, ValueError) as exc:
            fail(str(exc))
        except PipespecError as exc:
            fail(str(exc), EXIT_FAILURE)
    report = reports[0]
    if compare:
        report["compare"] = {r["mode"]: {k: r[k] for k in ("measured_tokens_per_s", "predicted_tokens_per_s",
                                                             "simulated_tokens_per_s")} for r in reports[1:]}
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)


@main.command(name="plan")
@model_options
@click.option("--prompts", default="code", show_default=True,
              help="A prompt set (code, text, humaneval) or a .txt/.jsonl file.")
@click.option("--num-prompts", type=int, default=3, show_default=True, help="How many of its prompts to use.")
@click.option("--tokens", type=int, default=48, show_default=True,
              help="Target tokens per prompt for the agreement measurement (and per generation with --run).")
@click.option("--run", "do_run", is_flag=True, help="Also generate with the recommended configuration.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@placement_option
@split_option
@backend_options
def plan_cmd(models: str | None, device: str, dtype: str, trust_remote_code: bool, prompts: str, num_prompts: int,
             tokens: int, do_run: bool, as_json: bool, backend: str, ray_address: str | None,
             call_deadline: float, placement: str | None, split: str) -> None:
    """Measure a chain on this device, predict every sub-chain and verify cap, and recommend one."""
    from .apps.plan import plan, print_tables
    from .prompts import load_prompts

    configure_logging(0, None, console_ok=False)
    names = parse_models(models)
    if backend != "thread":  # plan times each model's forward passes on the worker objects themselves
        fail(f"plan measures the models in this process: --backend {backend} is not supported (use thread)")
    if num_prompts < 1 or tokens < 1:
        fail(f"--num-prompts and --tokens must be >= 1, got {num_prompts} and {tokens}")
    # without --placement every model on --device, as plan always measured (run spreads the stages over GPUs)
    devices = resolve_chain(len(names), device, placement, backend, ray_address, call_deadline)[0] if placement \
        else device
    try:
        texts = load_prompts(prompts)[:num_prompts]
    except ValueError as exc:
        fail(str(exc))

    def progress(message: str) -> None:
        if not as_json:
            click.echo(f"pipespec plan: {message}", err=True)

    async def main_() -> dict[str, Any]:
        from .scheduler import Pipeline

        progress(f"loading {','.join(names)}")
        async with Pipeline.load(names, device=devices, dtype=dtype, trust_remote_code=trust_remote_code,
                                 split=split) as pipe:
            result = await plan(pipe, texts, tokens=tokens, run=do_run, on_progress=progress)
        return result.to_dict()

    result = run_async(main_)
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
