"""Per-forward latency of random-weight LLaMA models of real shapes: HF eager vs pipespec's static path (CUDA
graphs), against the memory-bandwidth floor measured on the same GPU.

    python scripts/gpu_latency.py --shapes 68m,7b,13b --json out.json

Batch 1, bf16, a 512-token prompt in the cache, 1 and 8 new tokens per forward (the verify window), median of
repeated runs. The floor is the weights' bytes over the copy bandwidth measured here (bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

COMPILE = True  # also measure the torch.compile'd variant

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab
    "68m": (768, 2, 12, 12, 3072, 32000),
    "160m": (768, 12, 12, 12, 3072, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2 ** 28, device=device, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000 / 20
    return 2 * src.numel() * src.element_size() / seconds


def build(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    for p in model.parameters():  # random, not zeros: zeros can run faster than real data
        p.data.normal_(0, 0.02)
    return model


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def measure(shape: str, device: torch.device, bandwidth: float, reps: int) -> dict:
    from transformers import DynamicCache

    from pipespec.workers.static import StaticWorker

    model = build(shape, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, 32000, (512,)).tolist()
    row = {"shape": shape, "weights_gb": round(weight_bytes / 1e9, 3),
           "floor_ms": round(weight_bytes / bandwidth * 1000, 3)}
    # HF eager, dynamic cache holding the prompt; crop back after every measured forward
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    for n in (1, 8):
        ids = torch.randint(0, 32000, (1, n), device=device)
        pos = torch.arange(512, 512 + n, device=device).unsqueeze(0)

        def hf_step() -> None:
            model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=n)
            cache.crop(-n)

        for _ in range(3):
            hf_step()
        row[f"hf_eager_{n}_ms"] = round(median_ms(hf_step, reps), 3)
    cache = None  # frees the KV cache (the closures above are done with it)
    # pipespec static path: CUDA graphs per (tokens, context) bucket; then the same with torch.compile'd layers
    for variant, compile_layers in (("graph", False), ("compiled", True)):
        if compile_layers and not COMPILE:
            continue
        worker = StaticWorker(model, shape, device, capacity=1024, compile=compile_layers)
        worker.reset(None, 1024)
        stream = torch.cuda.Stream(device)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            worker.prefill(prompt + [1])
            for n in (1, 8):
                extra = torch.randint(0, 32000, (n,)).tolist()
                seq = prompt + extra

                def static_step() -> None:
                    worker.logits(seq, len(seq) - n + 1)
                    worker.rollback(len(prompt))

                for _ in range(3):
                    static_step()
                worker.capture_pending()  # shapes met above become graphs (single-threaded here: safe)
                row[f"{variant}_{n}_ms"] = round(median_ms(static_step, reps), 3)
                row[f"{variant}_{n}_over_floor"] = round(row[f"{variant}_{n}_ms"] / row["floor_ms"], 2)
        row[f"{variant}_setup_s"] = round(time.perf_counter() - t0, 1)
        worker = None  # frees the static cache before the next variant
    for n in (1, 8):
        row[f"hf_eager_{n}_over_floor"] = round(row[f"hf_eager_{n}_ms"] / row["floor_ms"], 2)
    model = None
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="68m,7b,13b")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    global COMPILE
    COMPILE = not args.no_compile
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    bandwidth = copy_bandwidth(device)
    rows = []
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    for shape in args.shapes.split(","):
        row = measure(shape, device, bandwidth, args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "bandwidth_tb_s": bandwidth / 1e12,
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
