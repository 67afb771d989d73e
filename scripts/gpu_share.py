#!/usr/bin/env python
"""Why does a small stage run at a big one's pace when both are threads of one process on ONE GPU? (issue 14)

Measured before (issue 14): a 68M draft's graph forward takes 0.29 ms alone, 6.8 ms beside a 7B looping on the same
GPU as another thread of the same process (the 7B's own time per call, also with the draft's stream at the highest
priority), 0.60 ms as separate processes under CUDA MPS. This script separates the possible causes in one run:

- each forward's **host** time (one loop turn: graph replay + reading the result back) against its **GPU** span
  (CUDA events around the replay). A GPU span near the big model's time says the small model's kernels wait on the
  GPU (block scheduling: the big GEMVs fill every SM); a short GPU span with a long host turn says the host side
  waits (a lock, the GIL, a synchronisation that covers the other stream);
- how the host waits for the result: ``.tolist()`` (what the workers do), an event's ``synchronize()``, the stream's;
- stream priority; eager instead of graph replay; ``CUDA_DEVICE_MAX_CONNECTIONS`` (a fresh process per value);
- SM partitioning by CUDA green contexts (``torch.cuda.green_contexts``, a process of its own, last: a failure there
  must not take the other rows with it): the big model's graph on a green context of all SMs but 16, so 16 SMs stay
  free of its blocks; or the small model's on a 16-SM green context.

Random bf16 weights of real shapes, pipespec's static forward (CUDA's default layout) captured as CUDA graphs,
512 tokens of context. Results: share.json and share.md in the output folder. ``--smoke`` runs tiny shapes on the
CPU (checks the script; CPU "GPU spans" are host times).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_forward import SHAPES, build  # noqa: E402

from pipespec.workers.readback import HostReader  # noqa: E402
from pipespec.workers.static_llama import CPU_VARIANT, CUDA_VARIANT, StaticLlama  # noqa: E402

SHAPES.setdefault("68m", (768, 2, 12, 12, 3072, 32000))
SHAPES.setdefault("1b", (2048, 16, 32, 8, 8192, 128256))
PROMPT, CONTEXT = 512, 768
SMOKE_PROMPT, SMOKE_CONTEXT = 16, 64

# (name, small's wait, big's wait, small high priority, small as graph, big as graph)
VARIANTS = [
    ("small alone", "tolist", None, False, True, True),
    ("big alone", None, "tolist", False, True, True),
    ("both, tolist", "tolist", "tolist", False, True, True),
    ("both, small high priority", "tolist", "tolist", True, True, True),
    ("both, event.synchronize", "event", "event", False, True, True),
    ("both, HostReader (the workers' read-back)", "reader", "reader", False, True, True),
    ("both, stream.synchronize", "stream", "stream", False, True, True),
    ("both, small eager", "tolist", "tolist", False, False, True),
    ("both, small eager + high priority", "tolist", "tolist", True, False, True),
    ("both eager", "tolist", "tolist", False, False, False),
    ("both, green: big on all SMs but 16 (HostReader)", "reader", "reader", False, True, True),
    ("both, green: big on all SMs but 16, small high priority (HostReader)", "reader", "reader", True, True, True),
    ("both, green: small on 16 SMs (HostReader)", "reader", "reader", False, True, True),
]
GREEN_FREE_SMS = 16


class Model:
    """One shape: its static forward with the prompt's K/V in place, one 1-token input, a captured graph."""

    def __init__(self, shape: str, device: torch.device, dtype: torch.dtype, smoke: bool) -> None:
        self.shape, self.device = shape, device
        prompt_len, self.context = (SMOKE_PROMPT, SMOKE_CONTEXT) if smoke else (PROMPT, CONTEXT)
        model = build(shape, device, dtype)
        self.static = StaticLlama(model, self.context + 128, CUDA_VARIANT if device.type == "cuda" else CPU_VARIANT)
        vocab = SHAPES[shape][5]
        self.static.forward(torch.randint(0, vocab, (prompt_len,), device=device),
                            torch.arange(prompt_len, device=device), self.context)
        self.ids = torch.randint(0, vocab, (1,), device=device)
        self.pos = torch.arange(prompt_len, prompt_len + 1, device=device)
        if device.type == "cuda":  # written on the default stream: done before another stream reads them
            torch.cuda.synchronize(device)
        self.graph: Any = None
        self.out: Any = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.eager()
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream):
                self.out = self.eager()
            torch.cuda.synchronize(device)
        self.green: tuple[Any, Any, Any, Any] | None = None  # green context, its stream, a graph there, its output

    def on_green(self, num_sms: int) -> Any:
        """A green context of ``num_sms`` SMs, its stream, and this model's graph captured on that stream (once)."""
        if self.green is None:
            from torch.cuda.green_contexts import GreenContext

            ctx = GreenContext.create(num_sms=num_sms, device_id=self.device.index or 0)
            stream = ctx.Stream()
            with torch.cuda.stream(stream):
                self.eager()
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                out = self.eager()
            torch.cuda.synchronize(self.device)
            self.green = (ctx, stream, graph, out)
        return self.green

    def eager(self) -> torch.Tensor:
        return self.static.forward(self.ids, self.pos, self.context)

    def call(self, graph: bool, green: bool = False) -> torch.Tensor:
        if green and self.green is not None:
            _, _, graph, out = self.green
            graph.replay()
            return out
        if graph and self.graph is not None:
            self.graph.replay()
            return self.out
        return self.eager()


def loop(model: Model, wait: str, graph: bool, stream: Any, start: threading.Barrier, seconds: float,
         rec: dict[str, Any], green: bool = False) -> None:
    """Forward after forward for ``seconds``: host time per turn and (CUDA) the GPU span of each forward."""
    cuda = model.device.type == "cuda"
    turns: list[float] = []
    reader = HostReader()
    events: list[tuple[Any, Any]] = []
    try:
        with torch.inference_mode(), (torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
            start.wait()
            end_at = time.perf_counter() + seconds
            while (t0 := time.perf_counter()) < end_at:
                if cuda:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                out = model.call(graph, green)
                choice = out[-1].argmax()
                if cuda:
                    e1.record()
                    events.append((e0, e1))
                if wait == "tolist" or not cuda:
                    choice.tolist()
                elif wait == "reader":
                    reader.ints(choice)
                elif wait == "event":
                    e1.synchronize()
                else:
                    torch.cuda.current_stream().synchronize()
                turns.append((time.perf_counter() - t0) * 1000)
        if cuda:
            torch.cuda.synchronize(model.device)
        spans = [a.elapsed_time(b) for a, b in events] if cuda else turns
        rec.update(summary(turns, "host") | summary(spans, "gpu") | {"forwards": len(turns)})
    except Exception as e:  # noqa: BLE001 - recorded
        rec["error"] = f"{type(e).__name__}: {e}"[:400]
        rec["traceback"] = traceback.format_exc()[-1500:]


def summary(values: list[float], prefix: str) -> dict[str, float]:
    if len(values) < 3:
        return {f"{prefix}_median_ms": round(statistics.median(values), 4) if values else -1.0}
    q = statistics.quantiles(values, n=10, method="inclusive")
    return {f"{prefix}_median_ms": round(statistics.median(values), 4), f"{prefix}_p10_ms": round(q[0], 4),
            f"{prefix}_p90_ms": round(q[-1], 4)}


def run_pair(small: Model, big: Model, seconds: float, only: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    cuda = small.device.type == "cuda"
    for name, small_wait, big_wait, prio, small_graph, big_graph in VARIANTS:
        if only and not any(o in name for o in only):
            continue
        if "green" in name and not (only and any("green" in o for o in only)):
            continue  # only in a process of its own (main)
        row: dict[str, Any] = {"variant": name, "small": {}, "big": {}}
        green_big, green_small = "green: big" in name, "green: small" in name
        jobs = [(small, small_wait, small_graph, prio, row["small"], green_small),
                (big, big_wait, big_graph, False, row["big"], green_big)]
        jobs = [j for j in jobs if j[1] is not None]
        barrier = threading.Barrier(len(jobs))
        threads = []
        try:
            streams = []
            for model, _, _, high, _, green in jobs:
                if green and cuda:
                    sms = torch.cuda.get_device_properties(model.device).multi_processor_count
                    with torch.inference_mode():
                        streams.append(model.on_green(sms - GREEN_FREE_SMS if model is big else GREEN_FREE_SMS)[1])
                else:  # a priority of -1 is the highest of torch's two (lower number = higher priority)
                    streams.append(torch.cuda.Stream(model.device, priority=-1 if high else 0) if cuda else None)
        except Exception as e:  # noqa: BLE001 - recorded; the next variant goes on
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        for (model, wait, graph, _, rec, green), stream in zip(jobs, streams):
            threads.append(threading.Thread(target=loop, args=(model, wait, graph, stream, barrier, seconds, rec,
                                                               green and cuda)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def child(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.smoke else "cuda:0")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.set_grad_enabled(False)
    out: dict[str, Any] = {"pairs": {}}
    for pair in args.pairs.split(","):
        small_shape, big_shape = pair.split(":")
        entry: dict[str, Any] = {}
        out["pairs"][pair] = entry
        try:
            with torch.inference_mode():
                small = Model(small_shape, device, dtype, args.smoke)
                big = Model(big_shape, device, dtype, args.smoke)
            entry["rows"] = run_pair(small, big, args.seconds, args.only.split(",") if args.only else None)
            del small, big
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"[:400]
            entry["traceback"] = traceback.format_exc()[-2000:]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Two stages sharing one GPU as threads ({report['device']}, torch {report['torch']}, "
             f"commit {report['commit']})", "",
             "Milliseconds per forward: host = one loop turn (replay + read back), gpu = CUDA events around the "
             "forward; medians (p10-p90).", ""]
    for run in report["runs"]:
        lines += [f"## {run['label']}", ""]
        if "error" in run:
            lines += [f"error: {run['error']}", ""]
            continue
        for pair, entry in run["result"].get("pairs", {}).items():
            small, big = pair.split(":")
            lines += [f"### {small} beside {big}", ""]
            if "error" in entry:
                lines += [f"error: {entry['error']}", ""]
                continue
            lines += [f"| variant | {small} host | {small} gpu | {small} forwards | {big} host | {big} gpu |",
                      "|---|---:|---:|---:|---:|---:|"]
            for row in entry.get("rows", []):
                cells = [row["variant"]]
                if "error" in row:
                    lines.append(f"| {row['variant']} | error: {row['error'][:200]} | | | | |")
                    continue
                for side, keys in (("small", ("host", "gpu", "n")), ("big", ("host", "gpu"))):
                    rec = row[side]
                    for k in keys:
                        if not rec:
                            cells.append("-")
                        elif "error" in rec:
                            cells.append(f"error: {rec['error'][:60]}")
                        elif k == "n":
                            cells.append(str(rec.get("forwards")))
                        else:
                            m = rec.get(f"{k}_median_ms")
                            p10, p90 = rec.get(f"{k}_p10_ms"), rec.get(f"{k}_p90_ms")
                            cells.append(f"{m:.3f} ({p10:.3f}-{p90:.3f})" if p10 is not None else f"{m}")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="share-out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test of the script)")
    parser.add_argument("--pairs", default=None, help="small:big shapes, default 68m:7b,1b:8b (smoke tiny:tiny)")
    parser.add_argument("--seconds", type=float, default=None, help="per variant (default 2.5; smoke 0.2)")
    parser.add_argument("--only", default=None, help="only the variants whose name contains one of these")
    parser.add_argument("--connections", default="8,1,32",
                        help="CUDA_DEVICE_MAX_CONNECTIONS values, a fresh process each (8 is CUDA's default); the "
                             "first runs every variant, the others only the 'tolist' ones")
    parser.add_argument("--no-green", action="store_true", help="skip the green-context process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pairs = args.pairs or ("tiny:tiny" if args.smoke else "68m:7b,1b:8b")
    args.seconds = args.seconds or (0.2 if args.smoke else 2.5)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("PIPESPEC_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    ).stdout.strip()
    report: dict[str, Any] = {"commit": commit, "torch": torch.__version__, "runs": [],
                              "device": "cpu (smoke)" if args.smoke else "cuda"}
    runs = [(c, args.only if i == 0 else "tolist") for i, c in enumerate(args.connections.split(",") if
                                                                        args.connections else [])]
    if not args.no_green:
        runs.append(("8", "green"))
    for connections, only in runs:
        label = f"CUDA_DEVICE_MAX_CONNECTIONS={connections}" + (", green contexts" if only == "green" else "")
        env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS=connections)
        cmd = [sys.executable, __file__, str(out), "--child", "--pairs", args.pairs, "--seconds", str(args.seconds)]
        if args.smoke:
            cmd.append("--smoke")
        if only:
            cmd += ["--only", only]
        run: dict[str, Any] = {"label": label}
        print(f"== {label}", flush=True)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            result = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if result:
                run["result"] = json.loads(result[-1][len("RESULT "):])
            else:
                run["error"] = f"rc={done.returncode}: {done.stderr[-600:]}"
            print(done.stdout[-3000:], done.stderr[-1500:], flush=True)
        except Exception as e:  # noqa: BLE001
            run["error"] = f"{type(e).__name__}: {e}"[:400]
        report["runs"].append(run)
        if not args.smoke and report["device"] == "cuda":
            try:
                report["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i",
                                                   "0"], capture_output=True, text=True).stdout.strip() or "cuda"
            except Exception:  # noqa: BLE001
                pass
        (out / "share.json").write_text(json.dumps(report, indent=2))
        (out / "share.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
