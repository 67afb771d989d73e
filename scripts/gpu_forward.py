"""Issue 16: one static-path forward of each layout (``static_llama.VARIANTS``) against the memory-bandwidth floor.

    python scripts/gpu_forward.py OUT_DIR [--budget-s 240] [--shapes 7b,13b] [--variants base,lean,...]
    python scripts/gpu_forward.py OUT_DIR --smoke      # tiny shapes on the CPU: checks the script, not the speed

Random-weight LLaMA of real shapes, bf16, batch 1, a 512-token prompt in the static cache (prefilled once with the
base layout), then 1 and 8 new tokens per forward over a 768-slot context bucket (what StaticWorker uses there). Per
variant and token count: the CUDA graph is captured first (after two warm-up forwards, where torch.compile compiles);
then CUDA events around each of ``--reps`` replays (median, p10, p90) and around ``--reps`` replays back to back;
compile time (the warm-up forwards); kernels in the captured graph (per layer: (total - the forward's own) / layers
is approximate, the total is exact); GPU time per kernel name in one eager forward (torch.profiler); max
|logits - base's logits| and argmax agreement, so every variant is shown to be the same model. The floor is the
weights' bytes over the device-to-device copy bandwidth measured here (bytes read + written), as gpu_latency.py.

Every measurement is under try/except (the error is recorded) and the budget is checked before each variant;
results are rewritten to OUT_DIR/gpu_forward.json and .md after every variant, so a killed run leaves what it had.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # at module level: inside a function it would make ``torch`` a local name there

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's pipespec, run from anywhere

from pipespec.workers.static_llama import VARIANTS, StaticLlama  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "tiny": (64, 2, 4, 2, 128, 256),
    "68m": (768, 2, 12, 12, 3072, 32000),  # the drafts of the GPU chains (workers.synthetic.SHAPES)
    "1b": (2048, 16, 32, 8, 8192, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "8b": (4096, 32, 32, 8, 14336, 128256),  # Llama-3 8B: GQA (4 query heads per kv head)
    # issue 16: the other families on the static path, at the middle size of their chains
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064),  # q/k/v biases
    "qwen3-8b": (4096, 36, 32, 8, 12288, 151936),  # q/k norms
    "mistral-7b": (4096, 32, 32, 8, 14336, 32768),  # v0.3: no sliding window
    "tiny-qwen2": (64, 2, 4, 2, 128, 256),
    "tiny-qwen3": (64, 2, 4, 2, 128, 256),
    "tiny-mistral": (64, 2, 4, 2, 128, 256),
}
# phase A on every shape first, then phase B: the cheap and the likeliest winners before the long compiles
PHASES = (["base", "lean", "lean-math", "compile-layer"],
          ["compile-layer-math", "compile-parts", "compile-layer-static", "compile-layer-autotune"])
ESTIMATE_S = {"base": 8, "lean": 8, "lean-math": 8, "lean-triton": 8, "lean-fused": 8, "compile-layer-autotune": 120}  # others: 25 (compiles)
PROMPT = 512
CONTEXT = 768  # the context bucket of positions 512 .. 519 (multiples of 256)


def now() -> float:
    return time.perf_counter()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy on ``device``, counting bytes read plus bytes written."""
    numel = 2 ** 28 if device.type == "cuda" else 2 ** 22
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = now()
    for _ in range(20):
        dst.copy_(src)
    sync(device)
    seconds = (now() - t0) / 20
    return 2 * src.numel() * src.element_size() / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_classes(shape: str) -> tuple[Any, Any]:
    """(config class, model class) of a shape: its family is the name's prefix (LLaMA where none is named)."""
    import transformers

    family = next((f for f in ("qwen2", "qwen3", "mistral") if f in shape), "llama")
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "llama": "Llama"}[family]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def build(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    config_class, model_class = model_classes(shape)
    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    extra = {"head_dim": hidden // heads} if "qwen3" in shape else {}
    if "mistral" in shape:
        extra["sliding_window"] = None
    config = config_class(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                          max_position_embeddings=4096, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no float32 copy of 13B first
    try:
        with torch.device(device):
            model = model_class(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():  # random, not HF's zeros/ones: zeros can run faster than real data
            p.normal_(0, 0.02)
    return model


def graph_kernels(graph: Any, folder: str) -> dict[str, int]:
    """Node kinds of a captured CUDA graph (from its DOT dump)."""
    path = os.path.join(folder, "graph.dot")
    graph.debug_dump(path)
    text = Path(path).read_text()
    os.remove(path)
    kinds: dict[str, int] = {}
    for kind in re.findall(r"label=\"\{?\s*(KERNEL|MEMCPY|MEMSET|EMPTY|HOST|GRAPH|EVENT_RECORD|EVENT_WAIT|MEM_ALLOC|"
                           r"MEM_FREE|CONDITIONAL)", text):
        kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:  # a dump format this parser does not know: the bare word counts, and the dump's size
        kinds = {"KERNEL": len(re.findall(r"\bKERNEL\b", text)), "dot_bytes": len(text)}
    return kinds


def profile_kernels(fn: Any, device: torch.device, top: int = 14) -> dict[str, Any]:
    """Kernel launches and GPU time by kernel name in one eager call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    by_name: dict[str, list[float]] = {}
    for evt in prof.events():
        on_gpu = device.type == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA
        # on the CPU (smoke): count aten ops called from Python directly (a rough stand-in for kernels)
        on_cpu = device.type != "cuda" and evt.name.startswith("aten::") and evt.cpu_parent is None
        if on_gpu or on_cpu:
            entry = by_name.setdefault(evt.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += (getattr(evt, "device_time", 0.0) if on_gpu else evt.cpu_time) / 1000
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"launches": sum(c for c, _ in by_name.values()), "total_ms": round(sum(t for _, t in by_name.values()), 3),
            "top": [{"name": k, "count": c, "ms": round(t, 4)} for k, (c, t) in ranked[:top]]}


def time_it(fn: Any, device: torch.device, reps: int) -> dict[str, float]:
    """Per-call milliseconds: each call between CUDA events (median, p10, p90), and ``reps`` calls back to back."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in pairs]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        sync(device)
        back_to_back = start.elapsed_time(end) / reps
    else:
        for _ in range(reps):
            t0 = now()
            fn()
            times.append((now() - t0) * 1000)
        t0 = now()
        for _ in range(reps):
            fn()
        back_to_back = (now() - t0) * 1000 / reps
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": round(statistics.median(times), 4), "p10_ms": round(q[0], 4), "p90_ms": round(q[-1], 4),
            "min_ms": round(min(times), 4), "back_to_back_ms": round(back_to_back, 4), "reps": len(times)}


def measure_variant(static: StaticLlama, name: str, device: torch.device, reps: int, inputs: dict[int, Any],
                    baseline: dict[int, torch.Tensor], floor_ms: float, tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": name}
    if VARIANTS[name].compile:
        torch._dynamo.reset()  # compile time from scratch (inductor's on-disk cache may still shorten it)
    static.set_variant(name)
    graphs = []
    try:
        for n, (ids, pos) in inputs.items():
            row: dict[str, Any] = {}
            out[f"n{n}"] = row
            try:
                fwd = lambda ids=ids, pos=pos: static.forward(ids, pos, CONTEXT)  # noqa: E731
                t0 = now()
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                with torch.cuda.stream(stream) if stream is not None else _null():
                    for _ in range(2):  # compiles here (compiled variants); lazy library set-up
                        fwd()
                    sync(device)
                row["warmup_s"] = round(now() - t0, 2)
                if device.type == "cuda":
                    graph = torch.cuda.CUDAGraph()
                    try:
                        graph.enable_debug_mode()
                    except Exception:  # noqa: BLE001 - only the kernel count needs it
                        pass
                    with torch.cuda.graph(graph, stream=stream):
                        logits = fwd()
                    graphs.append(graph)
                    try:
                        row["graph_nodes"] = graph_kernels(graph, tmp)
                        row["kernels_per_layer"] = round(row["graph_nodes"].get("KERNEL", 0) / static.n_layers, 1)
                    except Exception as e:  # noqa: BLE001
                        row["graph_nodes_error"] = repr(e)[:300]
                    call = graph.replay
                else:
                    logits = fwd()
                    call = fwd
                row.update(time_it(call, device, reps))
                row["over_floor"] = round(row["median_ms"] / floor_ms, 3)
                call()
                sync(device)
                got = logits.float().clone()
                if name == "base":
                    baseline[n] = got
                if n in baseline:
                    ref = baseline[n]
                    row["max_abs_diff_vs_base"] = float(f"{(got - ref).abs().max().item():.3g}")
                    row["max_abs_logit"] = round(ref.abs().max().item(), 3)
                    row["argmax_agree"] = round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 3)
                if n == 1:
                    row["profile"] = profile_kernels(fwd, device)
            except Exception as e:  # noqa: BLE001 - recorded, the next measurement goes on
                row["error"] = f"{type(e).__name__}: {e}"[:600]
                row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        graphs.clear()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    out["compile_s"] = round(sum(out.get(f"n{n}", {}).get("warmup_s", 0.0) for n in inputs), 2)
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def write(out_dir: Path, result: dict[str, Any]) -> None:
    (out_dir / "gpu_forward.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Static forward layouts ({result['device']}, torch {result['torch']})", "",
             f"copy bandwidth {result.get('bandwidth_tb_s', 0):.3f} TB/s (read + write); budget {result['budget_s']} s,"
             f" used {result.get('elapsed_s', 0)} s; prompt {PROMPT} tokens, context bucket {CONTEXT}", ""]
    for shape, info in result["shapes"].items():
        lines += [f"## {shape}: weights {info.get('weights_gb')} GB, floor {info.get('floor_ms')} ms", ""]
        if "vs_hf" in info:
            lines += [f"static `base` vs HF's forward, the prompt's last logits: {info['vs_hf']}", ""]
        if "error" in info:
            lines += [f"error: {info['error']}", ""]
        lines += ["| variant | 1 tok ms (p10-p90) | x floor | 8 tok ms (p10-p90) | x floor | compile s | kernels/layer"
                  " (1 tok) | max abs dlogits 1/8 | argmax agree 1/8 |", "|---|---|---|---|---|---|---|---|---|"]
        for v in info.get("variants", []):
            if "skipped" in v:
                lines.append(f"| {v['variant']} | skipped: {v['skipped']} | | | | | | | |")
                continue
            cells = [v["variant"]]
            for n in (1, 8):
                r = v.get(f"n{n}", {})
                if "median_ms" in r:
                    cells += [f"{r['median_ms']:.3f} ({r['p10_ms']:.3f}-{r['p90_ms']:.3f})", f"{r['over_floor']:.2f}"]
                else:
                    cells += [f"error: {r.get('error', '?')[:80]}", ""]
            r1, r8 = v.get("n1", {}), v.get("n8", {})
            cells += [str(v.get("compile_s")), str(r1.get("kernels_per_layer", "")),
                      f"{r1.get('max_abs_diff_vs_base', '')}/{r8.get('max_abs_diff_vs_base', '')}",
                      f"{r1.get('argmax_agree', '')}/{r8.get('argmax_agree', '')}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for v in info.get("variants", []):
            prof = v.get("n1", {}).get("profile")
            if prof:
                lines.append(f"- {v['variant']} eager 1-token forward: {prof['launches']} launches, "
                             f"{prof['total_ms']} ms busy; top: " + "; ".join(
                                 f"{t['name'][:50]} x{t['count']} {t['ms']} ms" for t in prof["top"][:6]))
        lines.append("")
    (out_dir / "gpu_forward.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--shapes", default=None, help="default 7b,13b (smoke: tiny)")
    parser.add_argument("--variants", default=None, help="default: all, cheap ones first")
    parser.add_argument("--reps", type=int, default=None, help="default 50 (smoke: 5)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--blas", default="default", choices=["default", "lt", "no-reduced"],
                        help="cuBLAS settings for the whole run (scripts/gpu_blas.py): lt = prefer cuBLASLt, "
                             "no-reduced = bf16 reductions in full precision")
    args = parser.parse_args()
    started = now()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = (args.shapes or ("tiny" if args.smoke else "7b,13b")).split(",")
    reps = args.reps or (5 if args.smoke else 50)
    phases = PHASES if args.variants is None else (args.variants.split(","),)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if args.blas == "lt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = args.blas != "no-reduced"
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "budget_s": args.budget_s, "smoke": args.smoke,
                              "shapes": {}, "reps": reps, "blas": args.blas}
    try:
        import triton  # noqa: F401 - recorded only

        result["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        bandwidth = copy_bandwidth(device)
        result["bandwidth_tb_s"] = round(bandwidth / 1e12, 4)
    except Exception as e:  # noqa: BLE001
        result["bandwidth_error"] = repr(e)
        bandwidth = 4.0e12
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    tmp = tempfile.mkdtemp(prefix="gpu_forward_")
    learned = 25.0  # the estimate of a compiled variant's time (3-16 s measured on an H200), raised to the longest seen
    models: dict[str, tuple[StaticLlama, dict[int, Any], dict[int, torch.Tensor]]] = {}
    torch.set_grad_enabled(False)
    with torch.inference_mode():
        for phase in phases:
            for shape in shapes:
                info = result["shapes"].setdefault(shape, {"variants": []})
                if "error" in info:
                    continue
                if shape not in models:
                    try:
                        t0 = now()
                        model = build(shape, device, dtype)
                        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                        embed_bytes = model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
                        static = StaticLlama(model, 1024 + 128, "base")
                        kv_bytes = 2 * static.n_layers * static.n_kv * CONTEXT * static.head_dim * model.dtype.itemsize
                        prompt = torch.randint(0, SHAPES[shape][5], (PROMPT,), device=device)
                        # the prompt's K/V; its last row checked against HF's own forward of the same model
                        ours = static.forward(prompt, torch.arange(PROMPT, device=device), CONTEXT)[-1].float()
                        hf = model(prompt[None]).logits[0, -1].float()
                        info["vs_hf"] = {"max_abs_diff": float(f"{(ours - hf).abs().max().item():.3g}"),
                                         "max_abs_logit": round(hf.abs().max().item(), 3),
                                         "argmax_same": bool(ours.argmax().item() == hf.argmax().item())}
                        del hf, ours
                        inputs = {n: (torch.randint(0, SHAPES[shape][5], (n,), device=device),
                                      torch.arange(PROMPT, PROMPT + n, device=device)) for n in (1, 8)}
                        sync(device)
                        info.update({"weights_gb": round(weight_bytes / 1e9, 3),
                                     "floor_ms": round(weight_bytes / bandwidth * 1000, 4),
                                     # what a forward must read: weights less the embedding (one row), plus K/V
                                     "floor_read_ms": round((weight_bytes - embed_bytes + kv_bytes) / bandwidth * 1000,
                                                            4),
                                     "build_s": round(now() - t0, 1)})
                        models[shape] = (static, inputs, {})
                    except Exception as e:  # noqa: BLE001
                        info["error"] = f"{type(e).__name__}: {e}"[:600]
                        info["traceback"] = traceback.format_exc()[-2000:]
                        write(out_dir, result)
                        continue
                static, inputs, baseline = models[shape]
                for label in phase:
                    # "NAME@SPLITS=4+BLOCK=32": the layout NAME with the Triton attention's settings forced
                    # (PIPESPEC_ATTN_SPLITS, _BLOCK, _WARPS, _STAGES; kernels/triton_attention.py)
                    name, _, forced = label.partition("@")
                    for key in ("SPLITS", "BLOCK", "WARPS", "STAGES"):
                        os.environ.pop(f"PIPESPEC_ATTN_{key}", None)
                    for item in filter(None, forced.split("+")):
                        key, _, value = item.partition("=")
                        os.environ[f"PIPESPEC_ATTN_{key.upper()}"] = value
                    elapsed = now() - started
                    estimate = ESTIMATE_S.get(name, learned) * (0.1 if args.smoke else 1)
                    if name not in VARIANTS:
                        info["variants"].append({"variant": name, "skipped": "unknown variant"})
                        continue
                    if elapsed + estimate > args.budget_s:
                        info["variants"].append({"variant": name, "skipped": f"budget ({elapsed:.0f} s used)"})
                        continue
                    print(f"{shape} {name} ...", flush=True)
                    try:
                        row = measure_variant(static, name, device, reps, inputs, baseline, info["floor_ms"], tmp)
                        row["variant"] = label
                    except Exception as e:  # noqa: BLE001
                        row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:600],
                               "traceback": traceback.format_exc()[-2000:]}
                    row["wall_s"] = round(now() - started - elapsed, 1)
                    if VARIANTS[name].compile and name not in ESTIMATE_S:  # what a compiled variant really takes
                        learned = max(learned, row["wall_s"])
                    info["variants"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k not in ("n1", "n8")} | {
                        f"n{n}": {k: row.get(f"n{n}", {}).get(k) for k in ("median_ms", "over_floor", "error",
                                                                             "kernels_per_layer")}
                        for n in (1, 8)}), flush=True)
                    result["elapsed_s"] = round(now() - started, 1)
                    write(out_dir, result)
    result["elapsed_s"] = round(now() - started, 1)
    write(out_dir, result)
    print((out_dir / "gpu_forward.md").read_text())


if __name__ == "__main__":
    main()
