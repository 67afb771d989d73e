"""A ``pipespec bench`` report: the JSON-ready dict built from the timed methods, and its presentations (a Rich
table, a Markdown table, a bar chart, the files written to ``--out``). No models run here and nothing is timed."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ...scheduler import Pipeline

__all__ = ["METHODS", "BASELINES", "build_report", "cut_at_eos", "rows", "notes", "rich_table", "markdown",
           "write_chart", "write_outputs"]

METHODS = ("hf", "hf_assisted", "ar", "sd", "pipe", "auto")  # auto: pipespec's mode "auto" (probes, then the fastest)
BASELINES = ("hf", "hf_assisted", "ar")

Ids = tuple[int, ...]


def cut_at_eos(ids: Sequence[int], eos: set[int]) -> Ids:
    """The ids up to and including the first EOS: what every method must agree on."""
    for i, t in enumerate(ids):
        if t in eos:
            return tuple(ids[:i + 1])
    return tuple(ids)


# -- the report as data ------------------------------------------------------------------------------------------


def build_report(s: Any, pipe: Pipeline, prompts: Sequence[Ids],
                 outcome: dict[str, list[Any] | str], extra: dict[str, Any]) -> dict[str, Any]:
    """The report as one JSON-ready dict, from the run's ``BenchSettings`` (``s``) and its ``Contender``s (this
    module reads their fields and never imports ``run``, so the two modules depend one way).
    ``outcome`` maps each method to its contenders (``hf`` on CUDA has two:
    ``hf`` and ``hf_eager``), or to why it did not run; ``extra`` holds what the run learnt on the way."""
    import transformers

    eos = pipe.eos_ids()
    ran = {c.name: c for made in outcome.values() if not isinstance(made, str) for c in made if c.error is None}
    reference_name = next((m for m in ("ar", "hf", *ran) if m in ran), None)
    reference = [cut_at_eos(o, eos) for o in ran[reference_name].timing.outputs] if reference_name else []

    def entry(c: Any) -> dict[str, Any]:
        t = c.timing
        if c.error is not None:
            return {"error": c.error, "identical": None}
        return {
            "ms_per_token": round(t.ms_per_token, 3), "tokens_per_second": round(t.tokens_per_second, 2),
            # one value per timed pass over the prompts; ms_per_token is their median
            "passes_ms_per_token": [round(v, 3) for v in t.pass_ms_per_token],
            "ms_per_token_min": round(min(t.pass_ms_per_token, default=float("nan")), 3),
            "ms_per_token_max": round(max(t.pass_ms_per_token, default=float("nan")), 3),
            "unstable": t.unstable,  # (pass, prompt) whose ids differed from the first pass: must stay empty
            "tokens": t.tokens, "seconds": round(t.total_seconds, 4),
            "per_prompt": [{"tokens": len(o), "seconds": round(sec, 4)} for o, sec in zip(t.outputs, t.seconds)],
            "identical": [cut_at_eos(o, eos) for o in t.outputs] == reference,
            "differences": _differences([cut_at_eos(o, eos) for o in t.outputs], reference),
            "speedup": {f"vs_{b}": round(ran[b].timing.ms_per_token / t.ms_per_token, 3)
                        for b in BASELINES if b in ran and t.ms_per_token > 0},
            "stages": c.stages.result() if c.stages is not None else None,
            "gpu": t.gpu.result(),
        }

    methods: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for name, made in outcome.items():
        if isinstance(made, str):
            methods[name] = {"error" if made.startswith("failed") else "skipped": made, "identical": None}
            continue
        for c in made:
            (methods if c.name in METHODS else extras)[c.name] = entry(c)
    if "hf" in methods and "error" not in methods["hf"]:
        methods["hf"]["configuration"] = ("static cache, compiled" if "hf_eager" in extras
                                          else "dynamic cache, eager")
    if "hf_assisted" in methods and "hf_assisted" in extra:
        methods["hf_assisted"].update(extra["hf_assisted"])
    checked = [e for e in (*methods.values(), *extras.values()) if "skipped" not in e]
    return {
        "device": describe_devices([torch.device(m.device) for m in pipe.members]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "models": list(s.models),
        "placement": [m.device for m in pipe.members],
        "prompts": {"source": s.prompts, "count": len(prompts), "tokens": [len(p) for p in prompts]},
        "max_new_tokens": s.max_new_tokens,
        "dtype": pipe.target.info.dtype,
        "quantize": s.quantize,  # weight-only 8-bit (--quantize); outputs are then the quantized target's
        "settings": {"warmup": s.warmup, "lookahead": s.lookahead, "verify_cap": s.verify_cap,
                     "adaptive": s.adaptive, "repeats": s.repeats,
                     "hf_isolation": extra.get("hf_isolation", s.hf_isolation),
                     "hf_compile_mode": s.hf_compile_mode},
        "reference": reference_name,
        "outputs_identical": bool(ran) and all(e["identical"] is True and not e.get("unstable") for e in checked),
        "methods": methods,
        "extra": extras,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _differences(outputs: Sequence[Ids], reference: Sequence[Ids]) -> list[dict[str, int]]:
    """Where each prompt's output first departs from the reference's: early means a bug, late often a near-tie
    that reduced precision (bf16, compiled kernels) broke differently."""
    out = []
    for k, (got, want) in enumerate(zip(outputs, reference)):
        if got != want:
            position = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            out.append({"prompt": k, "position": position, "tokens": len(got)})
    return out


def describe_devices(devices: Sequence[torch.device]) -> str:
    names = []
    for d in sorted({str(d) for d in devices}):
        if d.startswith("cuda"):
            names.append(f"{d} ({torch.cuda.get_device_name(torch.device(d))})")
        else:
            names.append(f"cpu ({_cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch "
                         "threads)")
    return "; ".join(names)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """``PIPESPEC_COMMIT`` when set (whoever copied the tree to another machine names what they copied: a copy's
    .git, if it has one, may be older than its files); else the checkout's HEAD; None otherwise."""
    named = os.environ.get("PIPESPEC_COMMIT") or None
    if named:
        return named
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return named
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else named


# -- presentations -----------------------------------------------------------------------------------------------

HEADERS = ("method", "ms/token", "tokens/s", *(f"x {b}" for b in BASELINES), "identical", "acceptance",
           "accepted/verify", "GPU util %", "GPU W", "ms/token min-max")


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _per_stage(stages: list[dict[str, Any]] | None, key: str, digits: int) -> str:
    """One value per verifying stage (stage 1 .. target), e.g. '0.71 / 0.88'."""
    if not stages:
        return "-"
    return " / ".join(_num(st.get(key), digits) for st in stages[1:]) or "-"


def rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, m in report["methods"].items():
        if "ms_per_token" not in m:
            out.append([name, m.get("error") or m.get("skipped") or "-", *["-"] * (len(HEADERS) - 2)])
            continue
        gpu = m.get("gpu") or {}
        speed = m.get("speedup", {})
        out.append([name, _num(m["ms_per_token"]), _num(m["tokens_per_second"], 1),
                    *(_num(speed.get(f"vs_{b}")) for b in BASELINES),
                    "yes" if m["identical"] else "NO", _per_stage(m.get("stages"), "acceptance", 2),
                    _per_stage(m.get("stages"), "accepted_per_verification", 2),
                    _num(gpu.get("util_percent"), 0), _num(gpu.get("power_watts"), 0),
                    f"{_num(m.get('ms_per_token_min'))}-{_num(m.get('ms_per_token_max'))}"
                    if m.get("ms_per_token_min") is not None else "-"])
    return out


def notes(report: dict[str, Any]) -> list[str]:
    out = [f"device: {report['device']}; models: {', '.join(report['models'])}; prompts: "
           f"{report['prompts']['source']} x {report['prompts']['count']}; max_new_tokens: {report['max_new_tokens']}"
           f"; dtype: {report['dtype']}" + (f"; quantize: {report['quantize']}" if report.get("quantize") else ""),
           f"outputs identical across methods: {'yes' if report['outputs_identical'] else 'NO'} "
           f"(reference: {report['reference']})"]
    short = [n for n, m in report["methods"].items()
             if m.get("tokens") is not None and m["tokens"] < report["max_new_tokens"] * report["prompts"]["count"] / 4]
    if short:
        out.append(f"warning: {', '.join(short)} generated under a quarter of max_new_tokens on average (early EOS): "
                   "the timings are mostly prefill")
    for name, m in {**report["methods"], **report.get("extra", {})}.items():
        if m.get("differences"):
            where = ", ".join(f"prompt {d['prompt']} at token {d['position']}" for d in m["differences"])
            out.append(f"{name} differs from {report['reference']}: {where}")
    for name, m in {**report["methods"], **report.get("extra", {})}.items():
        if m.get("unstable"):
            out.append(f"{name}: a repeated pass gave other ids (pass, prompt): "
                       + ", ".join(f"({u['pass']}, {u['prompt']})" for u in m["unstable"]))
    settings = report.get("settings", {})
    if settings.get("repeats", 1) > 1:
        out.append(f"ms/token: the median of {settings['repeats']} timed passes over the prompts (min-max beside it)")
    hf = report["methods"].get("hf", {})
    if "configuration" in hf:
        out.append(f"hf: {hf['configuration']}; HF ran in a separate "
                   f"{'process' if settings.get('hf_isolation') == 'process' else 'thread'}"
                   + (f"; torch.compile mode {settings['hf_compile_mode']}"
                      if settings.get("hf_compile_mode", "reduce-overhead") != "reduce-overhead" else ""))
    eager = report.get("extra", {}).get("hf_eager")
    if eager:
        out.append(f"hf_eager (dynamic cache, not compiled): {eager['ms_per_token']:.2f} ms/token, "
                   f"{eager['tokens_per_second']:.1f} tokens/s")
    assisted = report["methods"].get("hf_assisted", {})
    if "assistant" in assisted:
        trials = ", ".join(f"{k} {v:.2f}" for k, v in assisted["trials_ms_per_token"].items())
        out.append(f"hf_assisted: draft {assisted['assistant']} (first prompt, ms/token: {trials})")
    out.append("acceptance and accepted/verify: per verifying stage, stage 1 first, the target last")
    return out


def rich_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="pipespec bench", caption="\n".join(notes(report)), caption_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows(report):
        table.add_row(*row, style=None if row[len(BASELINES) + 3] != "NO" else "red")
    return table


def markdown(report: dict[str, Any]) -> str:
    lines = ["# pipespec bench", "", f"{report['date']}, commit `{report['commit'] or 'unknown'}`, "
             f"torch {report['torch']}, transformers {report['transformers']}", "",
             "| " + " | ".join(HEADERS) + " |", "|---" + "|---:" * (len(HEADERS) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    lines += [""] + [f"- {n}" for n in notes(report)]
    return "\n".join(lines) + "\n"


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """A bar chart of tokens/s per method; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n, m in report["methods"].items() if "tokens_per_second" in m]
    values = [report["methods"][n]["tokens_per_second"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, values, color=["#888888" if n.startswith("hf") else "#3a7bd5" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(f"{', '.join(report['models'])}\n{report['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(report: dict[str, Any], out: Path) -> list[str]:
    """Write bench.json, bench.md and (with matplotlib) bench.png; return one line per file or note."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown(report), encoding="utf-8")
    written = [str(out / "bench.json"), str(out / "bench.md")]
    if write_chart(report, out / "bench.png"):
        written.append(str(out / "bench.png"))
    else:
        written.append("bench.png skipped: matplotlib is not installed (pip install 'pipespec[plot]')")
    return written
