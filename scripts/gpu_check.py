"""Quick GPU correctness check: the built-in family on CUDA (static path + graphs) gives the same tokens in every
mode, greedy and coupled sampling; prints timings per mode.

    python scripts/gpu_check.py [DEVICES] [QUANTIZE]    # e.g. cuda:0,cuda:0,cuda:0 none,none,int8

QUANTIZE (``--quantize``'s spec): quantized weights for some stages, e.g. the target in int8; then a prompt of 40
tokens, so its forwards past 16 rows (the prefill, lock step's first verify) run the quantized GEMM."""

from __future__ import annotations

import asyncio
import sys
import time


import pipespec


async def main(devices: list[str], quantize: str | None) -> int:
    prompt = "def fibonacci(n):" if quantize is None else "def fibonacci(n):\n" + "    # a long comment line\n" * 6
    ok = True
    async with pipespec.Pipeline.load(["tiny-draft", "tiny-middle", "tiny-target"], device=devices,
                                      quantize=quantize) as pipe:
        print("workers:", [type(m.worker).__name__ for m in pipe.members], flush=True)
        for opts in ({}, {"temperature": 1.0, "seed": 3}):
            ids = {}
            for mode in ("ar", "sd", "pipe", "ar", "sd", "pipe"):
                t0 = time.perf_counter()
                g = await pipe.generate(prompt, max_new_tokens=128, mode=mode, **opts)
                dt = time.perf_counter() - t0
                ids.setdefault(mode, g.token_ids)
                ok &= ids[mode] == g.token_ids
                tgt = g.stats.stages[-1]
                print(f"{mode:4} {opts} {g.stats.tokens} tok {1000 * dt / g.stats.tokens:.2f} ms/tok "
                      f"target acc {tgt['accepted']}/{tgt['proposed']}", flush=True)
            same = ids["ar"] == ids["sd"] == ids["pipe"]
            print("identical across modes:", same, flush=True)
            ok &= same
    print("ALL OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    devs = sys.argv[1].split(",") if len(sys.argv) > 1 else ["cuda:0"] * 3
    sys.exit(asyncio.run(main(devs, sys.argv[2] if len(sys.argv) > 2 else None)))
