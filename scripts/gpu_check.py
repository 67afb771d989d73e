"""Quick GPU correctness check: the built-in family on CUDA (static path + graphs) gives the same tokens in every
mode, greedy and coupled sampling; prints timings per mode."""

from __future__ import annotations

import asyncio
import sys
import time


import pipespec


async def main(devices: list[str]) -> int:
    prompt = "def fibonacci(n):"
    ok = True
    async with pipespec.Pipeline.load(["tiny-draft", "tiny-middle", "tiny-target"], device=devices) as pipe:
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
    sys.exit(asyncio.run(main(devs)))
