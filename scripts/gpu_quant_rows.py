"""How a quantized forward's time grows with the tokens it feeds, with and without chunking the GEMV (issue 14).

    python scripts/gpu_quant_rows.py OUT_DIR [--shapes 70b,7b] [--kind int8] [--rows 1,16,17,32,64,128]

Past 16 rows ``kernels.quant.linear`` used to take the torch path, which converts every weight to bf16 per call
(a 70B int8 verify of 63 tokens: 215 ms on an H200, against 22.6 ms for 8). Now up to ``CHUNKED_MAX_TOKENS`` rows it
runs the GEMV once per 16 rows. Per shape, a random-weight model in ``--kind`` built one layer at a time
(``gpu_quant.build``) under CUDA's default layout; per row count, the forward's median CUDA-graph replay with the
old limit (16: the torch path past it) and the new one; the max |logit difference| between the two. Writes
OUT_DIR/quant_rows.json and prints one line per measurement. Forwards start at position 384 of a 512-slot context
(``gpu_quant.time_forward``), so 128 rows still fit the model's capacity; more rows start earlier (512 from 0).

``--compare gemm``: "old" is the routing without the Triton GEMM (``kernels.triton_wgemm``: the GEMV once per 16 rows
up to ``CHUNKED_MAX_TOKENS``, then the torch path), "new" the GEMM at every count past 16 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_quant  # noqa: E402

from pipespec.kernels import quant  # noqa: E402
from pipespec.workers.static_llama import choose_variant  # noqa: E402


def first_eager_ms(static, n: int, device: torch.device, position: int) -> float:  # noqa: ANN001
    """Wall ms of one eager forward of ``n`` tokens at ``position`` (host sync included)."""
    ids = torch.arange(3, 3 + n, device=device) % static.embed.shape[0]
    pos = torch.arange(position, position + n, device=device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        static.forward(ids, pos, gpu_quant.CONTEXT)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shapes", default="70b,7b")
    parser.add_argument("--kind", default="int8")
    parser.add_argument("--rows", default="1,16,17,32,64,128")
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument("--device", default="cuda:0", help="cpu with --shapes smoke: a check of the script")
    parser.add_argument("--compare", choices=("chunk", "gemm"), default="chunk",
                        help="chunk: the GEMV limit at 16 (old) against CHUNKED_MAX_TOKENS (new); gemm: without the "
                             "Triton GEMM (old: GEMV chunks, then the torch path) against it past 16 rows (new)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        quant.set_backend("triton" if quant._triton_ok() else "torch")
    gpu_quant.LAYOUT = choose_variant(device, False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget_s
    rows = [int(r) for r in args.rows.split(",")]
    report: dict = {"layout": gpu_quant.LAYOUT, "kind": args.kind, "chunked_max": quant.CHUNKED_MAX_TOKENS, "runs": []}
    new_limit, gemm_rows = quant.CHUNKED_MAX_TOKENS, quant.gemm_rows()
    report["compare"] = args.compare
    for shape in args.shapes.split(","):
        if time.monotonic() > end:
            break
        t0 = time.monotonic()
        static = gpu_quant.build(shape, device, args.kind)
        print(f"{shape} {args.kind} built in {time.monotonic() - t0:.0f} s", flush=True)
        for n in rows:
            if time.monotonic() > end:
                break
            entry = {"shape": shape, "rows": n}
            try:
                position = max(0, min(384, gpu_quant.CONTEXT - n))  # a prompt's rows from its start
                if args.compare == "chunk":
                    quant.CHUNKED_MAX_TOKENS = 16
                else:
                    quant.GEMM_ROWS = (1 << 62, 0)  # off
                entry["old_ms"], old = gpu_quant.time_forward(static, n, device, position=position)
                quant.CHUNKED_MAX_TOKENS = new_limit
                if args.compare == "gemm":
                    quant.GEMM_ROWS = (17, 1 << 62)
                    # the first eager forward at this count: a new row bucket's tuning (and a first compile) in it
                    entry["first_new_ms"] = first_eager_ms(static, n, device, position)
                entry["new_ms"], new = gpu_quant.time_forward(static, n, device, position=position)
                quant.GEMM_ROWS = gemm_rows
                entry["max_abs_logit_diff"] = float((old.float() - new.float()).abs().max())
            except Exception as exc:  # noqa: BLE001 - recorded, the next one runs
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            quant.CHUNKED_MAX_TOKENS, quant.GEMM_ROWS = new_limit, gemm_rows
            report["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            (out / "quant_rows.json").write_text(json.dumps(report, indent=2))
        del static
        gpu_quant.free(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
