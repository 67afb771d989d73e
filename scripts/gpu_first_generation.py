"""What a process's first long generation costs on a GPU, with capture ahead and without (issue 14).

    python scripts/gpu_first_generation.py OUT_DIR                  # one H200, ~2-3 minutes
    python scripts/gpu_first_generation.py OUT_DIR --smoke          # tiny shapes on the CPU: the same code

A ``pipespec run`` is one generation per process: ``Pipeline.warm_up`` runs a short one first, and capture ahead
(``workers.static.reachable``; ``PIPESPEC_CAPTURE_AHEAD=0`` turns it off) has ``StaticWorker.reset`` capture the
graphs the long generation will reach at larger context buckets, so it replays instead of running eagerly. The
built-in family's 512-token ``run`` measured 7.9x (``ar``) and 3.6x (``pipe``) faster with it; at 7B/13B shapes the
captures cost more (a capture runs the forward), and that was not measured.

Per chain ({68m,7b}, {68m,7b,13b} on cuda:0: random weights of real shapes, synthetic acceptance ``--alpha``), mode
and setting (capture ahead on / off), one FRESH process (no graph of an earlier run): load, warm up (as the CLI does),
then the first generation (``--prompt-len`` + ``--tokens``, traced: the stages' ``reset`` spans are where capture
ahead's captures run), then a second one with the same request (every shape captured by then: the floor). Reported:
the warm-up's, the first's and the second's seconds, the first's ``reset`` seconds per stage, and whether the
tokens are the same in both settings.

Writes OUT_DIR/first_generation.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SMOKE_SHAPES = {"tiny-d": (64, 1, 4, 4, 128, 512), "tiny-t": (128, 2, 4, 4, 256, 512)}
CHAINS = {"68m,7b": ("68m", "7b"), "68m,7b,13b": ("68m", "7b", "13b")}
SMOKE_CHAINS = {"tiny-d,tiny-t": ("tiny-d", "tiny-t")}


async def one(shapes: tuple[str, ...], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load the chain in this process, warm up, and time its first and second generation."""
    import torch

    from pipespec.analysis.oracle import Oracle
    from pipespec.runners.thread import ThreadRunner
    from pipespec.scheduler.pipeline import Pipeline
    from pipespec.scheduler.request import Member
    from pipespec.workers.synthetic import build_synthetic

    device = "cpu" if args.smoke else "cuda:0"
    vocab = 512 if args.smoke else 32000
    oracle = Oracle([args.alpha] * (len(shapes) - 1), seed=0, vocab=vocab)
    members = []
    for i, shape in enumerate(shapes):
        runner = ThreadRunner(f"{i}-{shape}", torch.device(device))
        info = await runner.start(build_synthetic, shape, device, oracle, i, dims=SMOKE_SHAPES.get(shape),
                                  capacity=2048)
        members.append(Member(shape, runner, info))
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    async with Pipeline(members, tokenizer=None) as pipe:
        request = pipe.make_request(prompt, max_new_tokens=args.tokens, mode=mode)
        t0 = time.perf_counter()
        await pipe.warm_up(request)
        t1 = time.perf_counter()
        passes = pipe._generations  # noqa: SLF001 - the warm-up's generations (a measuring tool's look)
        trace = Path(args.out) / f"trace-{'-'.join(shapes)}-{mode}-{args.label}.json"
        first = await pipe.generate(prompt, max_new_tokens=args.tokens, mode=mode, trace=str(trace))
        t2 = time.perf_counter()
        second = await pipe.generate(prompt, max_new_tokens=args.tokens, mode=mode)
        t3 = time.perf_counter()
    doc = json.loads(trace.read_text())
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    resets = {names.get(e["tid"], str(e["tid"])): round(e["dur"] / 1e6, 3) for e in doc["traceEvents"]
              if e.get("ph") == "X" and e["name"] == "reset"}
    return {"warm_up_s": round(t1 - t0, 3), "warm_up_generations": passes, "first_s": round(t2 - t1, 3),
            "second_s": round(t3 - t2, 3),
            "first_reset_s": resets, "tokens": len(first.token_ids), "same_twice": first.token_ids == second.token_ids,
            "ids": list(first.token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test of the script)")
    parser.add_argument("--modes", default="ar,pipe")
    parser.add_argument("--chains", default=None, help="';'-separated, e.g. '68m,7b;68m,7b,13b' (the default)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--timeout-s", type=float, default=150.0, help="per fresh process")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # CHAIN:MODE, in a child process
    parser.add_argument("--label", default="on", help=argparse.SUPPRESS)  # the child's setting, for its trace name
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = SMOKE_CHAINS if args.smoke else CHAINS
    if args.one:
        chain, mode = args.one.split(":")
        print(json.dumps(asyncio.run(one(table[chain], mode, args))))
        return
    chains = args.chains.split(";") if args.chains else list(table)
    rows = []
    for chain in chains:
        for mode in args.modes.split(","):
            got: dict[str, Any] = {}
            for ahead in ("1", "0"):  # on (the default), then off
                cmd = [sys.executable, __file__, args.out, "--one", f"{chain}:{mode}", "--tokens", str(args.tokens),
                       "--prompt-len", str(args.prompt_len), "--alpha", str(args.alpha),
                       "--label", "on" if ahead == "1" else "off"] + (["--smoke"] if args.smoke
                                                                                       else [])
                env = {**os.environ, "PIPESPEC_CAPTURE_AHEAD": ahead}
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
                    lines = done.stdout.strip().splitlines()
                    got[ahead] = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                        "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
                except subprocess.TimeoutExpired:
                    got[ahead] = {"error": f"timed out after {args.timeout_s} s"}
                print(chain, mode, "ahead" if ahead == "1" else "off",
                      {k: v for k, v in got[ahead].items() if k != "ids"}, flush=True)
            on, off = got["1"], got["0"]
            same = "ids" in on and "ids" in off and on["ids"] == off["ids"]
            rows.append({"chain": chain, "mode": mode, "ahead": on, "off": off, "identical": same})
    for row in rows:
        for key in ("ahead", "off"):
            row[key].pop("ids", None)
    Path(args.out, "first_generation.json").write_text(json.dumps(rows, indent=1))
    lines = ["on / off: capture ahead", "",
             "| chain | mode | warm-up generations (on / off) | warm-up s (on / off) | first s (on / off) | "
             "second s (on / off) | first's resets s (on) "
             "| identical |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on, off = r["ahead"], r["off"]
        def pair(k: str) -> str:
            return f"{on.get(k, '-')} / {off.get(k, '-')}"
        lines.append(f"| {r['chain']} | {r['mode']} | {pair('warm_up_generations')} | {pair('warm_up_s')} | "
                     f"{pair('first_s')} | {pair('second_s')} | "
                     f"{on.get('first_reset_s', on.get('error', '-'))} | {r['identical']} |")
    Path(args.out, "first_generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
