"""Tensor-parallel forward latency on 2 GPUs (NCCL all-reduces captured in CUDA graphs) against the 2-GPU floor.

    python scripts/gpu_tp.py OUT_DIR [--smoke] [--budget-s 420] [--layouts lean-math,compile-layer-math]
                                     [--shapes 70b,13b] [--compile-backend inductor]

Parts (each under try/except, its error recorded; the whole run under a time budget):
1. check: a tiny model (float32), every rank holding the same weights, split over the ranks: the TP logits, eager
   and replayed from a captured graph, against the unsplit ``StaticLlama`` on the same GPU (max |diff|, argmax).
2. 70B shape (hidden 8192, 80 layers, 64 heads, 8 kv heads, ffn 28672, vocab 32000), TP=2, random bf16 weights made
   directly on each GPU (only that rank's shard): 1- and 8-token forward latency, CUDA graphs, median of the
   replays (512 tokens of context), vs the floor = bytes one GPU reads per forward / its copy bandwidth.
3. 13B shape TP=2 and TP=1 (the same, one GPU).

Every part runs each of ``--layouts`` (``static_llama.VARIANTS``) on the same weights, one after the other:
``lean-math`` (CUDA's default, uncompiled) and ``compile-layer-math`` (on a rank: two torch.compile regions per layer,
the all-reduces eager between them, all inside the captured graph); a layout's compile time is reported (the eager
warm-up calls before its first capture, ``compile_s``). torch.compile's backend: inductor on the GPU; in --smoke
dynamo's "eager" (each region captured whole, no C++ build: inductor takes ~90 s a shape on a busy 2-core CPU; pass
``--compile-backend inductor`` to run it there too).

Writes OUT_DIR/gpu_tp.json and OUT_DIR/gpu_tp.md. --smoke: gloo on the CPU, tiny shapes, no graphs (checks the
script itself). NVLink multicast / symmetric-memory multimem stay off (required on the lent machines).
"""

from __future__ import annotations

import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v  # set before torch / NCCL load, inherited by the rank processes

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "70b": (8192, 80, 64, 8, 28672, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "tiny": (64, 2, 4, 2, 128, 256),
}
CONTEXT = 512  # tokens already in the cache
NOMINAL_BW = 4.2e12  # bytes/s, H200 copy bandwidth (read + write) measured earlier; the measured one is reported too


from gpu_latency import copy_bandwidth  # noqa: E402 - scripts/ is sys.path[0] when a script runs


def read_bytes(static) -> int:
    """Bytes one forward reads on this rank: every layer's shard, the final norm and lm_head (the embedding is a
    lookup of a few rows)."""
    total = sum(t.numel() * t.element_size() for w in static.layers for t in w.values() if torch.is_tensor(t))
    return total + static.norm.numel() * static.norm.element_size() + static.lm_head.numel() * static.lm_head.element_size()


def _time(fn, reps: int, cuda: bool) -> list[float]:
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def _graph(fn, cuda: bool, pool):
    """Capture ``fn`` (warmed up first: NCCL's communicator and cuBLAS workspaces are made outside the capture)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread queries events while we capture (global mode would fail it)
    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return g, out


def check(group, device: torch.device, cuda: bool, layouts: list[str], backend: str) -> dict:
    """TP logits of a tiny float32 LLaMA vs the unsplit static forward on the same device, per layout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipespec.workers.static_llama import StaticLlama
    from pipespec.workers.tensor_parallel import tp_from_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, attention_bias=True, initializer_range=0.1)
    model = LlamaForCausalLM(config).float().eval().to(device)
    tp = tp_from_model(model, group, device, 1024)
    import copy

    ref = StaticLlama(copy.deepcopy(model), 1024)
    ids = torch.randint(0, 512, (8,), device=device)
    pos = torch.arange(100, 108, device=device)
    want = ref.forward(ids, pos, 256)
    rows: dict = {}
    for layout in layouts:
        row = rows[layout] = {}
        try:
            _fresh_compiles()
            tp.set_variant(layout, backend=backend)
            eager = tp.forward(ids, pos, 256)
            row.update({"eager_max_abs_diff": (want - eager).abs().max().item(),
                        "eager_argmax_equal": bool(torch.equal(want.argmax(-1), eager.argmax(-1)))})
            if cuda:
                g, out = _graph(lambda: tp.forward(ids, pos, 256), cuda, None)
                out.zero_()
                g.replay()
                torch.cuda.synchronize()
                row["graph_max_abs_diff"] = (want - out).abs().max().item()
                row["graph_argmax_equal"] = bool(torch.equal(want.argmax(-1), out.argmax(-1)))
                del g
        except Exception as exc:  # noqa: BLE001 - recorded, the next layout still runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["traceback"] = traceback.format_exc()[-2000:]
    return rows


def measure(shape: str, group, device: torch.device, cuda: bool, reps: int, dtype: torch.dtype,
            layouts: list[str], backend: str, out: dict, save) -> None:
    """Each layout's 1- and 8-token latency on one set of random weights, into ``out``; ``save()`` after each layout
    (a job killed at its time limit keeps what was done)."""
    from pipespec.workers.tensor_parallel import tp_random

    static = tp_random(SHAPES[shape], group, device, dtype, CONTEXT + 512)
    out.update({"shape": shape, "world": group.size(), "bytes_per_gpu": read_bytes(static), "layouts": {}})
    for layout in layouts:
        row = out["layouts"][layout] = {}
        try:
            _fresh_compiles()
            static.set_variant(layout, backend=backend)
            _measure_layout(static, row, shape, group, device, cuda, reps)
        except Exception as exc:  # noqa: BLE001 - recorded, the next layout still runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["traceback"] = traceback.format_exc()[-2000:]
        save()
    del static
    if cuda:
        torch.cuda.empty_cache()


def _fresh_compiles() -> None:
    """Forget earlier compiles: dynamo's cache sits on the region's code, and a region compiled at another shape (the
    check's tiny model, the 70B before the 13B) would make this one's sizes symbolic (automatic dynamic), which a
    process serving one model never sees."""
    import torch._dynamo

    torch._dynamo.reset()


def _measure_layout(static, row: dict, shape: str, group, device: torch.device, cuda: bool, reps: int) -> None:
    pool = torch.cuda.graph_pool_handle() if cuda else None  # one per layout: the last layout's graphs are gone
    graphs = []
    for n in (1, 8):
        ids = torch.randint(0, SHAPES[shape][5], (n,), device=device)
        pos = torch.arange(CONTEXT, CONTEXT + n, device=device)
        kv_len = -(-(CONTEXT + n) // 256) * 256  # the context bucket StaticWorker would use

        def step(ids=ids, pos=pos, kv_len=kv_len):
            return static.forward(ids, pos, kv_len)

        try:
            started = time.perf_counter()
            if cuda:
                g, _ = _graph(step, cuda, pool)  # its two warm-up calls compile (a compiled layout's new shape)
                graphs.append(g)
                run = g.replay
            else:
                for _ in range(2):  # as _graph's warm-up
                    step()
                run = step
            row[f"compile_s_{n}"] = round(time.perf_counter() - started, 2)  # warm-up and capture, compiles
            _all_ready(group, device)
            _time(run, 3, cuda)  # settle clocks
            times = _time(run, reps, cuda)
            row[f"graph_{n}_ms" if cuda else f"eager_{n}_ms"] = round(statistics.median(times), 3)
            row[f"spread_{n}_ms"] = [round(min(times), 3), round(max(times), 3)]
            row["replays"] = reps
        except Exception as exc:  # noqa: BLE001 - recorded, the other sizes still run
            row[f"error_{n}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            row[f"traceback_{n}"] = traceback.format_exc()[-2000:]
    del graphs
    if cuda:
        torch.cuda.synchronize()


def _all_ready(group, device: torch.device) -> None:
    t = torch.ones(1, device=device)
    group.allreduce([t]).wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_main(rank: int, world: int, store_path: str, parts: list[str], smoke: bool, out_file: str,
              layouts: list[str], backend: str) -> None:
    import torch.distributed as dist

    cuda = not smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_grad_enabled(False)
    result: dict = {"rank": rank, "world": world, "parts": {}}
    try:
        store = dist.FileStore(store_path, world)
        store.set_timeout(timedelta(seconds=120))
        # the standard route (the default group); NCCL's all-reduce is then captured in the graphs like any kernel
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=120), **({"device_id": device} if cuda else {}))
        group = dist.group.WORLD
        if cuda and rank == 0:
            result["copy_bandwidth_Bps"] = copy_bandwidth(device)
        for part in parts:
            try:
                if part == "check":
                    result["parts"][part] = check(group, device, cuda, layouts, backend)
                else:
                    result["parts"][part] = {}  # measure fills it in, saving after each layout
                    measure(part, group, device, cuda, 5 if smoke else 30, torch.float32 if smoke else torch.bfloat16,
                            layouts, backend, result["parts"][part], lambda: Path(out_file).write_text(json.dumps(result)))
            except Exception as exc:  # noqa: BLE001
                result["parts"][part] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                         "traceback": traceback.format_exc()[-2000:]}
            Path(out_file).write_text(json.dumps(result))  # what is done so far survives a kill
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result["traceback"] = traceback.format_exc()[-2000:]
    Path(out_file).write_text(json.dumps(result))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - ending anyway
        pass


def run_job(out: Path, name: str, world: int, parts: list[str], smoke: bool, timeout: float,
            layouts: list[str], backend: str) -> dict:
    """Start ``world`` rank processes for ``parts``; rank 0's results (every rank's errors), or the timeout."""
    job = out / f"job_{name}"
    job.mkdir(parents=True, exist_ok=True)
    store = job / "store"
    store.unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, str(store), parts, smoke, str(job / f"rank{r}.json"),
                                                 layouts, backend)) for r in range(world)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=max(1.0, timeout - (time.monotonic() - started)))
    timed_out = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = {}
    for r in range(world):
        f = job / f"rank{r}.json"
        results[r] = json.loads(f.read_text()) if f.exists() else {"error": "no result written"}
    row = {"world": world, "parts_asked": parts, "seconds": round(time.monotonic() - started, 1),
           "timed_out": timed_out, "exit_codes": [p.exitcode for p in procs], "rank0": results[0]}
    errors = {r: v.get("error") for r, v in results.items() if v.get("error")}
    if errors:
        row["rank_errors"] = errors
    return row


def markdown(report: dict) -> str:
    lines = [f"# Tensor-parallel forward latency ({report['mode']}; compiled layouts: "
             f"{report.get('compile_backend')})", "",
             f"GPUs: {report.get('gpus')}; env: {report['env']}", ""]
    bw = report.get("copy_bandwidth_Bps")
    if bw:
        lines.append(f"Measured copy bandwidth (read + write) on GPU 0: {bw / 1e12:.2f} TB/s; floors use "
                     f"{NOMINAL_BW / 1e12:.1f} TB/s (nominal) and the measured one.")
        lines.append("")
    lines += ["| shape | GPUs | layout | bytes/GPU | floor (4.2 TB/s) | 1 token | x floor | 8 tokens | x floor | "
              "warm-up s (1, 8) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        if "bytes_per_gpu" not in row:
            continue
        floor = row["bytes_per_gpu"] / NOMINAL_BW * 1e3
        cells = []
        for n in (1, 8):
            ms = row.get(f"graph_{n}_ms", row.get(f"eager_{n}_ms"))
            cells += [f"{ms:.2f} ms" if ms else row.get(f"error_{n}", "-")[:60], f"{ms / floor:.2f}x" if ms else "-"]
        warm = f"{row.get('compile_s_1', '-')}, {row.get('compile_s_8', '-')}"
        lines.append(f"| {row['shape']} | {row['world']} | {row.get('layout')} | {row['bytes_per_gpu'] / 2**30:.1f} GiB"
                     f" | {floor:.2f} ms | " + " | ".join(cells) + f" | {warm} |")
    lines += ["", "Correctness check (tiny float32 model, TP vs unsplit on the same GPU):", "",
              f"```\n{json.dumps(report.get('check'), indent=1)}\n```", ""]
    if report.get("errors"):
        lines += ["Errors:", "", f"```\n{json.dumps(report['errors'], indent=1)[:4000]}\n```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="gloo on the CPU, tiny shapes (checks the script)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all parts")
    parser.add_argument("--layouts", default="lean-math,compile-layer-math",
                        help="static_llama.VARIANTS to time, in order, on the same weights")
    parser.add_argument("--shapes", default="70b,13b", help="TP=2 shapes, in order (TP=1 runs 13b if named)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of compiled layouts (default: inductor; eager with --smoke)")
    args = parser.parse_args()
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    layouts = [v for v in args.layouts.split(",") if v]
    from pipespec.workers.static_llama import VARIANTS

    unknown = [v for v in layouts if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}: use {', '.join(VARIANTS)}")
    shapes = [v for v in args.shapes.split(",") if v]
    if any(v not in SHAPES for v in shapes):
        parser.error(f"unknown shapes {shapes}: use {', '.join(SHAPES)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict = {"mode": "smoke (gloo, CPU, tiny)" if args.smoke else "NCCL, CUDA graphs, bf16",
                    "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                         "NVSHMEM_DISABLE_NVLS")},
                    "torch": torch.__version__, "layouts": layouts,
                    "compile_backend": backend, "rows": [], "errors": {}, "jobs": {}}
    gpus = torch.cuda.device_count() if not args.smoke else 0
    report["gpus"] = [torch.cuda.get_device_name(i) for i in range(gpus)] if gpus else "none (CPU)"
    if not args.smoke and gpus < 2:
        report["errors"]["setup"] = f"needs 2 GPUs, found {gpus}"
    else:
        tp2, tp1 = (["tiny"], ["tiny"]) if args.smoke else (shapes, ["13b"] if "13b" in shapes else [])
        # (name, world, parts, share of the budget left)
        jobs = [("tp2", 2, ["check", *tp2], 0.75 if tp1 else 1.0)] + ([("tp1", 1, tp1, 1.0)] if tp1 else [])
        for name, world, parts, share in jobs:
            left = args.budget_s - (time.monotonic() - started)
            if left < 10:
                report["errors"][name] = "skipped: time budget spent"
                continue
            try:
                job = run_job(out, name, world, parts, args.smoke, left * share, layouts, backend)
            except Exception as exc:  # noqa: BLE001
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
                continue
            report["jobs"][name] = {k: v for k, v in job.items() if k != "rank0"}
            rank0 = job["rank0"]
            if rank0.get("copy_bandwidth_Bps"):
                report["copy_bandwidth_Bps"] = rank0["copy_bandwidth_Bps"]
            if job.get("rank_errors") or job["timed_out"]:
                report["errors"][name] = {"rank_errors": job.get("rank_errors"), "timed_out": job["timed_out"]}
            for part, row in rank0.get("parts", {}).items():
                if part == "check":
                    report["check"] = row
                elif "error" in row:
                    report["errors"][f"{name}:{part}"] = row
                else:  # one row per layout
                    base = {k: v for k, v in row.items() if k != "layouts"}
                    for layout, timing in row.get("layouts", {}).items():
                        report["rows"].append({**base, "layout": layout, **timing})
                        if "error" in timing or any(k.startswith("error_") for k in timing):
                            report["errors"][f"{name}:{part}:{layout}"] = {k: v for k, v in timing.items()
                                                                          if "error" in k or "traceback" in k}
    bw = report.get("copy_bandwidth_Bps")
    for row in report["rows"]:
        if "bytes_per_gpu" not in row:  # killed before its weights were made
            continue
        floor = row["bytes_per_gpu"] / NOMINAL_BW * 1e3
        row["floor_ms_nominal"] = round(floor, 4)
        if bw:
            row["floor_ms_measured_bw"] = round(row["bytes_per_gpu"] / bw * 1e3, 4)
        for n in (1, 8):
            ms = row.get(f"graph_{n}_ms", row.get(f"eager_{n}_ms"))
            if ms:
                row[f"over_floor_{n}"] = round(ms / floor, 2)
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu_tp.json").write_text(json.dumps(report, indent=1))
    try:
        text = markdown(report)
    except Exception as exc:  # noqa: BLE001 - the JSON is written; say why the table is not
        text = f"# Tensor-parallel forward latency\n\nthe table failed: {type(exc).__name__}: {exc}\n"
    (out / "gpu_tp.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
