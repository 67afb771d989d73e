"""The Ray backend (``runners.ray``) on a local cluster of two simulated nodes, started once for this module: stages
pinned to different nodes by custom resources, the same lossless checks as the process backend
(test_backends.py), a killed actor and a missed deadline."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")

import pipespec  # noqa: E402
from helpers import hf_greedy, limit, slow  # noqa: E402
from pipespec.errors import ConfigError, PipelineError  # noqa: E402
from pipespec.placement import parse_node_placement  # noqa: E402
from pipespec.runners import Backend  # noqa: E402
from pipespec.verify import SamplingParams  # noqa: E402
from test_backends import PROMPT, kill_mid_generation, target_of  # noqa: E402
from test_sampling import assert_matches, exact_two_token_distribution, sample_pairs, vocab3_chain  # noqa: E402

# 600 samples catch a 6% TV error (the method: test_backends.py's test_the_smaller_sample_still_catches...)
RAY_SAMPLES = 600


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node1": 100}})
    c.add_node(num_cpus=2, resources={"node2": 100})
    # the actors unpickle test models (tests/helpers.py): they need this process's import path
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
             log_to_driver=False, logging_level="warning")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def on_nodes(placement: str, deadline: float = 120.0) -> Backend:
    return Backend("ray", deadline, nodes=tuple(parse_node_placement(placement, 3)))


@limit(300)
async def test_ray_backend_is_lossless_greedy_and_coupled(cluster: object, folder_chain: list[str]) -> None:
    expected = hf_greedy(target_of(folder_chain), PROMPT, 24)
    async with pipespec.Pipeline.load(folder_chain, dtype="float64",
                                      backend=on_nodes("node1:cpu,node2:cpu,node2:cpu")) as pipe:
        nodes = [m.runner.node for m in pipe.members]  # type: ignore[attr-defined]
        assert nodes[0].startswith("node1") and nodes[1].startswith("node2") and nodes[2].startswith("node2")
        assert nodes[0].split("node ")[-1] != nodes[1].split("node ")[-1]  # two Ray nodes, by node id
        for mode in ("pipe", "sd", "ar"):
            assert list((await pipe.generate(PROMPT, max_new_tokens=24, mode=mode)).token_ids) == expected, mode
        for temperature, seed in [(1.0, 0), (0.7, 1)]:
            opts = dict(max_new_tokens=16, temperature=temperature, seed=seed)
            alone = await pipe.generate(PROMPT, mode="ar", **opts)
            assert (await pipe.generate(PROMPT, mode="pipe", **opts)).token_ids == alone.token_ids, seed


@pytest.mark.slow
@limit(300)
async def test_ray_backend_rejection_rule_keeps_the_targets_distribution(cluster: object) -> None:
    """Rows go through Ray's object store from the draft's node to the middle's. Lock-step (sd) mode: every
    generation's first tokens are drafted, verified by the middle and then by the target, whatever the timing (in
    pipe mode, Ray's per-call cost lets the target decode most of these 2-token generations alone)."""
    models = vocab3_chain(10.0)
    params = SamplingParams(temperature=1.0, acceptance="rejection")
    exact = exact_two_token_distribution(models[-1], params)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False,
                                      backend=on_nodes("node1:cpu,node2:cpu,node2:cpu")) as pipe:
        counts, checked = await sample_pairs(pipe, RAY_SAMPLES, "sd", params)
    assert_matches(counts, exact)
    assert checked > RAY_SAMPLES // 5, checked


@limit(180)
async def test_a_killed_actor_ends_the_generation_at_once_naming_stage_and_node(cluster: object) -> None:
    async with pipespec.Pipeline.load(vocab3_chain(0.5), device="cpu", fast=False,
                                      backend=on_nodes("node1:cpu,node2:cpu,node1:cpu")) as pipe:
        runner = pipe.members[1].runner
        err, took = await kill_mid_generation(pipe, runner.pid)  # type: ignore[attr-defined]
        assert took < 1.0, took
        assert err.stage == 1 and str(err).startswith("stage 1 (") and "on node2" in str(err), err
        pids = [m.runner.pid for m in pipe.members]  # type: ignore[attr-defined]
    gone_by = time.monotonic() + 10.0  # ray.kill is asynchronous: the actors' processes go within seconds
    while [pid for pid in pids if os.path.exists(f"/proc/{pid}")] and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


@limit(180)
async def test_a_ray_call_past_its_deadline_fails_the_generation(cluster: object) -> None:
    models = vocab3_chain(0.5)
    models[-1] = slow(models[-1], 1.5)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False,
                                      backend=on_nodes("node1:cpu,node1:cpu,node2:cpu", deadline=0.5)) as pipe:
        with pytest.raises(PipelineError, match=r"stage 2 \(.*\) on node2 .* missed its deadline"):
            await asyncio.wait_for(pipe.generate([0, 2, 1, 1], max_new_tokens=8), 30)


@limit(60)
async def test_a_placement_on_an_unknown_node_fails_at_once(cluster: object, folder_chain: list[str]) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no live Ray node has the resource 'node9'"):
        async with pipespec.Pipeline.load(folder_chain, device="cpu", backend=on_nodes("node1:cpu,node2:cpu,node9:cpu")):
            pass
    assert time.monotonic() - started < 10
