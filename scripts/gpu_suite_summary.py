#!/usr/bin/env python3
"""summary.md for one part of scripts/gpu_suite.sh, from what its steps left in the work folder.

    python scripts/gpu_suite_summary.py WORK/part1 part1

Reads steps.jsonl, env.json, missing.txt, diag/*.json, gpu-tests.xml, logs/*.log, latency.json, synthetic-*.json,
family-metrics.json and bench-*/bench.json -- whichever exist -- and writes summary.md beside them. Nothing here is
measured: it only arranges what the steps wrote, and says which steps failed, timed out or were skipped.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

CRASH_MARKERS = ("illegal memory access", "Fatal Python error", "Segmentation fault", "core dumped",
                 "device-side assert", "CUDA error", "AcceleratorError")


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_text(run: Path, step: str) -> str:
    try:
        return (run / "logs" / f"{step}.log").read_text(errors="replace")
    except OSError:
        return ""


def crash_lines(text: str, limit: int = 3) -> list[str]:
    hits = [ln.strip()[:200] for ln in text.splitlines() if any(m in ln for m in CRASH_MARKERS)]
    return list(dict.fromkeys(hits))[:limit]


def steps_table(steps: list[dict[str, Any]]) -> list[str]:
    out = ["| step | status | exit | seconds | timeout |", "|---|---|---:|---:|---:|"]
    for s in steps:
        out.append(f"| {s['step']} | {s['status']} | {s['rc'] if s['rc'] is not None else '-'} | {s['seconds']} | "
                   f"{s['timeout']} |")
    return out


def diag_section(run: Path, steps: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name, st in steps.items():
        if not name.startswith("diag_"):
            continue
        variant = name.removeprefix("diag_")
        report = load(run / "diag" / f"{variant}.json")
        text = log_text(run, name)
        if report is None:
            verdict = "no report (process died or timed out)"
            methods = "-"
            identical = "-"
        else:
            errors = {m: v.get("error") for m, v in report["methods"].items() if v.get("error")}
            errors.update({m: v.get("error") for m, v in report.get("extra", {}).items() if v.get("error")})
            verdict = "errors: " + "; ".join(f"{m}: {e[:90]}" for m, e in errors.items()) if errors else "all ran"
            methods = ",".join(report["methods"])
            identical = "yes" if report.get("outputs_identical") else "no (random weights: near-ties expected)"
        crash = crash_lines(text)
        rows.append(f"| {variant} | {st['status']} (exit {st['rc']}) | {methods} | {verdict} | {identical} | "
                    f"{' / '.join(crash) or '-'} |")
    if not rows:
        return []
    out = ["## Crash diagnosis (issue 13)", "",
           "Each row is one `pipespec bench` process on random-weight models of the bench family's shapes (bf16, "
           "one GPU). `thread`: HF in the bench's process (the old behaviour); `process_default`: the HF baselines "
           "in child processes (the new default on CUDA).", "",
           "| variant | step | methods (order) | outcome | outputs identical | crash lines |",
           "|---|---|---|---|---|---|", *rows, ""]
    san = run / "logs" / "sanitizer-report.txt"
    if san.exists():
        text = san.read_text(errors="replace")
        errs = [ln for ln in text.splitlines() if re.search(r"Invalid|ERROR SUMMARY|at 0x|by thread|Address", ln)]
        out += ["compute-sanitizer memcheck (first lines of its report):", "", "```", *errs[:40], "```", ""]
    return out


def tests_section(run: Path, steps: dict[str, dict[str, Any]]) -> list[str]:
    if "gpu_tests" not in steps:
        return []
    out = ["## GPU tests (`pytest -m gpu tests/`, one process)", ""]
    try:
        root = ET.parse(run / "gpu-tests.xml").getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert suite is not None
        a = suite.attrib
        out.append(f"tests {a.get('tests')}, failures {a.get('failures')}, errors {a.get('errors')}, "
                   f"skipped {a.get('skipped')}, {a.get('time')} s")
        for case in suite.iter("testcase"):
            for kind in ("failure", "error", "skipped"):
                el = case.find(kind)
                if el is not None:
                    msg = (el.attrib.get("message") or "").splitlines()[0][:160] if el.attrib.get("message") else ""
                    out.append(f"- {kind}: {case.attrib.get('classname')}::{case.attrib.get('name')}: {msg}")
    except (OSError, ET.ParseError, AssertionError):
        text = log_text(run, "gpu_tests")
        out.append(f"no junit report (step {steps['gpu_tests']['status']}); log tail:")
        out += ["```", *text.strip().splitlines()[-12:], "```"]
    return out + [""]


def check_section(run: Path, steps: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name in ("gpu_check_1gpu", "gpu_check_2gpu"):
        if name in steps:
            lines = log_text(run, name).strip().splitlines()
            verdict = next((ln for ln in reversed(lines) if ln in ("ALL OK", "MISMATCH")), "no verdict")
            out.append(f"- {name}: {verdict} (step {steps[name]['status']})")
            out += [f"  - `{ln.strip()}`" for ln in lines if re.match(r"^(ar|sd|pipe) ", ln)][:6]
    return (["## Correctness check (scripts/gpu_check.py, built-in family)", "", *out, ""]) if out else []


def latency_section(run: Path) -> list[str]:
    data = load(run / "latency.json")
    if not data:
        return []
    rows = data["rows"]
    keys = [k for k in rows[0] if k.endswith("_ms")]
    out = [f"## Per-forward latency (scripts/gpu_latency.py; {data['device']}, copy bandwidth "
           f"{data['bandwidth_tb_s']:.2f} TB/s)", "", "| shape | " + " | ".join(keys) + " |",
           "|---" + "|---:" * len(keys) + "|"]
    for r in rows:
        out.append(f"| {r.get('shape', '?')} | " + " | ".join(str(r.get(k, "-")) for k in keys) + " |")
    return out + [""]


def synthetic_section(run: Path) -> list[str]:
    out = []
    for f in sorted(run.glob("synthetic-*.json")):
        data = load(f)
        if not data:
            continue
        out += [f"### {data['chain']} (SYNTHETIC ACCEPTANCE; {data.get('repeats', 1)} timed runs, median; "
                f"per-forward ms [1 token, 8 tokens]: {data['latencies_ms']})", "",
                "| alpha | mode | lookahead | ms/token | min-max | tokens/s | predicted tokens/s | identical |",
                "|---:|---|---:|---:|---|---:|---:|---|"]
        for r in data["rows"]:
            out.append(f"| {r['alpha']} | {r['mode']} | {r.get('lookahead') or '-'} | {r['ms_per_token']} | "
                       f"{r.get('ms_per_token_min', '-')}-{r.get('ms_per_token_max', '-')} | {r['tokens_per_s']} | "
                       f"{r['predicted_tokens_per_s']} | {r.get('outputs_identical')} |")
        out.append("")
    return (["## Synthetic-acceptance sweep (scripts/gpu_synthetic.py)", "", *out]) if out else []


def family_section(run: Path) -> list[str]:
    m = load(run / "family-metrics.json")
    if not m:
        return []
    out = ["## Bench family quality (scripts/gpu_train_bench_family.sh)", "",
           f"corpus: {m['corpus'].get('train_tokens', '?'):,} training tokens, "
           f"{m['corpus'].get('held_out_tokens', '?'):,} held-out tokens (held-out files never trained on); "
           f"training {m.get('train_seconds')} s of {m.get('total_seconds')} s; "
           f"target {m['training']['target']['steps']} steps / {m['training']['target']['tokens']:,} tokens, "
           f"students {m['training']['students']['steps']} steps", "",
           "| model | params | layers x hidden | held-out nll/token | perplexity | bits/byte |",
           "|---|---:|---|---:|---:|---:|"]
    for name, e in m["models"].items():
        out.append(f"| {name} | {e['params']:,} | {e.get('layers', '-')} x {e.get('hidden', '-')} | "
                   f"{e['nll_per_token']} | {e['perplexity']} | {e['bits_per_byte']} |")
    out += ["", "greedy agreement (teacher-forced, held out): "
            + ", ".join(f"{k} {v}" for k, v in m["greedy_agreement"].items())]
    spec = {k: v for k, v in m.get("speculative", {}).items() if k != "setup"}
    if spec:
        out.append("mean accepted of 8 greedy proposals: "
                   + ", ".join(f"{k} {v.get('mean_accepted')}" for k, v in spec.items()))
    held = m.get("held_out_sample")
    if held:
        out += ["", "target's greedy continuation of a held-out file (prompt's last 300 characters, then >>>):", "",
                "```python", held["prompt"][-300:] + ">>>" + held["target"], "```"]
    if m.get("samples"):
        out += ["", "`def fibonacci(n):` continued by the target:", "", "```python",
                "def fibonacci(n):" + m["samples"]["target"], "```"]
    return out + [""]


def bench_section(run: Path) -> list[str]:
    out = []
    for name in ("bench-1gpu", "bench-2gpu"):
        report = load(run / name / "bench.json")
        if report is None:
            continue
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from pipespec.apps.bench.report import markdown

            md = markdown(report).replace("# pipespec bench", f"### {name}: placement {report.get('placement')}", 1)
        except Exception as exc:  # noqa: BLE001 - the JSON is in the tarball either way
            md = f"### {name}\n(markdown failed: {exc})\n"
        out += [md, f"device: {report.get('device')}", ""]
    return (["## Five-method bench (`pipespec bench`, one process per placement)", "", *out]) if out else []


def reports_section(run: Path) -> list[str]:
    """The Markdown reports the lever scripts write into a folder of their own (forward/, quant/, tp/, probe*/)."""
    out: list[str] = []
    for md in sorted(run.glob("*/*.md")):
        if md.parent.name in ("logs", "diag"):
            continue
        out += [f"## {md.parent.name}/{md.name}", "", md.read_text().strip(), ""]
    return out


def main() -> int:
    run, part = Path(sys.argv[1]), sys.argv[2]
    steps_list = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines() if ln.strip()] \
        if (run / "steps.jsonl").exists() else []
    steps = {s["step"]: s for s in steps_list}
    env = load(run / "env.json") or {}
    missing = (run / "missing.txt").read_text().strip() if (run / "missing.txt").exists() else "?"
    lines = [f"# pipespec GPU suite, {part}", "",
             f"commit `{env.get('commit')}`; GPUs: {', '.join(env.get('gpus', [])) or 'none'}; {env.get('cpus')} CPUs; "
             f"python {env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}; "
             f"missing packages: {missing}", ""]
    bad = [s for s in steps_list if s["status"] != "ok"]
    lines += [f"steps: {len(steps_list)}, not ok: " + (", ".join(f"{s['step']} ({s['status']})" for s in bad) or "none"),
              ""]
    for section in (diag_section(run, steps), tests_section(run, steps), check_section(run, steps),
                    family_section(run), bench_section(run), latency_section(run), synthetic_section(run),
                    reports_section(run)):
        lines += section
    lines += ["## Steps", "", *steps_table(steps_list), ""]
    (run / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
