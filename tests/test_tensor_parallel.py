"""Tensor parallelism (``workers.tensor_parallel``): the sharding arithmetic on fake shapes, and the sharded forward
on two gloo ranks (spawned processes, float64) against the unsharded ``StaticLlama``, across a rollback."""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch

from pipespec.errors import PipelineError
from pipespec.workers.tensor_parallel import Shard, plan_shard, refusal, shard_fused, tp_from_model
from helpers import two_ranks

WORLD = 2


# -- the arithmetic, pure ------------------------------------------------------------------------------------------


def test_70b_shape_over_two_ranks():
    # 64 heads, 8 kv heads, head_dim 128, ffn 28672
    s0, s1 = (plan_shard(r, 2, 64, 8, 128, 28672) for r in range(2))
    assert s0.q_rows() == (0, 4096) and s1.q_rows() == (4096, 8192)
    assert s1.kv_rows() == (512, 1024)
    # fused qkv: q 8192 rows, k 1024, v 1024
    assert s1.qkv_rows() == [(4096, 8192), (8192 + 512, 8192 + 1024), (9216 + 512, 9216 + 1024)]
    assert s1.o_cols() == (4096, 8192)
    assert s1.gate_up_rows() == [(14336, 28672), (28672 + 14336, 57344)]
    assert s1.down_cols() == (14336, 28672)


def test_every_row_and_column_kept_by_exactly_one_rank():
    h, kvh, hd, ffn, world = 12, 4, 8, 40, 4
    shards = [plan_shard(r, world, h, kvh, hd, ffn) for r in range(world)]
    for rows, total in ((lambda s: s.qkv_rows(), (h + 2 * kvh) * hd), (lambda s: s.gate_up_rows(), 2 * ffn),
                        (lambda s: [s.o_cols()], h * hd), (lambda s: [s.down_cols()], ffn)):
        kept = sorted(i for s in shards for a, b in rows(s) for i in range(a, b))
        assert kept == list(range(total))


def test_local_query_heads_read_local_kv_heads():
    h, kvh, world = 16, 4, 2
    group = h // kvh
    for r in range(world):
        s = plan_shard(r, world, h, kvh, 2, 8)
        q_heads = range(r * s.local_heads, (r + 1) * s.local_heads)
        kv_heads = range(r * s.local_kv, (r + 1) * s.local_kv)
        assert {j // group for j in q_heads} == set(kv_heads)


@pytest.mark.parametrize("sizes,world,word", [((64, 8, 28672), 16, "key/value heads"), ((6, 6, 16), 4, "attention"),
                                               ((8, 8, 30), 4, "MLP width"), ((8, 8, 8), 0, "at least one")])
def test_refused_with_one_line(sizes, world, word):
    reason = refusal(*sizes, world)
    assert reason is not None and word in reason and "\n" not in reason
    with pytest.raises(ValueError, match=word):
        plan_shard(0, world, sizes[0], sizes[1], 4, sizes[2])


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank 2"):
        plan_shard(2, 2, 8, 8, 4, 8)


def test_shard_fused_takes_the_planned_slices():
    h, kvh, hd, hidden, ffn = 4, 2, 3, 5, 6
    s = Shard(1, 2, h, kvh, hd, ffn)
    rows = (h + 2 * kvh) * hd
    w = {"qkv": torch.arange(rows * hidden).view(rows, hidden), "qkv_b": torch.arange(rows),
         "qk_norm": torch.arange(h + kvh).unsqueeze(1).expand(h + kvh, hd), "o": torch.arange(hidden * h * hd).view(
             hidden, h * hd), "o_b": torch.ones(hidden), "gate_up": torch.arange(2 * ffn).unsqueeze(1),
         "gate_up_b": None, "down": torch.arange(hidden * ffn).view(hidden, ffn), "down_b": None, "ln1": None,
         "ln2": None, "ffn": ffn}
    out = shard_fused(w, s)
    assert out["qkv_b"].tolist() == [6, 7, 8, 9, 10, 11, 15, 16, 17, 21, 22, 23]  # q heads 2-3, k head 1, v head 1
    assert out["qk_norm"][:, 0].tolist() == [2, 3, 5]
    assert torch.equal(out["o"], w["o"][:, 6:12]) and torch.equal(out["down"], w["down"][:, 3:6])
    assert out["gate_up"][:, 0].tolist() == [3, 4, 5, 9, 10, 11]
    assert out["o_b"] is w["o_b"] and out["ffn"] == 3


# -- the forward on two ranks ----------------------------------------------------------------------------------------


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "llama":  # with attention and MLP biases (LLaMA's optional ones): every bias path
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True, mlp_bias=True))
    elif kind == "qwen2":  # q/k/v biases, no o bias; tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:  # q/k norms, head_dim apart from hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=False))
    model = model.to(torch.float64).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with torch.no_grad():
        _compare(rank, store_path, out_dir)


def _compare(rank: int, store_path: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from pipespec.workers.static_llama import StaticLlama

    store = dist.FileStore(store_path, WORLD)
    store.set_timeout(timedelta(seconds=90))
    group = dist.ProcessGroupGloo(store, rank, WORLD, timeout=timedelta(seconds=90))  # a lost peer fails, not hangs
    worst = {}
    for kind in ("llama", "qwen2", "qwen3"):
        model = _tiny(kind)
        ref = StaticLlama(copy.deepcopy(model), 64)
        tp = tp_from_model(model, group, torch.device("cpu"), 64)
        assert tp.cache_k[0].shape[1] == 1  # this rank's kv heads only (2 over 2 ranks)
        calls = [([5, 9, 1, 33, 2, 7], 0), ([11, 3], 6), ([40, 41, 42], 3), ([8], 6)]  # the third rolls back to 3
        diff = 0.0
        for ids, start in calls:
            args = (torch.tensor(ids), torch.arange(start, start + len(ids)), 32)
            want, got = ref.forward(*args), tp.forward(*args)
            diff = max(diff, (want - got).abs().max().item())
            assert torch.allclose(want, got, rtol=1e-9, atol=1e-9), (kind, start, (want - got).abs().max())
        worst[kind] = diff
    torch.save(worst, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("layout", ["lean", "lean-math"])  # the CPU's default, and CUDA's (math attention)
def test_two_ranks_match_the_unsharded_forward(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("PIPESPEC_STATIC_VARIANT", layout)  # both ranks (the spawned one inherits it) and the reference
    two_ranks(_rank, tmp_path, timeout=60)
    for rank in range(WORLD):
        worst = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(worst) == {"llama", "qwen2", "qwen3"} and max(worst.values()) < 1e-9


# -- a stage split over two ranks: rank 0 here, a follower process replaying its calls -------------------------------


def test_tp_stage_matches_the_unsplit_worker(tmp_path):
    from pipespec.runners.tensor_parallel import load_tp_worker
    from pipespec.workers.static import StaticWorker

    model = _tiny("llama")
    model.save_pretrained(tmp_path / "model")
    cpu = torch.device("cpu")
    ref = StaticWorker(copy.deepcopy(model), "ref", cpu, capacity=64)
    with torch.inference_mode():
        tp = load_tp_worker(str(tmp_path / "model"), "tp", ["cpu", "cpu"], torch.float64, capacity=64)
        try:
            assert tp.describe().vocab_size == 64 and tp.static.cache_k[0].shape[1] == 1
            seq = [5, 9, 1, 33, 2, 7, 11, 3]
            calls = [(seq, 1), (seq + [4, 4], 8), (seq[:3] + [40, 41], 3), (seq[:3] + [40, 41, 8], 5)]  # a rollback
            for worker in (ref, tp):
                worker.reset(capacity=32)
            for s, first in calls:
                want, got = ref.logits(s, first), tp.logits(s, first)
                assert torch.allclose(want, got, rtol=1e-9, atol=1e-9), (first, (want - got).abs().max())
            for worker in (ref, tp):  # a new generation (a reset is mirrored too), from slot 0
                worker.reset(capacity=48)
            torch.testing.assert_close(tp.logits([1, 2], 1), ref.logits([1, 2], 1), rtol=1e-9, atol=1e-9)
            # a follower that dies fails rank 0's next call (instead of an all-reduce that waits): the mirror's
            # liveness check (one line naming the follower) or, where the death is not yet seen, gloo's reset pair
            pid = tp.follower_pids[0]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _state(pid) not in ("Z", None) and time.monotonic() < deadline:  # dead, not yet reaped
                time.sleep(0.02)
            with pytest.raises((PipelineError, RuntimeError), match="follower|reset by peer"):
                tp.logits([1, 2, 3], 2)
        finally:
            del tp  # its finaliser closes the follower's pipe: EOF ends it


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
