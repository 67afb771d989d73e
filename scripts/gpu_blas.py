"""Issue 16: the static path's GEMVs under the BLAS settings torch exposes, to see whether cuBLAS's default choice
(nvjet kernels; split-K with a separate reduce kernel for the 7B o_proj and down_proj) can be beaten by a setting.

    python scripts/gpu_blas.py OUT_DIR [--smoke]

Per (shape, tokens, setting): ``F.linear(x, W)`` (bf16, W [N, K]) captured 20 times in one CUDA graph, median of 20
replays / 20 (us per call) and the weight read per second; for one token also ``torch.mv``. Settings: ``default``;
``lt`` (``torch.backends.cuda.preferred_blas_library("cublaslt")``); ``no-reduced`` (bf16 reductions in full
precision: ``allow_bf16_reduced_precision_reduction = False``). JSON and Markdown to OUT_DIR. ``--smoke``: tiny
shapes on the CPU, eager, to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

SHAPES = {"7b.qkv": (12288, 4096), "7b.o": (4096, 4096), "7b.gate_up": (22016, 4096), "7b.down": (4096, 11008),
          "13b.qkv": (15360, 5120), "13b.o": (5120, 5120), "13b.down": (5120, 13824)}


def setting(name: str) -> Callable[[], None]:
    def apply() -> None:
        if hasattr(torch.backends.cuda, "preferred_blas_library"):
            torch.backends.cuda.preferred_blas_library("cublaslt" if name == "lt" else "cublas")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = name != "no-reduced"
    return apply


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """us per call: 20 calls in one CUDA graph, median of 20 replays (CPU: eager, 20 calls)."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        return (time.perf_counter() - t0) / 20 * 1e6
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(20):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda:0")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = {"smoke": (64, 32)} if args.smoke else SHAPES
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, (n_out, k) in shapes.items():
            w = torch.randn(n_out, k, device=device, dtype=dtype) * 0.02
            for tokens in (1, 8):
                x = torch.randn(tokens, k, device=device, dtype=dtype)
                calls: dict[str, Callable[[], Any]] = {"linear": lambda x=x, w=w: F.linear(x, w)}
                if tokens == 1:
                    calls["mv"] = lambda x=x, w=w: torch.mv(w, x[0])
                for label in ("default", "lt", "no-reduced"):
                    for call, fn in calls.items():
                        try:
                            setting(label)()
                            us = time_call(fn, device)
                            rows.append({"shape": name, "tokens": tokens, "setting": label, "call": call,
                                         "us": round(us, 2), "tb_s": round(w.numel() * w.element_size() / us / 1e6, 3)})
                        except Exception as e:  # noqa: BLE001 - a setting this torch lacks
                            rows.append({"shape": name, "tokens": tokens, "setting": label, "call": call,
                                         "error": f"{type(e).__name__}: {e}"[:200]})
                        print(json.dumps(rows[-1]), flush=True)
                try:
                    setting("default")()
                except RuntimeError:  # no cuBLAS here (CPU)
                    pass
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_blas.json").write_text(json.dumps({"device": str(device), "torch": torch.__version__, "rows": rows},
                                                  indent=1))
    lines = ["| shape | tokens | setting | call | us | TB/s |", "|---|---:|---|---|---:|---:|"]
    lines += [f"| {r['shape']} | {r['tokens']} | {r['setting']} | {r['call']} | {r.get('us', r.get('error'))} | "
              f"{r.get('tb_s', '')} |" for r in rows]
    (out / "gpu_blas.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
