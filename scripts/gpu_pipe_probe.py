"""One GPU run that says whether the pipeline beats lock step, and which lever does it (issue 14).

    python scripts/gpu_pipe_probe.py OUT_DIR            # on an H200 (1 or 2 GPUs), <= ~8 minutes
    python scripts/gpu_pipe_probe.py OUT_DIR --smoke    # tiny shapes on the CPU: the same code, in ~1 minute

SYNTHETIC ACCEPTANCE: random-weight LLaMA models of real shapes (``workers.synthetic``: every forward costs what a
real one does, bf16, batch 1, static KV cache and CUDA graphs) with token choices from a seeded oracle at rate
alpha per neighbouring pair. Chains: {68m,7b} and {68m,7b,13b} on GPU 0; {68m,7b on GPU 0; 13b on GPU 1} when a
second GPU exists; alpha 0.7 and 0.9.

Protocol, per chain and alpha, all in one process on the same machine:
- warm: every graph bucket (tokens 1..64, contexts up to the longest sequence) and every multi-token draft graph
  (``StaticWorker.warm_up(draft_steps=...)``) is captured before any clock starts, and each method runs one
  untimed generation first;
- methods: ``ar``; ``sd`` at lookahead 2/4/8/16; ``pipe`` default (adaptive runtime, adaptive draft batching,
  multi-token drafts on the device); ``pipe`` with each lever off or fixed (``draft_batch=1``: one token per call,
  the old default; ``no_device_draft``: batches but one forward and host sync per drafted token; ``draft_batch=8``;
  ``static``: ``adaptive=False``); ``auto`` (probes once, then runs its choice; the choice is reported);
- 3 timed repeats each (round-robin over methods, so drift hits all alike): median, min, max tokens/s;
- every method's tokens must equal ``ar``'s (greedy; lossless) - reported per row;
- per stage, in-pipeline ms per forward (busy / forwards) next to its standalone forward (1 and 8 tokens);
- one trace (``trace=``) of a default ``pipe`` run per chain at the highest alpha: open it in ui.perfetto.dev.

Writes OUT_DIR/probe.json, OUT_DIR/probe.md and OUT_DIR/trace-*.json. A time budget (``--budget-s``, default 450)
skips what would run past it, and says so in both files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipespec.analysis.model import predict_throughput
from pipespec.analysis.oracle import Oracle
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline
from pipespec.tracing import summarize
from pipespec.workers import synthetic
from pipespec.workers.synthetic import SyntheticWorker, random_llama

SMOKE_SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab: tiny, for the CPU smoke test
    "tiny-d": (64, 1, 4, 4, 128, 512),
    "tiny-m": (96, 2, 4, 4, 192, 512),
    "tiny-t": (128, 2, 4, 4, 256, 512),
}
LOOKAHEADS = (2, 4, 8, 16)
PIPE_VARIANTS: dict[str, dict[str, Any]] = {  # name -> generate options (+ "device_draft" for the draft worker)
    "pipe": {},
    "pipe:draft_batch=1": {"draft_batch": 1},
    "pipe:no_device_draft": {"device_draft": False},
    "pipe:draft_batch=8": {"draft_batch": 8},
    "pipe:static": {"adaptive": False},
}


def chains_for(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str]]]]:
    if args.smoke:
        d, m, t = "tiny-d", "tiny-m", "tiny-t"
        return [("2 stages, cpu", [(d, "cpu"), (t, "cpu")]), ("3 stages, cpu", [(d, "cpu"), (m, "cpu"), (t, "cpu")])]
    out = [("68m,7b on GPU 0", [("68m", "cuda:0"), ("7b", "cuda:0")]),
           ("68m,7b,13b on GPU 0", [("68m", "cuda:0"), ("7b", "cuda:0"), ("13b", "cuda:0")])]
    if torch.cuda.device_count() >= 2:
        out.append(("68m,7b on GPU 0; 13b on GPU 1", [("68m", "cuda:0"), ("7b", "cuda:0"), ("13b", "cuda:1")]))
    return out


class Loaded:
    """Every (shape, device) loaded once, with its runner and worker; chains share them."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        self.members: dict[tuple[str, str], Member] = {}

    async def get(self, shape: str, device: str, stage: int) -> Member:
        key = (shape, device)
        if key not in self.members:
            runner = ThreadRunner(f"{shape}@{device}", torch.device(device))
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
            model = await runner.run(random_llama, shape, [device], dtype)
            info = await runner.start(lambda: SyntheticWorker(model, shape, torch.device(device), self.oracle,
                                                              stage, capacity=1024))
            self.members[key] = Member(shape, runner, info)
            print(f"loaded {shape} on {device}", flush=True)
        member = self.members[key]
        member.worker.stage = stage  # type: ignore[attr-defined]  # its index in the chain being measured
        return member

    def close(self) -> None:
        for m in self.members.values():
            m.runner.close()  # type: ignore[attr-defined]


def standalone_ms(worker: SyntheticWorker, prompt: list[int]) -> tuple[float, float]:
    """Median ms of one forward feeding 1 and 8 tokens (graphs captured first), on the worker's thread."""
    out = []
    for n in (1, 8):
        times = []
        for _ in range(12):
            worker.reset(None, 1024)
            worker.prefill(prompt)
            seq = prompt + [7] * n
            t0 = time.perf_counter()
            worker.logits(seq, len(prompt))[-1, :1].tolist()
            times.append(time.perf_counter() - t0)
        out.append(1000 * statistics.median(times[2:]))
    worker.release()
    return out[0], out[1]


async def measure_chain(label: str, members: list[Member], prompt: list[int], args: argparse.Namespace,
                        deadline: float, out_dir: Path) -> dict[str, Any]:
    pipe = Pipeline(members, tokenizer=None)  # shares the loaded runners; not closed here
    for i, m in enumerate(members):
        m.worker.stage = i  # type: ignore[attr-defined]
    stand = [await m.runner.run(standalone_ms, m.worker, prompt) for m in members]  # type: ignore[attr-defined]
    result: dict[str, Any] = {"chain": label, "models": [m.name for m in members],
                              "devices": [m.device for m in members],
                              "standalone_ms": [[round(a, 3), round(b, 3)] for a, b in stand], "alphas": []}
    methods: dict[str, dict[str, Any]] = {"ar": {"mode": "ar"}}
    methods.update({f"sd:{k}": {"mode": "sd", "lookahead": k} for k in LOOKAHEADS})
    methods.update({name: {"mode": "pipe", **opts} for name, opts in PIPE_VARIANTS.items()})
    methods["auto"] = {"mode": "auto"}
    for alpha in args.alphas:
        if time.monotonic() > deadline:
            result["alphas"].append({"alpha": alpha, "skipped": "time budget"})
            continue
        oracle = Oracle([alpha] * (len(members) - 1), seed=args.seed, vocab=members[0].info.vocab_size)
        for m in members:
            m.worker.oracle = oracle  # type: ignore[attr-defined]
        pipe.auto_choice = None
        pipe.monitor = type(pipe.monitor)(len(members), contended=pipe.monitor.contended)  # forget the last alpha
        rates: dict[str, list[float]] = {name: [] for name in methods}
        outputs: dict[str, tuple[int, ...]] = {}
        stage_ms: dict[str, list[float | None]] = {}
        auto_choice = None

        async def once(name: str, timed: bool) -> None:
            opts = dict(methods[name])
            device_draft = opts.pop("device_draft", True)
            members[0].worker.device_draft = device_draft  # type: ignore[attr-defined]
            for m in members[1:]:
                m.worker.device_draft = True  # type: ignore[attr-defined]
            for m in members:
                await m.runner.drain()
            g = await pipe.generate(prompt, max_new_tokens=args.tokens if timed else 16, **opts)
            if timed:
                rates[name].append(g.stats.tokens / g.stats.seconds)
                outputs.setdefault(name, g.token_ids)
                stage_ms[name] = [round(1000 * s["busy_seconds"] / s["forwards"], 3) if s["forwards"] else None
                                  for s in g.stats.stages]

        for name in methods:  # untimed warm-up generations (auto probes here)
            await once(name, timed=False)
        auto_choice = pipe.auto_choice
        skipped = False
        for _ in range(args.repeats):
            for name in methods:
                if time.monotonic() > deadline:
                    skipped = True
                    break
                await once(name, timed=True)
        want = outputs.get("ar")
        rows = []
        for name, r in rates.items():
            if not r:
                continue
            rows.append({"method": name, "median_tokens_per_s": round(statistics.median(r), 2),
                         "min": round(min(r), 2), "max": round(max(r), 2), "repeats": len(r),
                         "identical_to_ar": outputs.get(name) == want, "stage_ms_per_forward": stage_ms.get(name)})
        lat = [a for a, _ in stand]
        acc = [alpha] * (len(members) - 1)
        predicted = {"ar": 1000 / lat[-1],
                     "sd:4": predict_throughput([x / 1000 for x in lat], acc, "sd", lookahead=4),
                     "pipe": predict_throughput([(a + b) / 2000 for a, b in stand], acc, "pipe")}
        entry = {"alpha": alpha, "rows": rows, "auto_choice": list(auto_choice) if auto_choice else None,
                 "predicted_tokens_per_s": {k: round(v, 2) for k, v in predicted.items()},
                 "all_identical": all(r["identical_to_ar"] for r in rows)}
        if skipped:
            entry["skipped"] = "time budget: fewer repeats for some methods"
        if alpha == max(args.alphas):
            path = out_dir / f"trace-{len(result['alphas'])}-{label.replace(' ', '_').replace(';', '').replace(',', '-')}.json"
            members[0].worker.device_draft = True  # type: ignore[attr-defined]
            await pipe.generate(prompt, max_new_tokens=args.tokens, mode="pipe", trace=str(path))
            entry["trace"] = path.name
            entry["trace_summary"] = summarize(json.loads(path.read_text()))
        result["alphas"].append(entry)
        best = max(rows, key=lambda r: r["median_tokens_per_s"])
        print(f"{label} alpha {alpha}: best {best['method']} {best['median_tokens_per_s']} tok/s; "
              + ", ".join(f"{r['method']} {r['median_tokens_per_s']}" for r in rows), flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# gpu_pipe_probe ({report['label']})", "",
             f"device: {report['device']}; commit {report['commit']}; {report['tokens']} tokens, prompt "
             f"{report['prompt_len']}, {report['repeats']} repeats (median [min-max] tokens/s); wall "
             f"{report['wall_s']} s", ""]
    for chain in report["chains"]:
        lines.append(f"## {chain['chain']}")
        lines.append("standalone ms per forward (1 / 8 tokens): " + ", ".join(
            f"{m} {a}/{b}" for m, (a, b) in zip(chain["models"], chain["standalone_ms"])))
        for entry in chain["alphas"]:
            if "rows" not in entry:
                lines += ["", f"alpha {entry['alpha']}: {entry.get('skipped')}"]
                continue
            best_sd = max((r for r in entry["rows"] if r["method"].startswith("sd")),
                          key=lambda r: r["median_tokens_per_s"], default=None)
            lines += ["", f"### alpha {entry['alpha']} (predicted: {entry['predicted_tokens_per_s']}; auto chose "
                          f"{entry['auto_choice'][0] if entry['auto_choice'] else '-'}; outputs identical: "
                          f"{entry['all_identical']})", "",
                      "| method | tok/s median | min-max | x best sd | identical | in-pipeline ms/forward per stage |",
                      "|---|---:|---:|---:|---|---|"]
            for r in entry["rows"]:
                ratio = r["median_tokens_per_s"] / best_sd["median_tokens_per_s"] if best_sd else float("nan")
                lines.append(f"| {r['method']} | {r['median_tokens_per_s']} | {r['min']}-{r['max']} | {ratio:.2f} | "
                             f"{r['identical_to_ar']} | {r['stage_ms_per_forward']} |")
            if entry.get("trace"):
                lines.append(f"\ntrace of a default pipe run: {entry['trace']} (open in https://ui.perfetto.dev); "
                             "where the time went (count, total ms):")
                for track, spans in entry["trace_summary"].items():
                    lines.append(f"- {track}: " + ", ".join(f"{n} {r['count']}x {r['ms']:.1f} ms"
                                                            for n, r in spans.items()))
        lines.append("")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        synthetic.SHAPES.update(SMOKE_SHAPES)
        torch.set_num_threads(1)
    chains = chains_for(args)
    if args.chains:
        chains = [c for c in chains if any(part in c[0] for part in args.chains.split(","))]
    vocab = 512 if args.smoke else 32000
    loaded = Loaded(Oracle([0.8], seed=args.seed, vocab=vocab))
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    try:
        for _, spec in chains:  # load everything, then capture every graph before any clock starts
            for i, (shape, device) in enumerate(spec):
                await loaded.get(shape, device, i)
        context = -(-(args.prompt_len + args.tokens + 64 + 128) // 256) * 256
        drafters = {key for _, spec in chains for key in spec[:-1]}  # only these ever draft (pipe's stage 0, sd's)
        for key, m in loaded.members.items():
            worker = m.worker
            await m.runner.run(worker.warm_up, (1, 2, 4, 8, 16, 32, 64), context,  # type: ignore[attr-defined]
                               draft_steps=tuple(range(1, 16)) if key in drafters else ())
        print(f"warm: graphs captured ({sum(m.worker.captures for m in loaded.members.values())}) "  # type: ignore
              f"after {time.monotonic() - started:.0f} s", flush=True)
        results = []
        for label, spec in chains:
            members = [await loaded.get(shape, device, i) for i, (shape, device) in enumerate(spec)]
            if time.monotonic() > deadline:
                results.append({"chain": label, "models": [s for s, _ in spec], "standalone_ms": [],
                                "alphas": [{"alpha": a, "skipped": "time budget"} for a in args.alphas]})
                continue
            results.append(await measure_chain(label, members, prompt, args, deadline, out_dir))
    finally:
        loaded.close()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu"
    return {"label": "SYNTHETIC ACCEPTANCE" + (" (smoke: tiny shapes on the CPU)" if args.smoke else ""),
            "device": f"{device} x{torch.cuda.device_count() if not args.smoke else 0}", "commit": commit,
            "tokens": args.tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
            "alphas": args.alphas, "wall_s": round(time.monotonic() - started, 1), "chains": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for probe.json, probe.md and the traces")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test of the script)")
    parser.add_argument("--tokens", type=int, default=None, help="per timed generation (default 128; smoke 24)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 128; smoke 16")
    parser.add_argument("--alphas", default="0.7,0.9")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chains", default=None, help="only the chains whose label contains one of these "
                                                         "comma-separated strings (e.g. '13b on GPU 0')")
    a = parser.parse_args()
    a.alphas = [float(x) for x in a.alphas.split(",")]
    a.tokens = a.tokens or (24 if a.smoke else 128)
    a.prompt_len = a.prompt_len or (16 if a.smoke else 128)
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU test of this script")
    report = asyncio.run(main(a))
    out = Path(a.out)
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    (out / "probe.md").write_text(markdown(report))
    print(f"wrote {out / 'probe.json'} and {out / 'probe.md'}", flush=True)
