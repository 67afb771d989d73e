"""The compiled tensor-parallel layout (``TPStaticLlama.set_variant`` with ``compile="layer"``: two compiled regions
per layer, each all-reduce eager between them) on two gloo ranks (float64) against the unsplit eager forward.

torch.compile runs with dynamo's "eager" backend: each region captured whole (fullgraph) and its FX graph run, with
dynamo's guards; "aot_eager" took ~60 s here and inductor's C++ build ~15 s a region on this 2-core CPU. One call
shape (a recompile for a new token count costs seconds more): the 1- and 8-token forwards, with inductor and its
automatic-dynamic recompile, run in ``scripts/gpu_tp.py --smoke`` (CPU) and on the GPU."""

from __future__ import annotations

import copy
import os

import torch

from helpers import two_ranks
from test_tensor_parallel import _tiny

WORLD = 2


def _rank(rank: int, store_path: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from torch._dynamo.testing import CompileCounterWithBackend

    from pipespec.workers.static_llama import StaticLlama
    from pipespec.workers.tensor_parallel import tp_from_model

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    store.set_timeout(timedelta(seconds=90))
    group = dist.ProcessGroupGloo(store, rank, WORLD, timeout=timedelta(seconds=90))  # built directly, as the runner
    result: dict = {}
    with torch.no_grad():
        for kind in ("llama",):  # every bias path: o's and down's added once, after the sums
            model = _tiny(kind)
            ref = StaticLlama(copy.deepcopy(model), 64, "lean-math")
            tp = tp_from_model(model, group, torch.device("cpu"), 64)
            counter = CompileCounterWithBackend("eager")
            tp.set_variant("compile-layer-math", backend=counter)
            # a prefill, then a rollback to 3 and as many tokens again (the same compiled graphs, no recompile)
            calls = [([5, 9, 1, 33, 2, 7], 0), ([40, 41, 42, 8, 3, 11], 3)]
            diff = 0.0
            for ids, start in calls:
                args = (torch.tensor(ids), torch.arange(start, start + len(ids)), 32)
                want, got = ref.forward(*args), tp.forward(*args)
                diff = max(diff, (want - got).abs().max().item())
            result[kind] = {"diff": diff, "graphs": counter.frame_count}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_compiled_ranks_match_the_unsplit_forward(tmp_path):
    two_ranks(_rank, tmp_path, timeout=90)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for kind, row in result.items():
            assert row["diff"] < 1e-9, (rank, kind, row)
            # both regions, the attention one twice (the first layer has no residual to add); fullgraph: a region
            # dynamo cannot capture raises instead of running eagerly
            assert row["graphs"] == 3, (rank, kind, row)


def test_layouts_of_a_rank():
    """Uncompiled layouts run no regions; "layer" compiles two; "parts" only the pre-attention."""
    from pipespec.workers.tensor_parallel import TPStaticLlama

    rank = TPStaticLlama.__new__(TPStaticLlama)  # set_variant reads nothing else of the instance
    rank.set_variant("lean-math")
    assert rank._regions is None and rank.variant.compile is None
    rank.set_variant("compile-layer-math")
    assert rank._regions is not None and all(hasattr(r, "_torchdynamo_orig_callable") for r in rank._regions)
    rank.set_variant("compile-parts")
    assert rank._regions is None and hasattr(rank._pre, "_torchdynamo_orig_callable")
