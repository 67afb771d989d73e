from __future__ import annotations

import pytest

from pipespec.errors import ConfigError
from pipespec.placement import (check_fits, devices_for, layer_assignment, parse_node_placement, parse_placement,
                                plan_placement, stage_devices)


def test_one_stage_per_gpu_when_there_are_enough() -> None:
    assert plan_placement(3, 4) == [0, 1, 2]
    assert plan_placement(3, 3) == [0, 1, 2]


def test_target_alone_and_smaller_ones_packed() -> None:
    assert plan_placement(3, 2) == [0, 0, 1]
    assert plan_placement(4, 3) == [0, 1, 0, 2]
    assert plan_placement(3, 1) == [0, 0, 0]


def test_parse_placement() -> None:
    assert parse_placement("0,0,1", 3, 2) == ["cuda:0", "cuda:0", "cuda:1"]
    assert parse_placement("cpu,0", 2, 1) == ["cpu", "cuda:0"]
    with pytest.raises(ConfigError, match="entries"):
        parse_placement("0,1", 3, 2)
    with pytest.raises(ConfigError, match="GPU 5"):
        parse_placement("0,5", 2, 2)
    with pytest.raises(ConfigError, match="not a GPU index"):
        parse_placement("x,0", 2, 2)


def test_devices_for_cpu_machine() -> None:
    assert devices_for(3, "auto", None, 0) == ["auto"] * 3
    assert devices_for(2, "cpu", None, 4) == ["cpu", "cpu"]
    assert devices_for(3, "auto", None, 2) == ["cuda:0", "cuda:0", "cuda:1"]


def test_parse_node_placement() -> None:
    from pipespec.placement import NodeSlot, gpu_shares, parse_node_placement

    slots = parse_node_placement("node1:0, node1:1,node2:cpu", 3)
    assert slots == [NodeSlot("node1", (0,)), NodeSlot("node1", (1,)), NodeSlot("node2")]
    assert [s.device for s in slots] == ["cuda:0", "cuda:0", "cpu"]  # inside an actor its one GPU is cuda:0
    assert gpu_shares(slots) == [1.0, 1.0, 0.0]
    # two stages naming one GPU of a node split it; a stage on two GPUs of its own asks for both
    assert gpu_shares(parse_node_placement("a:0,a:0,b:0+1", 3)) == [0.5, 0.5, 2.0]
    for bad, message in [("node1:0,node2:0", "2 entries for 3 models"), ("node1,a:0,b:0", "NODE:GPU"),
                         ("a:x,a:0,b:0", "not GPU indices"), ("a:0+0,a:1,b:0", "not GPU indices"),
                         (":0,a:0,b:0", "NODE:GPU")]:
        with pytest.raises(ConfigError, match=message):
            parse_node_placement(bad, 3)
    with pytest.raises(ConfigError, match="needs them to itself"):
        gpu_shares(parse_node_placement("a:0+1,a:1,b:0", 3))


def test_a_ray_node_placement_no_live_node_can_serve_fails_at_once() -> None:
    from pipespec.runners.ray import check_nodes

    alive = [{"CPU": 2.0, "node1": 100.0, "node:10.0.0.1": 1.0, "memory": 1e9},
             {"CPU": 2.0, "GPU": 1.0, "node2": 100.0, "accelerator_type:H200": 1.0}]
    check_nodes(parse_node_placement("node1:cpu,node2:0", 2), alive)
    with pytest.raises(ConfigError, match=r"no live Ray node has the resource 'node3' .* custom resources now: "
                                          r"node1, node2$"):
        check_nodes(parse_node_placement("node1:cpu,node3:0", 2), alive)
    with pytest.raises(ConfigError, match="node 'node1' has 0 GPU"):
        check_nodes(parse_node_placement("node1:0,node2:0", 2), alive)


SMI = "0, GPU-aaaa-1111, 81000\n1, GPU-bbbb-2222, 1000\n2, GPU-cccc-3333, 500\n"


def test_free_memory_from_nvidia_smi_follows_cuda_visible_devices() -> None:
    from pipespec.placement import smi_free_memory

    mib = 2**20
    assert smi_free_memory(SMI, None) == {"cuda:0": 81000 * mib, "cuda:1": 1000 * mib, "cuda:2": 500 * mib}
    assert smi_free_memory(SMI, "2,0") == {"cuda:0": 500 * mib, "cuda:1": 81000 * mib}
    assert smi_free_memory(SMI, "GPU-bbbb") == {"cuda:0": 1000 * mib}  # an abbreviated UUID
    assert smi_free_memory(SMI, "") == {}
    assert smi_free_memory(SMI, "MIG-xyz") is None  # cannot map: no check rather than a wrong one
    assert smi_free_memory("No devices were found", None) is None


def test_worker_processes_are_checked_without_a_cuda_context_here(monkeypatch) -> None:
    """With the workers elsewhere (the process backend), the check must not call mem_get_info (it would create a
    CUDA context in the parent on every GPU); without nvidia-smi it is skipped."""
    import torch

    from pipespec.placement import free_gpu_memory

    def context(*args: object) -> None:
        raise AssertionError("mem_get_info called")

    monkeypatch.setattr(torch.cuda, "mem_get_info", context)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert free_gpu_memory(workers_here=False) is None


def test_parse_placement_of_a_model_on_several_gpus() -> None:
    assert parse_placement("0,0,1+2", 3, 3) == ["cuda:0", "cuda:0", "cuda:1+cuda:2"]
    assert parse_placement("cpu, 3+1+0", 2, 4) == ["cpu", "cuda:3+cuda:1+cuda:0"]
    assert stage_devices("cuda:1+cuda:2") == ["cuda:1", "cuda:2"] and stage_devices("cpu") == ["cpu"]
    with pytest.raises(ConfigError, match="names a GPU twice"):
        parse_placement("0,1+1", 2, 2)
    with pytest.raises(ConfigError, match="GPU 2 but this machine has 2"):
        parse_placement("0,1+2", 2, 2)
    for bad in ("0+", "0+cpu", "+1"):
        with pytest.raises(ConfigError, match="GPU indices joined by"):
            parse_placement(f"0,{bad}", 2, 2)


def test_a_split_model_puts_its_share_on_each_gpu() -> None:
    gib = 2**30
    free = {"cuda:0": 40 * gib, "cuda:1": 40 * gib}
    check_fits([("draft", "cuda:0", 1 * gib), ("target", "cuda:0+cuda:1", 70 * gib)], free)  # 36 + 35 GiB
    with pytest.raises(ConfigError, match="draft, target need about 39.0 GiB on cuda:0"):
        check_fits([("draft", "cuda:0", 4 * gib), ("target", "cuda:0+cuda:1", 70 * gib)], free)
    with pytest.raises(ConfigError, match="target need about 70.0 GiB on cuda:0"):
        check_fits([("target", "cuda:0", 70 * gib)], free)


def test_layer_assignment_is_consecutive_and_even() -> None:
    assert layer_assignment(7, 2) == [0, 0, 0, 0, 1, 1, 1]
    assert layer_assignment(80, 4) == [d for d in range(4) for _ in range(20)]
    assert layer_assignment(3, 1) == [0, 0, 0]
