"""Weight-only quantized forwards on one GPU: latency of pipespec's static forward (CUDA graphs) in bf16 and with int8 /
fp8 / int4 weights under every quantized-linear kernel available, against the weight-bandwidth floor, plus the logit
error.

    python scripts/gpu_quant.py OUT_DIR [--smoke] [--budget 240] [--shapes 7b,13b,70b] [--bandwidth 4.2e12]

Random LLaMA-2-shaped weights are created on the GPU in bf16 layer by layer, from one seed per layer (so bf16 and
quantized models hold the same weights), through StaticLlama's ``prepare_layer`` hook: a layer is materialised,
fused and quantized before the next exists, so a 70B shape in 8 bits (~65 GiB) is built on one H200 although its
bf16 weights (~129 GiB) never fit beside anything. The 70B shape has no bf16 run and so no logit error.

Per (shape, variant): the forward of 1 and 8 tokens at a 512-slot context, captured in a CUDA graph after eager
warm-ups (which also autotune the Triton kernel), median of >= 20 replays timed with CUDA events; the floor is the
bytes of weights one forward reads (every linear, lm_head; 8-bit: scales included) over ``--bandwidth``
(H200 ~4.2 TB/s, lower than the 4.8 TB/s datasheet); max |logit difference| and top-1 agreement against bf16.
Variants: ``bf16``; ``int8/fp8 x triton`` (pipespec.kernels.triton_gemv); ``int8/fp8 x torch`` (gpt-fast's
F.linear(x, q.to(bf16)) * scale, eager); ``int8 x int8pack`` (torch._weight_int8pack_mm); ``int8 x torch+compile``
(the torch variant with StaticLlama.compile(): does inductor fuse the conversion?); ``int4 x triton``
(quant.linear's int4 GEMV: triton_gemv.wgemv4_splitk under the default GEMV, packed nibbles, a float32 scale per 128
inputs; its torch path dequantizes per call, too slow to be worth a forward here, so it appears in the one-linear
table only). Also one linear alone (the 7B gate_up, the largest weight) per kernel: GB/s of weight read; and with
``--gemv`` the GEMV alone per (N, K), int4 included: ``int4`` (wgemv4, v1's structure) against ``int4-splitk``
(tuned; its config in the last column) and ``int4-splitk-heur`` (its untuned config).

Every part runs under try/except (the error is recorded), a time budget skips what would not fit (and says so), and
results go to OUT_DIR/gpu_quant.json and gpu_quant.md as they come. ``--smoke`` runs tiny shapes on the CPU (eager
timings, the same code paths minus CUDA graphs and Triton) to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # gpu_latency's copy_bandwidth (also when imported)

from pipespec.kernels import quant  # noqa: E402
from pipespec.workers.static_llama import StaticLlama  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab (LLaMA-2)
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
    "70b": (8192, 80, 64, 8, 28672, 32000),
    "smoke": (64, 2, 4, 2, 128, 256),
}
BF16_FITS = {"7b", "13b", "smoke"}  # 70B in bf16 (129 GiB of weights) does not fit one H200 with anything else
VARIANTS = [(None, None, False), ("int8", "triton", False), ("fp8", "triton", False), ("int4", "triton", False),
            ("int8", "int8pack", False), ("int8", "torch", False), ("fp8", "torch", False), ("int8", "torch", True)]
TOKENS = (1, 8)
GEMV_NAMES: list[str] = []  # --gemv
GEMV_ONLY = False
CONTEXT = 512
REPLAYS = 30


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


LAYOUT = "base"  # the forward's layout (--variant)


def build(shape: str, device: torch.device, kind: str | None) -> StaticLlama:
    """A random-weight LLaMA of ``shape`` over pipespec's static forward, built one layer at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    gen = torch.Generator(device=device)

    def fill(module: torch.nn.Module, seed: int) -> None:
        module.to_empty(device=device)
        gen.manual_seed(seed)
        for name, p in module.named_parameters():
            if "norm" in name:
                p.data.fill_(1.0)
            else:  # random, not zeros: zeros can run faster than real data
                p.data.normal_(0, 0.02, generator=gen)

    fill(model.model.embed_tokens, 1)
    model.model.embed_tokens.weight.data.mul_(50)  # embeddings of unit-ish scale (0.02 * 50)
    fill(model.model.norm, 2)
    fill(model.lm_head, 3)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers are computed, not loaded
    layer_ids = {id(layer): i for i, layer in enumerate(model.model.layers)}
    return StaticLlama(model, CONTEXT + 16, LAYOUT, quantize=kind,
                       prepare_layer=lambda layer: fill(layer, 100 + layer_ids[id(layer)]))


def weight_bytes(static: StaticLlama) -> int:
    """Bytes one forward reads from weights: every layer's linears (quantized: with scales) and lm_head."""
    total = static.lm_head.numel() * static.lm_head.element_size()
    for w in static.layers:
        for key in ("qkv", "o", "gate_up", "down"):
            t = w[key]
            total += t.nbytes if isinstance(t, quant.QuantWeight) else t.numel() * t.element_size()
    return total


def time_forward(static: StaticLlama, n: int, device: torch.device,
                 position: int = CONTEXT - 16) -> tuple[float, torch.Tensor]:
    """Median ms of the forward of ``n`` tokens from ``position`` of a ``CONTEXT``-slot context (CUDA graph replays
    on CUDA, eager on the CPU), and its logits. ``position + n`` must stay within the model's capacity
    (``CONTEXT + 16`` as ``build`` makes it)."""
    ids = torch.arange(3, 3 + n, device=device) % static.embed.shape[0]
    pos = torch.arange(position, position + n, device=device)
    with torch.inference_mode():
        if device.type != "cuda":
            times = []
            for _ in range(REPLAYS):
                t0 = time.perf_counter()
                out = static.forward(ids, pos, CONTEXT)
                times.append((time.perf_counter() - t0) * 1000)
            return statistics.median(times), out
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # eager warm-ups: Triton autotunes here, never inside the capture
            for _ in range(3):
                static.forward(ids, pos, CONTEXT)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = static.forward(ids, pos, CONTEXT)
        for _ in range(3):
            graph.replay()
        ms = _median_replay_ms(graph)
        result = out.clone()
        del graph
        return ms, result


def _median_replay_ms(graph: Any) -> float:
    """Median ms of ``REPLAYS`` replays of ``graph``, each timed by CUDA events."""
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_linear(x: torch.Tensor, w: Any, device: torch.device) -> float:
    """Median ms of one linear (CUDA graph of 10 calls on CUDA)."""
    with torch.inference_mode():
        if device.type != "cuda":
            times = []
            for _ in range(REPLAYS):
                t0 = time.perf_counter()
                quant.linear(x, w)
                times.append((time.perf_counter() - t0) * 1000)
            return statistics.median(times)
        for _ in range(3):
            quant.linear(x, w)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                quant.linear(x, w)
        graph.replay()
        ms = _median_replay_ms(graph) / 10
        del graph
        return ms


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                           "layout": LAYOUT}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    try:  # does this torch have a kernel for _weight_int8pack_mm on this device?
        q = torch.ones(16, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(torch.ones(1, 32, dtype=torch.bfloat16, device=device), q,
                                  torch.ones(16, dtype=torch.bfloat16, device=device))
        env["int8pack"] = "available"
    except Exception as exc:  # noqa: BLE001
        env["int8pack"] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return env


def variant_name(kind: str | None, backend: str | None, compiled: bool) -> str:
    return "bf16" if kind is None else f"{kind}/{backend}" + ("+compile" if compiled else "")


def run(out_dir: Path, shapes: list[str], device: torch.device, budget: Budget, bandwidth: float) -> dict[str, Any]:
    report: dict[str, Any] = {"environment": environment(device), "bandwidth_bytes_per_s": bandwidth,
                              "context": CONTEXT, "replays": REPLAYS, "results": [], "linear": [], "gemv": [],
                              "skipped": [], "errors": []}
    save(out_dir, report)
    triton_ok = device.type == "cuda" and not str(report["environment"]["triton"]).startswith("unavailable")
    int8pack_ok = report["environment"]["int8pack"] == "available"

    def usable(kind: str | None, backend: str | None) -> str | None:
        if backend == "triton" and not triton_ok:
            return "Triton needs CUDA and an importable triton"
        if backend == "int8pack" and not int8pack_ok:
            return f"torch._weight_int8pack_mm: {report['environment']['int8pack']}"
        return None

    if GEMV_NAMES:
        gemv_ok = triton_ok or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                                and not str(report["environment"]["triton"]).startswith("unavailable"))
        try:
            gemv_part(report, GEMV_NAMES, device, budget, gemv_ok, lambda: save(out_dir, report))
        except Exception as exc:  # noqa: BLE001 - e.g. no triton: the GEMV table is empty, the rest runs
            report["errors"].append({"shape": "gemv", "variant": "*", "error": _err(exc)})
        save(out_dir, report)
        if GEMV_ONLY:
            return report
    linear_part(report, shapes, device, budget, usable)
    save(out_dir, report)
    # every shape's eager-kernel variants first, the torch.compile variant (slow to compile) last, on the first shape
    plan: list[tuple[str, str | None, list[tuple[str | None, bool]]]] = []
    for shape in shapes:
        by_kind: dict[str | None, list[tuple[str | None, bool]]] = {}
        for kind, backend, compiled in VARIANTS:
            if not compiled:
                by_kind.setdefault(kind, []).append((backend, compiled))
        plan += [(shape, kind, backends) for kind, backends in by_kind.items()]
    plan += [(shapes[0], kind, [(backend, True)]) for kind, backend, compiled in VARIANTS if compiled]
    references: dict[str, dict[int, torch.Tensor]] = {}
    for shape, kind, backends in plan:
        need = {"7b": 25, "13b": 35, "70b": 70}.get(shape, 1)  # seconds to build + measure one variant, roughly
        reference = references.setdefault(shape, {})
        if kind is None and shape not in BF16_FITS:
            report["skipped"].append({"shape": shape, "variant": "bf16",
                                      "why": "bf16 weights do not fit one GPU (floor reported)"})
            hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
            head_dim = hidden // heads
            per_layer = hidden * (heads + 2 * kv) * head_dim + hidden * hidden + 3 * hidden * ffn
            floor_bytes = 2 * (layers * per_layer + vocab * hidden)
            report["results"].append({"shape": shape, "variant": "bf16", "tokens": None, "ms": None,
                                      "weight_bytes": floor_bytes, "floor_ms": floor_bytes / bandwidth * 1000,
                                      "note": "not run: does not fit"})
            continue
        if budget.left() < need:
            report["skipped"].append({"shape": shape, "variant": kind or "bf16",
                                      "why": f"time budget: {budget.left():.0f} s left, ~{need} s needed"})
            continue
        t0 = time.monotonic()
        static = None
        try:
            static = build(shape, device, kind)
            wbytes = weight_bytes(static)
            build_s = time.monotonic() - t0
            for backend, compiled in backends:
                name = variant_name(kind, backend, compiled)
                why = usable(kind, backend)
                if why:
                    report["skipped"].append({"shape": shape, "variant": name, "why": why})
                    continue
                if budget.left() < need * (3 if compiled else 0.5):
                    report["skipped"].append({"shape": shape, "variant": name,
                                              "why": f"time budget: {budget.left():.0f} s left"})
                    continue
                try:
                    quant.set_backend(backend or "auto")
                    if compiled:
                        static.compile()
                    for n in TOKENS:
                        ms, logits = time_forward(static, n, device)
                        row: dict[str, Any] = {"shape": shape, "variant": name, "tokens": n, "ms": round(ms, 4),
                                               "weight_bytes": wbytes,
                                               "floor_ms": round(wbytes / bandwidth * 1000, 6),
                                               "build_s": round(build_s, 1),
                                               "x_floor": round(ms / (wbytes / bandwidth * 1000), 3)}
                        if kind is None:
                            reference[n] = logits.float()
                        elif n in reference:
                            ref = reference[n]
                            row["max_abs_logit_diff"] = float((logits.float() - ref).abs().max())
                            row["max_abs_logit_bf16"] = float(ref.abs().max())
                            row["top1_agree"] = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
                        report["results"].append(row)
                        print(json.dumps(row), flush=True)
                except Exception as exc:  # noqa: BLE001 - recorded, the next variant runs
                    report["errors"].append({"shape": shape, "variant": name, "error": _err(exc)})
                finally:
                    quant.set_backend("auto")
                    if compiled:
                        torch._dynamo.reset()
                save(out_dir, report)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building a shape
            report["errors"].append({"shape": shape, "variant": kind or "bf16", "error": _err(exc)})
        finally:
            del static
            free(device)
        save(out_dir, report)
    add_speedups(report)
    return report


def linear_part(report: dict[str, Any], shapes: list[str], device: torch.device, budget: Budget, usable: Any) -> None:
    """One linear alone, the 7B gate_up (22016 x 4096; smoke: the smoke shape's), per kernel: ms and GB/s."""
    hidden, _, _, _, ffn, _ = SHAPES["smoke" if shapes == ["smoke"] else "7b"]
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(2 * ffn, hidden, device=device, generator=gen, dtype=torch.float32).to(torch.bfloat16) * 0.02
        for n in TOKENS:
            x = torch.randn(n, hidden, device=device, generator=gen).to(torch.bfloat16)
            ms = time_linear(x, w, device)
            report["linear"].append({"variant": "bf16", "tokens": n, "ms": round(ms, 5),
                                     "GBps": round(w.numel() * 2 / ms / 1e6, 1)})
            for kind in quant.KINDS:
                qw = quant.quantize(w, kind)
                for backend in ("triton", "torch", "int8pack"):
                    if usable(kind, backend) or (backend == "int8pack" and kind != "int8") or budget.left() < 20:
                        continue
                    try:
                        quant.set_backend(backend)
                        ms = time_linear(x, qw, device)
                        err = float((quant.linear(x, qw).float() - x.float() @ quant.dequantize(qw).T).abs().max())
                        report["linear"].append({"variant": f"{kind}/{backend}", "tokens": n, "ms": round(ms, 5),
                                                 "GBps": round(qw.nbytes / ms / 1e6, 1), "max_abs_err": err})
                    except Exception as exc:  # noqa: BLE001
                        report["errors"].append({"shape": "linear", "variant": f"{kind}/{backend}",
                                                 "error": _err(exc)})
                    finally:
                        quant.set_backend("auto")
    except Exception as exc:  # noqa: BLE001
        report["errors"].append({"shape": "linear", "variant": "*", "error": _err(exc)})
    free(device)


GEMV_SHAPES = {  # name: (N, K) of q [N, K]
    "7b.qkv/o": (4096, 4096), "7b.gate": (11008, 4096), "7b.down": (4096, 11008),
    "70b.qkv": (10240, 8192), "70b.gate_up": (57344, 8192), "70b.down": (8192, 28672),
    "smoke.a": (37, 300), "smoke.b": (96, 200),
}
GEMV_TOKENS = (1, 4, 8, 16)


def time_fn(fn: Any, device: torch.device) -> float:
    """Median ms of ``fn()`` (CUDA graph of 10 calls after 3 eager ones, which autotune; CPU: eager calls)."""
    with torch.inference_mode():
        if device.type != "cuda":
            times = []
            for _ in range(min(REPLAYS, 3)):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            return statistics.median(times)
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn()
        graph.replay()
        ms = _median_replay_ms(graph) / 10
        del graph
        return ms


def gemv_part(report: dict[str, Any], names: list[str], device: torch.device, budget: Budget,
              triton_ok: bool, checkpoint: Any = lambda: None) -> None:
    """The weight-only GEMV alone, old (v1) against new (splitk: tuned; splitk-heur: its untuned config; splitk-cvt:
    int8 converted by cvt instead of the bit trick) and cuBLAS bf16, per (N, K) and token count: GB/s of weight read
    and the fraction of the measured copy bandwidth, the error against x @ dequant(q).T, and whether a repeat gives
    the same bits. ``dispatcher`` says which GEMV quant.linear calls."""
    if triton_ok:
        from pipespec.kernels import triton_gemv as tg  # noqa: PLC0415 - needs triton
    copy = None
    if device.type == "cuda":
        try:
            from gpu_latency import copy_bandwidth  # noqa: PLC0415 - scripts/ is sys.path[0] when a script runs

            copy = copy_bandwidth(device) / 2  # bytes read per second (the copy counts read + write)
        except Exception as exc:  # noqa: BLE001
            report["errors"].append({"shape": "gemv", "variant": "copy bandwidth", "error": _err(exc)})
    report["gemv_copy_read_Bps"] = copy
    report["gemv_dispatcher"] = f"{quant.gemv()} (PIPESPEC_WGEMV; quant.set_gemv)"
    gen = torch.Generator(device=device).manual_seed(0)
    for kind in quant.KINDS:
        for name in names:
            n, k = GEMV_SHAPES[name]
            if budget.left() < 15:
                report["skipped"].append({"shape": f"gemv {name}", "variant": kind,
                                          "why": f"time budget: {budget.left():.0f} s left"})
                continue
            try:
                w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                qw = quant.quantize(w, kind)
                ref_w = quant.dequantize(qw)  # [N, K] fp32
                if kind != "int8":
                    del w  # bf16 rows: once per shape (int8 pass)
                for m in GEMV_TOKENS:
                    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
                    want = x.float() @ ref_w.T
                    kernels: list[tuple[str, Any]] = []
                    if kind == "int8":
                        kernels.append(("bf16 cuBLAS", lambda: torch.nn.functional.linear(x, w)))
                    if triton_ok and kind == "int4":  # v1's structure (int4), split-K tuned / heuristic; q [N, K / 2]
                        kernels += [("int4", lambda: tg.wgemv4(x, qw.q, qw.scale, None, qw.group)),
                                    ("int4-splitk", lambda: tg.wgemv4_splitk_impl(x, qw.q, qw.scale, None, qw.group)),
                                    ("int4-splitk-heur", lambda: tg.launch(x, qw.q, qw.scale, None, tg.heuristic(
                                        1 if m == 1 else 16, n, k, _sms(device), qw.group), group=qw.group))]
                    elif triton_ok:
                        kernels += [("v1", lambda: tg.wgemv(x, qw.q, qw.scale)),
                                    ("splitk", lambda: tg.wgemv_splitk_impl(x, qw.q, qw.scale)),
                                    ("splitk-heur", lambda: tg.launch(x, qw.q, qw.scale, None, tg.heuristic(
                                        1 if m == 1 else 16, n, k, _sms(device)), True))]
                        if kind == "int8":
                            kernels.append(("splitk-cvt", lambda: tg.wgemv_splitk_impl(x, qw.q, qw.scale,
                                                                                         magic=False)))
                    for label, fn in kernels:
                        try:
                            ms = time_fn(fn, device)
                            nbytes = n * k * 2 if label.startswith("bf16") else qw.nbytes
                            with torch.inference_mode():
                                y1, y2 = fn(), fn()
                            row: dict[str, Any] = {
                                "shape": name, "N": n, "K": k, "kind": kind if label != "bf16 cuBLAS" else "bf16",
                                "kernel": label, "tokens": m, "ms": round(ms, 5),
                                "GBps": round(nbytes / ms / 1e6, 1),
                                "frac_copy": round(nbytes / ms * 1000 / copy, 3) if copy else None,
                                "max_abs_err": float((y1.float() - want).abs().max()),
                                "max_abs_want": float(want.abs().max()),
                                "repeat_equal": bool(torch.equal(y1, y2))}
                            if label in ("splitk", "int4-splitk"):
                                cfg = tg.chosen_config(x, qw.q, qw.scale, None, group=qw.group)
                                row["config"] = (f"BN{cfg.block_n} BK{cfg.block_k} split{cfg.split} "
                                                 f"w{cfg.num_warps} s{cfg.num_stages}")
                            report["gemv"].append(row)
                            print(json.dumps(row), flush=True)
                        except Exception as exc:  # noqa: BLE001 - recorded, the next kernel runs
                            report["errors"].append({"shape": f"gemv {name} M={m}", "variant": f"{kind}/{label}",
                                                     "error": _err(exc)})
                del qw, ref_w
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory
                report["errors"].append({"shape": f"gemv {name}", "variant": kind, "error": _err(exc)})
            free(device)
            checkpoint()  # on disk per shape: an outer timeout keeps what was measured


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def add_speedups(report: dict[str, Any]) -> None:
    bf16 = {(r["shape"], r["tokens"]): r["ms"] for r in report["results"] if r["variant"] == "bf16" and r["ms"]}
    for r in report["results"]:
        base = bf16.get((r["shape"], r["tokens"]))
        if base and r["ms"] and r["variant"] != "bf16":
            r["speedup_vs_bf16"] = round(base / r["ms"], 3)


def _err(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).strip()[:600]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    out = ["# Weight-only quantized forwards (scripts/gpu_quant.py)", "",
           f"{env.get('gpu', env['device'])}; layout {env.get('layout', 'base')}; torch {env['torch']}; triton {env['triton']}; "
           f"_weight_int8pack_mm: {env['int8pack']}; floor = weight bytes / "
           f"{report['bandwidth_bytes_per_s'] / 1e12:.1f} TB/s; context {report['context']} slots; median of "
           f"{report['replays']} CUDA-graph replays (CPU: eager calls).", "",
           "| shape | variant | tokens | ms | floor ms | x floor | vs bf16 | max abs dlogit (bf16 max) | top-1 agree |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        def f(key: str, fmt: str = "{:.3f}") -> str:
            return fmt.format(r[key]) if r.get(key) is not None else "-"
        dl = (f"{r['max_abs_logit_diff']:.3g} ({r['max_abs_logit_bf16']:.3g})" if "max_abs_logit_diff" in r else "-")
        out.append(f"| {r['shape']} | {r['variant']} | {r['tokens'] or '-'} | {f('ms')} | {f('floor_ms')} | "
                   f"{f('x_floor', '{:.2f}x')} | {f('speedup_vs_bf16', '{:.2f}x')} | {dl} | {f('top1_agree', '{:.2f}')} |")
    if report["linear"]:
        out += ["", "One linear (7B gate_up, 22016 x 4096; smoke: its own), CUDA graph of 10 calls (CPU: eager):", "",
                "| variant | tokens | ms | GB/s of weight | max abs err vs dequantized |", "|---|---|---|---|---|"]
        for r in report["linear"]:
            err = f"{r['max_abs_err']:.3g}" if "max_abs_err" in r else "-"
            out.append(f"| {r['variant']} | {r['tokens']} | {r['ms']:.4f} | {r['GBps']} | {err} |")
    if report.get("gemv"):
        copy = report.get("gemv_copy_read_Bps")
        out += ["", f"GEMV alone (CUDA graph of 10 calls; CPU: eager). Copy bandwidth (bytes read/s): "
                f"{copy / 1e9:.0f} GB/s" if copy else "GEMV alone (CPU: eager, no copy bandwidth)",
                f"quant.linear's Triton GEMV: {report.get('gemv_dispatcher')}", "",
                "| shape | N x K | kind | kernel | tokens | ms | GB/s | of copy | max abs err (max) | repeat equal | "
                "config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["gemv"]:
            frac = f"{r['frac_copy']:.0%}" if r.get("frac_copy") else "-"
            out.append(f"| {r['shape']} | {r['N']} x {r['K']} | {r['kind']} | {r['kernel']} | {r['tokens']} | "
                       f"{r['ms']:.4f} | {r['GBps']} | {frac} | {r['max_abs_err']:.3g} ({r['max_abs_want']:.3g}) | "
                       f"{r['repeat_equal']} | {r.get('config', '')} |")
    if report["skipped"]:
        out += ["", "Skipped:", ""] + [f"- {s['shape']} {s['variant']}: {s['why']}" for s in report["skipped"]]
    if report["errors"]:
        out += ["", "Errors:", ""] + [f"- {e['shape']} {e['variant']}: `{e['error'][:300]}`" for e in report["errors"]]
    return "\n".join(out) + "\n"


def save(out_dir: Path, report: dict[str, Any]) -> None:
    (out_dir / "gpu_quant.json").write_text(json.dumps(report, indent=2))
    (out_dir / "gpu_quant.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script itself")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; what does not fit is skipped")
    parser.add_argument("--shapes", default="7b,13b,70b")
    parser.add_argument("--variant", default="base", help="the static forward's layout (static_llama.VARIANTS), "
                        "e.g. compile-layer; its compiled variants then run on top of it")
    parser.add_argument("--kernels", default=None, help="only these kernels, e.g. 'triton' (bf16 always runs)")
    parser.add_argument("--no-linear", action="store_true", help="skip the one-linear table")
    parser.add_argument("--gemv", default=None, help="the GEMV table first, on these shapes (comma list of "
                        f"{', '.join(k for k in GEMV_SHAPES if not k.startswith('smoke'))}, or 'all')")
    parser.add_argument("--gemv-only", action="store_true", help="only the GEMV table (no forwards)")
    parser.add_argument("--bandwidth", type=float, default=4.2e12, help="bytes/s of the floor (H200: ~4.2e12)")
    args = parser.parse_args()
    global LAYOUT, VARIANTS, GEMV_NAMES, GEMV_ONLY
    LAYOUT = args.variant
    GEMV_ONLY = args.gemv_only
    if args.gemv or args.gemv_only:
        spec = args.gemv or "all"
        GEMV_NAMES = ([k for k in GEMV_SHAPES if k.startswith("smoke")] if args.smoke else
                      [k for k in GEMV_SHAPES if not k.startswith("smoke")] if spec == "all" else
                      [s.strip() for s in spec.split(",") if s.strip()])
        unknown = [g for g in GEMV_NAMES if g not in GEMV_SHAPES]
        if unknown:
            print(f"unknown GEMV shape(s) {unknown}: use {', '.join(GEMV_SHAPES)}", file=sys.stderr)
            return 2
    if args.kernels:
        keep = set(args.kernels.split(","))
        VARIANTS = [v for v in VARIANTS if v[1] is None or v[1] in keep]
    if args.no_linear:
        global linear_part
        linear_part = lambda *a, **k: None  # noqa: E731
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    if args.smoke:
        device, shapes = torch.device("cpu"), ["smoke"]
        if not args.kernels or "torch" in args.kernels:  # int4's build and logit error on the CPU (no Triton here)
            VARIANTS.append(("int4", "torch", False))
        global REPLAYS
        REPLAYS = 5
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke on the CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            print(f"unknown shape(s) {unknown}: use {', '.join(SHAPES)}", file=sys.stderr)
            return 2
    try:
        report = run(out_dir, shapes, device, budget, args.bandwidth)
    except Exception as exc:  # noqa: BLE001 - the report so far is on disk; say what stopped it
        print(f"gpu_quant: stopped: {_err(exc)}", file=sys.stderr)
        return 1
    save(out_dir, report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
