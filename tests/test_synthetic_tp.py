"""A synthetic-acceptance stage split tensor-parallel over two gloo ranks on the CPU (rank 0 here, one follower
process): the oracle's choices over ``TPStaticWorker``'s mirrored forwards. Same tokens as the unsplit synthetic
worker in every mode (the hashes survive the rollbacks), logits equal to the unsplit model's within float32
rounding, and the follower ends with its worker."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from pathlib import Path

import torch

from helpers import limit
from pipespec.analysis.oracle import Oracle
from pipespec.runners.thread import ThreadRunner
from pipespec.scheduler import Member, Pipeline
from pipespec.verify import SamplingParams
from pipespec.runners.tensor_parallel import build_synthetic_tp
from pipespec.workers.synthetic import SyntheticTPWorker, SyntheticWorker, build_synthetic, random_llama

TINY = {"tiny-d": (64, 1, 4, 4, 128, 512), "tiny-t": (128, 2, 4, 4, 256, 512)}  # hidden, layers, heads, kv, ffn, vocab
CPU = torch.device("cpu")


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether ``pid`` ended (gone or a zombie) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@limit(60)
async def test_tp_target_commits_the_unsplit_targets_tokens_in_every_mode() -> None:
    """{tiny-d, tiny-t} with tiny-t unsplit (ar), then split over ``cpu+cpu`` (``build_synthetic_tp`` on a thread
    runner, as the GPU probe builds it): ar, sd and pipe commit the unsplit chain's tokens for two oracles; the TP
    worker never drafts on the device, whatever ``configure`` asks. (Most of the time is the follower's fresh
    interpreter importing torch and transformers.)"""
    oracle = Oracle([0.7], seed=5, vocab=512)
    prompt = list(range(10, 26))
    outs: dict[str, list[tuple[int, ...]]] = {}
    pids: list[int] = []
    for kind in ("unsplit", "tp"):
        runners = [ThreadRunner(f"{kind}{i}", CPU) for i in range(2)]
        try:
            infos = [await runners[0].start(build_synthetic, "tiny-d", "cpu", oracle, 0, dims=TINY["tiny-d"],
                                            capacity=128)]
            if kind == "tp":
                infos.append(await runners[1].start(build_synthetic_tp, "tiny-t", ["cpu", "cpu"], oracle, 1,
                                                    dims=TINY["tiny-t"], capacity=128))
                tp = runners[1].worker
                assert isinstance(tp, SyntheticTPWorker) and tp.static.shard.world == 2
                pids = list(tp.follower_pids)
                await runners[1].call("configure", device_draft=True)
                assert tp.device_draft is False
                del tp
            else:
                infos.append(await runners[1].start(build_synthetic, "tiny-t", "cpu", oracle, 1, dims=TINY["tiny-t"],
                                                    capacity=128))
            assert await runners[1].call("warm_up") == 0  # mirrored on the TP stage (no graphs on the CPU)
            pipe = Pipeline([Member(info.name, r, info) for r, info in zip(runners, infos)], tokenizer=None)
            outs[kind] = []
            for alpha in (0.3, 0.9):
                for r in runners:  # another oracle: release() restarts the hashes (the follower needs nothing)
                    await r.call("configure", oracle=Oracle([alpha], seed=int(10 * alpha), vocab=512))
                for mode in ("ar", "sd", "pipe") if kind == "tp" else ("ar",):  # the oracle decides ar's tokens
                    g = await pipe.generate(prompt, max_new_tokens=20, mode=mode)
                    outs[kind].append(g.token_ids)
        finally:
            for r in runners:
                r.close()
    want_lo, want_hi = outs["unsplit"]
    assert outs["tp"] == [want_lo] * 3 + [want_hi] * 3 and want_lo != want_hi
    # the runner's thread ended: the follower (killed with it, PR_SET_PDEATHSIG) is gone
    assert pids and all(_gone(pid) for pid in pids)


@limit(60)
async def test_tp_worker_matches_the_unsplit_worker_call_by_call(tmp_path) -> None:
    """The same random weights unsplit (``SyntheticWorker``) and over two ranks (a ``SyntheticTPWorker`` built by
    ``load_tp_worker(make_worker=...)`` from the saved folder): every step's and draft's result equal, logits equal
    to float32 rounding, through a rollback, a release and a reset; the follower exits when the worker is dropped."""
    await asyncio.to_thread(_call_by_call, tmp_path)  # off the loop, so the time limit holds over blocking calls


def _call_by_call(tmp_path: Path) -> None:
    from pipespec.runners.tensor_parallel import load_tp_worker
    from pipespec.workers import synthetic

    synthetic.SHAPES["tiny-t"] = TINY["tiny-t"]
    oracle = Oracle([0.6], seed=9, vocab=512)
    params = SamplingParams()
    with torch.inference_mode():
        model = random_llama("tiny-t", ["cpu"], torch.float32)
        model.save_pretrained(tmp_path / "model")
        ref = SyntheticWorker(model, "ref", CPU, oracle, 1, capacity=64)
        tp = load_tp_worker(str(tmp_path / "model"), "tp", ["cpu", "cpu"], torch.float32, capacity=64,
                            make_worker=functools.partial(SyntheticTPWorker, oracle=oracle, stage=1))
        pid = tp.follower_pids[0]
        try:
            prompt = list(range(30, 42))
            for w in (ref, tp):
                w.reset(capacity=48)
                assert w.prefill(prompt)
            for w in (ref, tp):  # as a drafting stage; per-token drafts on both (the TP worker has no other kind)
                w.configure(stage=0, device_draft=False)
            drafts = [w.draft(prompt, 4, params) for w in (ref, tp)]
            assert drafts[0] == drafts[1]
            for w in (ref, tp):
                w.configure(stage=1)
            seq = prompt + list(drafts[0].tokens)
            assert ref.step(seq, len(prompt), params) == tp.step(seq, len(prompt), params)
            other = prompt + [7, 8, 9]  # a rollback to the prompt, other tokens fed
            assert ref.step(other, len(prompt), params) == tp.step(other, len(prompt), params)
            assert ref._hashes == tp._hashes and ref.cached == tp.cached
            want, got = ref.logits(other + [1, 2], len(other)), tp.logits(other + [1, 2], len(other))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for w in (ref, tp):
                w.release()
            torch.testing.assert_close(tp.logits([3, 4, 5], 1), ref.logits([3, 4, 5], 1), rtol=1e-4, atol=1e-4)
            for w in (ref, tp):
                w.reset(capacity=32)
            assert ref._hashes == tp._hashes == [oracle.root] and tp.cached == []
            assert ref.step(prompt + [5], len(prompt), params) == tp.step(prompt + [5], len(prompt), params)
        finally:
            del tp, w  # the loops' name holds it too
            gc.collect()
    assert _gone(pid)


def test_a_quantized_synthetic_target_is_built_layer_by_layer() -> None:
    """``"tiny-t:int8"``: the layers are materialised, fused and quantized one at a time (how a 70B in 8 bits is
    built on one H200); the HF modules keep no full-width copy, and the worker decodes the oracle's tokens."""
    from pipespec.kernels.quant import QuantWeight

    oracle = Oracle([0.9], seed=0, vocab=512)
    worker = build_synthetic("tiny-t:int8", "cpu", oracle, 1, dims=TINY["tiny-t"], capacity=64)
    assert worker.static.quantize == "int8"
    assert all(isinstance(layer[w], QuantWeight) for layer in worker.static.layers for w in ("qkv", "o", "down"))
    assert worker.model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    # on the CPU the quantized linear is one path at every size: no window limit (on CUDA: 15 proposals, the GEMV's
    # 16 rows; tests/test_simworker.py checks that stages keep within it)
    assert worker.describe().max_window is None
    plain = build_synthetic("tiny-t", "cpu", oracle, 1, dims=TINY["tiny-t"], capacity=64)
    prompt = list(range(1, 9))
    for w in (worker, plain):
        w.prefill(prompt)
    params = SamplingParams()
    assert worker.step(prompt, len(prompt) - 1, params).tokens == plain.step(prompt, len(prompt) - 1, params).tokens
