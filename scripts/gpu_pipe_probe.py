"""One GPU run that says whether the pipeline beats lock step, and which lever does it (issue 14).

    python scripts/gpu_pipe_probe.py OUT_DIR            # on an H200 (1 or 2 GPUs), <= ~8 minutes
    python scripts/gpu_pipe_probe.py OUT_DIR --smoke    # tiny shapes on the CPU: the same code, in ~1 minute
    # thread vs process (+ CUDA MPS) on ONE GPU, side by side, ~4-5 minutes (each backend stops starting new work
    # after half the budget; loading ~10-30 s and closing come on top; estimate from the 2-GPU run's generation
    # times: ~40 s per alpha for both chains and 6 methods x 4 generations, + ~40 s load and warm-up, per backend):
    python scripts/gpu_pipe_probe.py OUT_DIR --backends thread,process --one-gpu \
        --methods ar,sd:4,sd:8,sd:16,pipe,pipe:draft_batch=8 --budget-s 240
    # add process-nomps (worker processes without MPS) for the three-way comparison, with --alphas 0.9 to fit

SYNTHETIC ACCEPTANCE: random-weight LLaMA models of real shapes (``workers.synthetic``: every forward costs what a
real one does, bf16, batch 1, static KV cache and CUDA graphs) with token choices from a seeded oracle at rate
alpha per neighbouring pair. Chains: {68m,7b}, {1b,8b} and {68m,7b,13b} on GPU 0; {68m,7b on GPU 0; 13b on GPU 1} when a
second GPU exists, and {1b,8b} and {68m,7b} on GPU 0 with a 70b target split tensor-parallel over GPUs 0+1
(``build_synthetic_tp``: rank 0 on a runner thread of this process, or in its worker process with ``--backend
process``; a follower process on GPU 1, NCCL; ``--chains 70b`` runs just these two); alpha 0.7 and 0.9. ``--smoke`` adds a
CPU chain whose target is split over "cpu+cpu" (gloo).

Protocol, per chain and alpha, all in one process on the same machine:
- warm: every graph bucket (tokens 1..64, contexts up to the longest sequence) and every multi-token draft graph
  (``StaticWorker.warm_up(draft_sizes=...)``) is captured before any clock starts, and each method runs one
  untimed generation first;
- methods: ``ar``; ``sd`` at lookahead 2/4/8/16; ``pipe`` default (adaptive runtime, adaptive draft batching,
  multi-token drafts on the device); ``pipe`` with each lever off or fixed (``draft_batch=1``: one token per call,
  the old default; ``no_device_draft``: batches but one forward and host sync per drafted token; ``draft_batch=8``;
  ``static``: ``adaptive=False``); ``auto`` (probes once, then runs its choice; the choice is reported);
- 3 timed repeats each (round-robin over methods, so drift hits all alike): median, min, max tokens/s;
- every method's tokens must equal ``ar``'s (greedy; lossless) - reported per row;
- per stage, in-pipeline ms per forward (busy / forwards) next to its standalone forward (1 and 8 tokens), and its
  ratio to the standalone forward at the stage's own mean tokens per forward (interpolated between forwards of 1, 8,
  16 and 32 tokens: a verifier whose windows are 9-17 tokens long is not compared with an 8-token forward);
- one trace (``trace=``) of a default ``pipe`` run per chain at the highest alpha (``--trace-alphas``: at those):
  open it in ui.perfetto.dev.

Backends (issue 14: do stages that share ONE GPU run faster as separate processes under CUDA MPS?): ``--backend
thread`` (the default) puts every worker on a thread of this process; ``--backend process`` puts each in a
``ProcessRunner`` of its own, built there by ``workers.synthetic.build_synthetic``, after ``runners.mps.ensure_mps``
(started a daemon / one was running / only a hint: recorded in the report, with ``nvidia-smi``'s compute apps). The
probe talks to workers only through named calls (``configure``, ``warm_up``, ``standalone_ms``, ...), so both
backends run the same code. ``--backends thread,process`` runs this script once per backend, each in a fresh process
of its own with an equal share of the budget (so the GPU is empty and no CUDA context is left in between), in that
order, and writes their results side by side (OUT_DIR/probe.md) above each run's own sections.

Writes OUT_DIR/probe.json, OUT_DIR/probe.md and OUT_DIR/trace-*.json. A time budget (``--budget-s``, default 450)
skips what would run past it, and says so in both files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipespec.analysis.model import predict_throughput
from pipespec.analysis.oracle import Oracle
from pipespec.runners.backend import cpu_threads
from pipespec.runners.base import Runner
from pipespec.runners.mps import ensure_mps, shared_gpus
from pipespec.runners.process import ProcessRunner
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline, policy
from pipespec.tracing import gpu_gaps, summarize
from pipespec.placement import stage_devices
from pipespec.runners.tensor_parallel import build_synthetic_tp
from pipespec.workers.synthetic import build_synthetic, split_quantized

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
    # the adaptive runtime before the thirteenth session: every forward's time counted in full, no lock-step probes
    "pipe:unclipped": {"policy": {"OUTLIER": math.inf, "PROBE_EVERY": 1 << 30}},
}


def chains_for(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str]]]]:
    if args.smoke:
        d, m, t = "tiny-d", "tiny-m", "tiny-t"
        # first, the tensor-parallel path end to end (rank 0 on a runner thread, one follower process, gloo): on
        # shared CPU cores every all-reduce waits for the scheduler (~10 ms a forward), so it gets the budget first
        return [("tensor-parallel target: cpu; cpu+cpu", [(d, "cpu"), (t, "cpu+cpu")]),
                ("2 stages, cpu", [(d, "cpu"), (t, "cpu")]), ("3 stages, cpu", [(d, "cpu"), (m, "cpu"), (t, "cpu")]),
                ("int8 target, cpu", [(d, "cpu"), (f"{t}:int8", "cpu")])]
    out = [("68m,7b on GPU 0", [("68m", "cuda:0"), ("7b", "cuda:0")]),
           ("1b,8b on GPU 0", [("1b", "cuda:0"), ("8b", "cuda:0")]),
           ("68m,7b,13b on GPU 0", [("68m", "cuda:0"), ("7b", "cuda:0"), ("13b", "cuda:0")]),
           # a 70B on ONE H200 needs 8-bit weights (~70 GB); with its drafts beside it, every link in lock step
           ("1b,8b,70b int8 on GPU 0", [("1b", "cuda:0"), ("8b", "cuda:0"), ("70b:int8", "cuda:0")])]
    if torch.cuda.device_count() >= 2:
        out.append(("68m,7b on GPU 0; 13b on GPU 1", [("68m", "cuda:0"), ("7b", "cuda:0"), ("13b", "cuda:1")]))
        # issue 14's third row: the draft alone on GPU 0, the middle beside the target on GPU 1
        out.append(("68m on GPU 0; 7b,13b on GPU 1", [("68m", "cuda:0"), ("7b", "cuda:1"), ("13b", "cuda:1")]))
        # issues 14 and 16: a 70B target split tensor-parallel over both GPUs (NCCL; rank 0 shares GPU 0 with the
        # drafts); --chains 70b runs only these
        out.append(("1b,8b on GPU 0; 70b on GPUs 0+1", [("1b", "cuda:0"), ("8b", "cuda:0"), ("70b", "cuda:0+cuda:1")]))
        out.append(("68m,7b on GPU 0; 70b on GPUs 0+1", [("68m", "cuda:0"), ("7b", "cuda:0"),
                                                          ("70b", "cuda:0+cuda:1")]))
        # the other placement of a 70B target on two GPUs: its weights in 8 bits on GPU 1 alone (~70 GB), so the
        # drafts have GPU 0 to themselves and no stage shares a GPU with the target (the TP target's rank 0 shares
        # GPU 0 with them and both ranks wait for it at every all-reduce); "--chains 70b" runs these too
        out.append(("1b,8b on GPU 0; 70b int8 on GPU 1", [("1b", "cuda:0"), ("8b", "cuda:0"), ("70b:int8", "cuda:1")]))
        out.append(("68m,7b on GPU 0; 70b int8 on GPU 1", [("68m", "cuda:0"), ("7b", "cuda:0"),
                                                            ("70b:int8", "cuda:1")]))
    return out


def all_methods() -> dict[str, dict[str, Any]]:
    methods: dict[str, dict[str, Any]] = {"ar": {"mode": "ar"}}
    methods.update({f"sd:{k}": {"mode": "sd", "lookahead": k} for k in LOOKAHEADS})
    methods.update({name: {"mode": "pipe", **opts} for name, opts in PIPE_VARIANTS.items()})
    methods["auto"] = {"mode": "auto"}
    return methods


class Loaded:
    """Every (shape, device) loaded once, with its runner; chains share them. Workers are reached only through
    named calls (``runner.call``), so the same code measures the thread and the process backend.

    A key whose device joins several with ``+`` is a tensor-parallel stage (``build_synthetic_tp``): rank 0 on its
    runner's thread (thread backend) or in its worker process (process backend: that process starts the followers,
    under MPS where a daemon runs), on the first device, a follower process per further device. A key that fails to
    load fails only the chains that use it."""

    def __init__(self, oracle: Oracle, backend: str, smoke: bool) -> None:
        self.oracle = oracle
        self.backend = backend
        self.smoke = smoke
        self.members: dict[tuple[str, str], Member] = {}
        self.starting: dict[tuple[str, str], Runner] = {}
        self.failed: dict[tuple[str, str], str] = {}  # key -> why it did not load
        self.mps: dict[str, Any] = {"action": "none (thread backend)"}

    async def load(self, keys: list[tuple[str, str]]) -> None:
        """Start a runner per key and build its worker there (all at once in worker processes)."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.members and k not in self.failed]
        runners: list[Runner] = []
        if self.backend == "process":
            # before the children start: they inherit CUDA_MPS_PIPE_DIRECTORY when a daemon of ours was started
            # (and so do a tensor-parallel stage's followers, which its rank-0 process starts)
            every = [d for _, device in keys for d in stage_devices(device)]
            action = ensure_mps(every, "process")
            self.mps = {"action": action, "shared_gpus": shared_gpus(every),
                        "pipe_dir": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}
            threads = cpu_threads([torch.device(stage_devices(d)[0]) for _, d in keys])
            for shape, device in keys:  # a tensor-parallel stage's process is its rank 0, on its first device
                runners.append(ProcessRunner(f"{shape}@{device}", torch.device(stage_devices(device)[0]),
                                             label=f"{shape} on {device}", threads=threads))
        else:
            # a tensor-parallel key's runner lives on its first device (rank 0's)
            runners = [ThreadRunner(f"{shape}@{device}", torch.device(stage_devices(device)[0]))
                       for shape, device in keys]
        self.starting.update(zip(keys, runners))  # closed by close() whatever happens next

        async def start(key: tuple[str, str], runner: Runner) -> None:
            shape, device = key
            dims = SMOKE_SHAPES.get(split_quantized(shape)[0]) if self.smoke else None
            t0 = time.monotonic()
            try:
                if "+" in device:
                    info = await runner.start(build_synthetic_tp, shape, stage_devices(device), self.oracle, 0,
                                              dims=dims, capacity=1024)
                else:
                    info = await runner.start(build_synthetic, shape, device, self.oracle, 0, dims=dims,
                                              capacity=1024)
            except Exception as exc:  # noqa: BLE001 - recorded; the chains without this key still run
                self.failed[key] = f"loading {shape} on {device}: {type(exc).__name__}: {exc}"[:500]
                print(f"FAILED {self.failed[key]}", flush=True)
                return
            self.members[key] = Member(shape, runner, info)
            print(f"loaded {shape} on {device} ({self.backend}) in {time.monotonic() - t0:.0f} s", flush=True)

        if self.backend == "process":
            await asyncio.gather(*(start(k, r) for k, r in zip(keys, runners)))
        else:  # one at a time: in this process, loads would only contend for the GIL
            for k, r in zip(keys, runners):
                await start(k, r)

    async def get(self, shape: str, device: str, stage: int) -> Member:
        if (shape, device) in self.failed:
            raise RuntimeError(self.failed[(shape, device)])
        member = self.members[(shape, device)]
        await member.runner.call("configure", stage=stage)  # its index in the chain being measured
        return member

    def close(self) -> None:
        for runner in self.starting.values():
            runner.close()


def gpu_name() -> str:
    """GPU 0's name from nvidia-smi: torch.cuda.get_device_name would initialise CUDA in this process, which the
    process backend's parent must not (its workers own the GPU)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - a label only
        return "cuda"


def gpu_apps() -> str:
    """nvidia-smi's compute apps (under MPS: the server and its clients), or why not."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
                              capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).strip()[:2000]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f"{type(exc).__name__}: {exc}"


STANDALONE_SIZES = (1, 8, 16, 32)  # tokens of the standalone forwards timed per stage


def at_tokens(ms: Sequence[float], tokens: float) -> float:
    """A stage's standalone ms per forward at ``tokens`` tokens fed, interpolated linearly between its forwards timed
    at ``STANDALONE_SIZES`` (and held at the ends)."""
    sizes = STANDALONE_SIZES
    if tokens <= sizes[0]:
        return ms[0]
    for (a, ma), (b, mb) in zip(zip(sizes, ms), zip(sizes[1:], ms[1:])):
        if tokens <= b:
            return ma + (mb - ma) * (tokens - a) / (b - a)
    return ms[-1]


async def measure_chain(label: str, members: list[Member], prompt: list[int], args: argparse.Namespace,
                        deadline: float, out_dir: Path) -> dict[str, Any]:
    pipe = Pipeline(members, tokenizer=None)  # shares the loaded runners; not closed here
    for i, m in enumerate(members):
        await m.runner.call("configure", stage=i)
    # warm, one stage at a time (the others idle): what a stage's forward costs alone
    stand_by = [await m.runner.call("standalone_ms", prompt, STANDALONE_SIZES) for m in members]
    stand = [(row[0], row[1]) for row in stand_by]  # 1 and 8 tokens
    result: dict[str, Any] = {"chain": label, "models": [m.name for m in members],
                              "devices": [m.device for m in members],
                              "standalone_ms": [[round(a, 3), round(b, 3)] for a, b in stand], "alphas": [],
                              "standalone_ms_by_tokens": [[round(x, 3) for x in row] for row in stand_by],
                              "max_window": [m.info.max_window for m in members]}
    methods = {name: opts for name, opts in all_methods().items() if name in args.methods}
    for alpha in args.alphas:
        if time.monotonic() > deadline:
            result["alphas"].append({"alpha": alpha, "skipped": "time budget"})
            continue
        oracle = Oracle([alpha] * (len(members) - 1), seed=args.seed, vocab=members[0].info.vocab_size)
        for m in members:
            await m.runner.call("configure", oracle=oracle)
        pipe.auto_choice = None
        pipe.monitor = pipe.fresh_monitor()  # forget the last alpha (placement facts kept)
        rates: dict[str, list[float]] = {name: [] for name in methods}
        outputs: dict[str, tuple[int, ...]] = {}
        stage_ms: dict[str, list[float | None]] = {}
        stage_ratio: dict[str, list[float | None]] = {}
        auto_choice = None

        async def once(name: str, timed: bool) -> None:
            opts = dict(methods[name])
            device_draft = opts.pop("device_draft", True)
            constants = opts.pop("policy", {})  # the adaptive runtime's constants for this generation only
            for i, m in enumerate(members):
                await m.runner.call("configure", device_draft=device_draft if i == 0 else True)
            saved = {k: getattr(policy, k) for k in constants}
            try:
                for k, v in constants.items():
                    setattr(policy, k, v)
                g = await pipe.generate(prompt, max_new_tokens=args.tokens if timed else 16, **opts)
            finally:
                for k, v in saved.items():
                    setattr(policy, k, v)
            if timed:
                rates[name].append(g.stats.tokens / g.stats.seconds)
                outputs.setdefault(name, g.token_ids)
                stage_ms[name] = [round(1000 * s["busy_seconds"] / s["forwards"], 3) if s["forwards"] else None
                                  for s in g.stats.stages]
                stage_ratio[name] = [round(ms / at_tokens(row, (s["proposed"] + s["forwards"]) / s["forwards"]), 3)
                                     if ms is not None else None
                                     for ms, s, row in zip(stage_ms[name], g.stats.stages, stand_by)]

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
                         "identical_to_ar": outputs.get(name) == want, "stage_ms_per_forward": stage_ms.get(name),
                         "stage_x_standalone": stage_ratio.get(name)})
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
        if alpha in (args.trace_alphas or [max(args.alphas)]):
            await members[0].runner.call("configure", device_draft=True)
            stem = f"trace-{len(result['alphas'])}-{label.replace(' ', '_').replace(';', '').replace(',', '-')}"
            for name in args.trace_methods:
                if name not in all_methods() or name == "auto":
                    continue
                path = out_dir / (f"{stem}.json" if name == "pipe" else f"{stem}-{name.replace(':', '')}.json")
                await pipe.generate(prompt, max_new_tokens=args.tokens, trace=str(path), **all_methods()[name])
                doc = json.loads(path.read_text())
                if name == "pipe":  # the keys the earlier reports used
                    entry["trace"], entry["trace_summary"] = path.name, summarize(doc)
                entry.setdefault("traces", {})[name] = {"file": path.name, "gpu_gaps": gpu_gaps(doc)}
        result["alphas"].append(entry)
        best = max(rows, key=lambda r: r["median_tokens_per_s"])
        print(f"{label} alpha {alpha}: best {best['method']} {best['median_tokens_per_s']} tok/s; "
              + ", ".join(f"{r['method']} {r['median_tokens_per_s']} [{r['min']}-{r['max']}]" for r in rows)
              + f"; identical {entry['all_identical']}; auto {entry['auto_choice'][0] if auto_choice else '-'}; "
              + f"pipe stage ms {stage_ms.get('pipe')}; standalone {result['standalone_ms']}", flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# gpu_pipe_probe, {report['backend']} backend ({report['label']})", "",
             f"device: {report['device']}; commit {report['commit']}; GIL switch interval "
             f"{report.get('switch_interval_us')} us; {report['tokens']} tokens, prompt "
             f"{report['prompt_len']}, {report['repeats']} repeats (median [min-max] tokens/s); wall "
             f"{report['wall_s']} s", "",
             f"MPS: {report['mps']}; CUDA initialised in the probe's own process: {report['parent_cuda_initialized']}",
             f"errors: {report['errors'] or 'none'}", ""]
    if report.get("gpu_apps"):
        lines += ["nvidia-smi compute apps after warm-up:", "```", report["gpu_apps"], "```", ""]
    for chain in report["chains"]:
        lines.append(f"## {chain['chain']}")
        if chain.get("error"):
            lines += [f"FAILED: {chain['error']}", ""]
            continue
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
                      "| method | tok/s median | min-max | x best sd | identical | in-pipeline ms/forward per stage "
                      "| x standalone at its mean tokens per forward |",
                      "|---|---:|---:|---:|---|---|---|"]
            if entry["auto_choice"]:  # the probes' rates: why auto ran what it ran
                lines.append(f"auto's reason: {entry['auto_choice'][1]}\n")
            for r in entry["rows"]:
                ratio = r["median_tokens_per_s"] / best_sd["median_tokens_per_s"] if best_sd else float("nan")
                lines.append(f"| {r['method']} | {r['median_tokens_per_s']} | {r['min']}-{r['max']} | {ratio:.2f} | "
                             f"{r['identical_to_ar']} | {r['stage_ms_per_forward']} | {r.get('stage_x_standalone')} |")
            if entry.get("trace"):
                lines.append(f"\ntrace of a default pipe run: {entry['trace']} (open in https://ui.perfetto.dev); "
                             "where the time went (count, total ms):")
                for track, spans in entry["trace_summary"].items():
                    lines.append(f"- {track}: " + ", ".join(f"{n} {r['count']}x {r['ms']:.1f} ms"
                                                            for n, r in spans.items()))
            for name, traced in entry.get("traces", {}).items():
                gaps = traced["gpu_gaps"]
                if gaps:
                    lines.append(f"- GPU of {name} ({traced['file']}): busy {gaps['gpu_busy_ms']} of {gaps['wall_ms']} "
                                 f"ms ({100 * gaps['gpu_busy_fraction']:.1f} %); gaps: " + ", ".join(
                                     f"{k} {g['count']}x {g['ms']} ms (median {g['median_us']} us)"
                                     for k, g in gaps["gaps"].items()))
        lines.append("")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """One backend's run, in this process."""
    started = time.monotonic()
    deadline = started + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        torch.set_num_threads(1)
    chains = select_chains(args)
    vocab = 512 if args.smoke else 32000
    loaded = Loaded(Oracle([0.8], seed=args.seed, vocab=vocab), args.backend, args.smoke)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    apps = ""
    try:
        # load everything, then capture every graph before any clock starts
        await loaded.load([key for _, spec in chains for key in spec])
        context = -(-(args.prompt_len + args.tokens + 64 + 128) // 256) * 256
        drafters = {key for _, spec in chains for key in spec[:-1]}  # only these ever draft (pipe's stage 0, sd's)
        captures = 0
        for key, m in list(loaded.members.items()):
            try:
                captures += await m.runner.call("warm_up", (1, 2, 4, 8, 16, 32, 64), context,
                                                draft_sizes=tuple(range(1, 17)) if key in drafters else ())
            except Exception as exc:  # noqa: BLE001 - this key's chains fail, the others run
                loaded.failed[key] = f"warming {key[0]} on {key[1]}: {type(exc).__name__}: {exc}"[:500]
                print(f"FAILED {loaded.failed[key]}", flush=True)
        print(f"warm ({args.backend}): graphs captured ({captures}) after {time.monotonic() - started:.0f} s",
              flush=True)
        apps = gpu_apps() if not args.smoke else ""
        for label, spec in chains:
            if time.monotonic() > deadline:
                results.append({"chain": label, "models": [s for s, _ in spec], "standalone_ms": [],
                                "alphas": [{"alpha": a, "skipped": "time budget"} for a in args.alphas]})
                continue
            try:
                members = [await loaded.get(shape, device, i) for i, (shape, device) in enumerate(spec)]
                result = await measure_chain(label, members, prompt, args, deadline, out_dir)
                result["devices"] = [d for _, d in spec]  # a tensor-parallel stage's runner names only rank 0's
                results.append(result)
            except Exception as exc:  # noqa: BLE001 - recorded; the next chain still runs
                errors.append(f"{label}: {type(exc).__name__}: {exc}"[:500])
                results.append({"chain": label, "models": [s for s, _ in spec], "standalone_ms": [], "alphas": [],
                                "error": errors[-1]})
                print(f"FAILED {errors[-1]}", flush=True)
    except Exception as exc:  # noqa: BLE001 - loading or warming failed: the report says so
        errors.append(f"{type(exc).__name__}: {exc}"[:500])
        print(f"FAILED {errors[-1]}", flush=True)
    finally:
        loaded.close()
    # the process backend's point: CUDA untouched in this process (the workers own the GPU)
    cuda_here = torch.cuda.is_initialized()
    commit = code_commit()
    return {**header(args, commit), "backend": args.backend, "mps": loaded.mps, "gpu_apps": apps,
            "parent_cuda_initialized": cuda_here, "errors": errors,
            "wall_s": round(time.monotonic() - started, 1), "chains": results}


def code_commit() -> str:
    """The commit the report names: PIPESPEC_COMMIT when set (a GPU copy's .git can be stale, and an A/B run imports
    another tree's pipespec), else git's HEAD."""
    return os.environ.get("PIPESPEC_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def header(args: argparse.Namespace, commit: str) -> dict[str, Any]:
    device = "cpu" if args.smoke else f"{gpu_name()} x{torch.cuda.device_count()}"
    return {"label": "SYNTHETIC ACCEPTANCE" + (" (smoke: tiny shapes on the CPU)" if args.smoke else ""),
            "device": device, "commit": commit, "tokens": args.tokens, "prompt_len": args.prompt_len,
            "switch_interval_us": round(sys.getswitchinterval() * 1e6, 1),
            "repeats": args.repeats, "alphas": args.alphas, "methods": args.methods}


def select_chains(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str]]]]:
    chains = chains_for(args)
    if args.chains:
        chains = [c for c in chains if any(part in c[0] for part in args.chains.split(","))]
    if args.one_gpu:  # every stage on one device (a tensor-parallel stage's "cuda:0+cuda:1" is two)
        chains = [c for c in chains if len({d for _, d in c[1]}) == 1 and "+" not in c[1][0][1]]
    return chains


# -- several backends: one child run each, side by side --------------------------------------------------------------

def run_backends(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run this script once per backend (``--backend B``, a fresh process each: the GPU is empty in between and no
    CUDA context or MPS daemon outlives its run), each with an equal share of the budget; merge their reports."""
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    share = args.budget_s / len(args.backends)
    runs: list[dict[str, Any]] = []
    for backend in args.backends:
        sub = out / backend
        # process-nomps: worker processes without MPS (time-sliced kernels), the case MPS is measured against
        env = dict(os.environ, PIPESPEC_MPS="0") if backend == "process-nomps" else None
        cmd = [sys.executable, __file__, str(sub), *strip_backend_args(argv, args.out), "--backend",
               backend.removesuffix("-nomps"), "--budget-s", f"{share:g}"]
        print(f"== backend {backend}: {share:.0f} s of the budget", flush=True)
        try:
            # stop starting new work after the share; loading, warm-up and closing come on top of it
            done = subprocess.run(cmd, timeout=share + 150, check=False, env=env)
            report = json.loads((sub / "probe.json").read_text())
            if done.returncode:
                report.setdefault("errors", []).append(f"exit code {done.returncode}")
        except Exception as exc:  # noqa: BLE001 - one backend's failure is recorded, the next one runs
            report = {"backend": backend, "errors": [f"{type(exc).__name__}: {exc}"[:500]], "chains": []}
        report["dir"] = report["backend"] = backend
        runs.append(report)
    commit = code_commit()
    return {**header(args, commit), "backends": args.backends, "wall_s": round(time.monotonic() - started, 1),
            "runs": runs}


def strip_backend_args(argv: list[str], out_dir: str) -> list[str]:
    """``argv`` without the output folder and the options the parent sets per child."""
    kept, skip, seen_out = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--backends", "--backend", "--budget-s"):
            skip = True  # and its value
        elif arg.startswith(("--backends=", "--backend=", "--budget-s=")):
            pass
        elif arg == out_dir and not seen_out:
            seen_out = True
        else:
            kept.append(arg)
    return kept


def side_by_side(report: dict[str, Any]) -> str:
    """The runs' rows for the same chain, alpha and method next to each other."""
    runs = [r for r in report["runs"] if r.get("chains")]
    names = [r["backend"] for r in runs]
    lines = [f"# gpu_pipe_probe: backends {', '.join(report['backends'])} ({report['label']})", "",
             f"device: {report['device']}; commit {report['commit']}; {report['tokens']} tokens, prompt "
             f"{report['prompt_len']}, up to {report['repeats']} repeats (median [min-max] tokens/s); x sd: over the "
             f"best sd of the same run; wall {report['wall_s']} s", ""]
    for r in report["runs"]:
        lines.append(f"- {r['backend']}: MPS {r.get('mps', {}).get('action', '-')}; CUDA context in the probe's "
                     f"process: {r.get('parent_cuda_initialized', '-')}; wall {r.get('wall_s', '-')} s; errors: "
                     f"{r.get('errors') or 'none'}")
    labels = list(dict.fromkeys(c["chain"] for r in runs for c in r["chains"]))
    for label in labels:
        chains = {r["backend"]: next((c for c in r["chains"] if c["chain"] == label), None) for r in runs}
        lines += ["", f"## {label}", "", "standalone ms per forward (1 / 8 tokens, warm, the other stages idle): "
                  + "; ".join(f"{b}: " + ", ".join(f"{m} {x}/{y}" for m, (x, y) in zip(c["models"], c["standalone_ms"]))
                              for b, c in chains.items() if c and c["standalone_ms"])]
        alphas = list(dict.fromkeys(e["alpha"] for c in chains.values() if c for e in c["alphas"]))
        for alpha in alphas:
            entries = {b: next((e for e in c["alphas"] if e["alpha"] == alpha and "rows" in e), None) if c else None
                       for b, c in chains.items()}
            lines += ["", f"### alpha {alpha}", "",
                      "| method | " + " | ".join(f"{b} tok/s [min-max] | x sd | same | {b} ms/forward per stage"
                                                 for b in names) + " |",
                      "|---|" + "---:|---:|---|---|" * len(names)]
            methods = list(dict.fromkeys(r["method"] for e in entries.values() if e for r in e["rows"]))
            for method in methods:
                cells = []
                for b in names:
                    e = entries.get(b)
                    row = next((r for r in e["rows"] if r["method"] == method), None) if e else None
                    if row is None:
                        cells.append("- | - | - | -")
                        continue
                    sd = max((r["median_tokens_per_s"] for r in e["rows"] if r["method"].startswith("sd")),
                             default=None)
                    ratio = f"{row['median_tokens_per_s'] / sd:.2f}" if sd else "-"
                    cells.append(f"{row['median_tokens_per_s']} [{row['min']}-{row['max']}] | {ratio} | "
                                 f"{row['identical_to_ar']} | {row['stage_ms_per_forward']}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in report["runs"]:
        if r.get("chains"):
            lines += ["", *("#" + x if x.startswith("#") else x for x in markdown(r).splitlines())]
    return "\n".join(lines)


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
    parser.add_argument("--trace-methods", default="pipe",
                        help="methods traced once at the highest alpha (trace files and the GPU's gaps: "
                             "pipespec.tracing.gpu_gaps)")
    parser.add_argument("--trace-alphas", default="", help="comma-separated alphas to trace at (default: the highest)")
    parser.add_argument("--one-gpu", action="store_true", help="only the chains whose stages all share one device")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ",".join(all_methods())
                                                        + " (ar is always run: outputs are compared with it)")
    parser.add_argument("--backend", choices=("thread", "process"), default="thread",
                        help="where the workers live: threads of this process, or a process each (+ CUDA MPS)")
    parser.add_argument("--backends", default=None, help="e.g. 'thread,process': one run per backend (a fresh "
                                                         "process each, an equal share of --budget-s), side by side; "
                                                         "process-nomps: worker processes without MPS")
    parser.add_argument("--switch-interval-us", type=float, default=None,
                        help="the interpreter's GIL switch interval for this run (sys.setswitchinterval; default "
                             "5000): how long a thread woken by a hand-over may wait for another that holds the GIL")
    a = parser.parse_args()
    if a.switch_interval_us is not None:
        sys.setswitchinterval(a.switch_interval_us / 1e6)
    a.alphas = [float(x) for x in a.alphas.split(",")]
    a.trace_methods = [m for m in a.trace_methods.split(",") if m]
    a.trace_alphas = [float(x) for x in a.trace_alphas.split(",") if x]
    a.tokens = a.tokens or (24 if a.smoke else 128)
    a.prompt_len = a.prompt_len or (16 if a.smoke else 128)
    known = all_methods()
    a.methods = list(known) if a.methods is None else ["ar", *(m for m in a.methods.split(",") if m != "ar")]
    if unknown := [m for m in a.methods if m not in known]:
        sys.exit(f"unknown methods {unknown}: use {', '.join(known)}")
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU test of this script")
    out = Path(a.out)
    if a.backends:
        a.backends = a.backends.split(",")
        if bad := [b for b in a.backends if b not in ("thread", "process", "process-nomps")]:
            sys.exit(f"unknown backends {bad}: use thread, process, process-nomps")
        report = run_backends(a, sys.argv[1:])
        text = side_by_side(report)
    else:
        report = asyncio.run(main(a))
        text = markdown(report)
    (out / "probe.json").write_text(json.dumps(report, indent=2))
    (out / "probe.md").write_text(text)
    print(f"wrote {out / 'probe.json'} and {out / 'probe.md'}", flush=True)
