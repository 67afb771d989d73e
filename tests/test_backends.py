"""Every backend is lossless: the same chain, its workers in processes of their own (``runners.process``) or in Ray
actors on two simulated nodes (``runners.ray``), gives the target's own greedy tokens, the ar mode's sampled tokens
seed for seed (coupled rule) and the target's distribution (rejection rule: the proposer's probability rows cross
from one worker process to the next). A worker that dies or hangs ends the generation with one ``PipelineError``
that names the stage, at once; closing leaves no process behind.

The thread backend is tested the same way by test_pipeline.py, test_sampling.py and test_reliability.py.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import hf_greedy, limit, save_folder, sigint_default, slow
from pipespec.errors import PipelineError
from pipespec.runners import Backend
from pipespec.verify import SamplingParams
from test_sampling import PROMPT3, assert_matches, exact_two_token_distribution, vocab3_chain

PROMPT = [5, 17, 33, 2, 9, 41]


def children() -> set[int]:
    """Live (not zombie) child processes of this process, from /proc (psutil is not a dependency)."""
    me, out = str(os.getpid()), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            out.add(int(entry))
    return out


def target_of(folders: list[str]) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folders[-1], dtype=torch.float64).eval()


@limit(240)
async def test_process_backend_is_lossless_greedy_and_coupled(folder_chain: list[str]) -> None:
    """Model folders (conftest's, float64: window shapes cannot flip an argmax), loaded in each child."""
    expected = hf_greedy(target_of(folder_chain), PROMPT, 24)
    before = children()
    async with pipespec.Pipeline.load(folder_chain, device="cpu", dtype="float64", backend="process") as pipe:
        assert len(children() - before) == 3
        for mode in ("pipe", "sd", "ar"):
            g = await pipe.generate(PROMPT, max_new_tokens=24, mode=mode)
            assert list(g.token_ids) == expected, mode
        assert g.stats.stages[-1]["busy_seconds"] > 0  # the child's time inside calls comes back
        for temperature, top_k, seed in [(1.0, 0, 0), (0.7, 10, 1), (1.3, 0, 2)]:
            opts = dict(max_new_tokens=16, temperature=temperature, top_k=top_k, seed=seed)
            alone = await pipe.generate(PROMPT, mode="ar", **opts)
            for mode in ("pipe", "sd"):
                assert (await pipe.generate(PROMPT, mode=mode, **opts)).token_ids == alone.token_ids, (mode, seed)
    assert children() == before


# -- the rejection rule: rows made in one worker process, read in the next ------------------------------------------

REJECTION_SAMPLES = 1000


@pytest.mark.slow
@limit(300)
async def test_process_backend_rejection_rule_keeps_the_targets_distribution() -> None:
    """The unrelated draft of test_sampling.py (mostly rejections and residual samples); model objects, pickled into
    the children. Half the samples in pipe mode (rows handed on asynchronously; how many the target checks depends
    on timing), half in lock step (sd: every generation's tokens are verified by the middle and the target, so rows
    surely cross processes); both are the target's distribution, so the pooled counts must be too. The pooled
    sample's power: ``test_the_smaller_sample_still_catches_a_5_percent_error``."""
    models = vocab3_chain(10.0)
    params = SamplingParams(temperature=1.0, acceptance="rejection")
    exact = exact_two_token_distribution(models[-1], params)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False, backend="process") as pipe:
        half = REJECTION_SAMPLES // 2
        in_pipe, _ = await sample_pairs(pipe, half, "pipe", params)
        in_sd, checked = await sample_pairs(pipe, half, "sd", params, first_seed=half)  # independent of the first
    assert_matches(in_pipe + in_sd, exact)
    assert checked > REJECTION_SAMPLES // 4, checked


async def sample_pairs(pipe: pipespec.Pipeline, n: int, mode: str, params: SamplingParams,
                       first_seed: int = 0) -> tuple[torch.Tensor, int]:
    """test_sampling.py's counts of (x1, x2), over seeds ``first_seed`` .. ``first_seed + n - 1``."""
    counts = torch.zeros(3, 3, dtype=torch.float64)
    checked = 0
    for seed in range(first_seed, first_seed + n):
        g = await pipe.generate(PROMPT3, max_new_tokens=2, mode=mode, temperature=params.temperature,
                                seed=seed, acceptance=params.acceptance)
        counts[g.token_ids[0], g.token_ids[1]] += 1
        checked += g.stats.stages[-1]["proposed"]
    return counts, checked


def test_the_smaller_sample_still_catches_a_5_percent_error() -> None:
    """At REJECTION_SAMPLES, moving 5% of the mass between cells (TV = 0.05) gives an expected statistic that, minus
    3 standard deviations, is past the 0.001 critical value (test_sampling.py: 6000 samples catch 3%)."""
    from test_sampling import power_margin

    assert power_margin(REJECTION_SAMPLES, 0.05) > 1.0


# -- faults ---------------------------------------------------------------------------------------------------------

async def kill_mid_generation(pipe: pipespec.Pipeline, pid: int) -> tuple[PipelineError, float]:
    """Start a long generation, kill ``pid`` once tokens flow; the error and how long it took to arrive."""
    task = asyncio.create_task(pipe.generate(PROMPT3, max_new_tokens=400, mode="pipe"))
    while (snap := pipe.snapshot()) is None or snap.committed < 5:
        assert not task.done(), task
        await asyncio.sleep(0.01)
    os.kill(pid, 9)
    killed = time.perf_counter()
    with pytest.raises(PipelineError) as err:
        await task
    return err.value, time.perf_counter() - killed


@limit(120)
async def test_a_killed_worker_process_ends_the_generation_at_once() -> None:
    before = children()
    models = vocab3_chain(0.5)
    async with pipespec.Pipeline.load(models, device="cpu", fast=False, backend="process") as pipe:
        err, took = await kill_mid_generation(pipe, pipe.members[1].runner.pid)  # type: ignore[attr-defined]
        assert took < 1.0, took
        assert err.stage == 1 and str(err).startswith("stage 1 (") and "died" in str(err), err
        with pytest.raises(PipelineError, match="stage 1"):  # the pipeline stays closable; the stage stays dead
            await pipe.generate(PROMPT3, max_new_tokens=4)
    assert children() == before


@limit(120)
async def test_a_call_past_its_deadline_fails_the_generation_naming_stage_and_host() -> None:
    import socket

    models = vocab3_chain(0.5)
    models[-1] = slow(models[-1], 1.5)  # every forward pass of the target takes 1.5 s, its deadline is 0.5 s
    before = children()
    async with pipespec.Pipeline.load(models, device="cpu", fast=False,
                                      backend=Backend("process", deadline=0.5)) as pipe:
        started = time.perf_counter()
        with pytest.raises(PipelineError, match="missed its deadline") as err:
            await pipe.generate(PROMPT3, max_new_tokens=8)
        assert time.perf_counter() - started < 1.2 + 10  # the deadline, then draining the stuck call
        assert err.value.stage == 2 and f"stage 2 (" in str(err.value) and socket.gethostname() in str(err.value)
    assert children() == before


def test_ctrl_c_leaves_no_worker_processes(tmp_path: "os.PathLike[str]") -> None:
    """`pipespec run --backend process` interrupted mid-generation: exit code 130 and every child gone."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "pipespec", "run", "--models", "tiny-draft,tiny-middle,tiny-target",
                             "--device", "cpu", "--backend", "process", "--no-tui", "--max-new-tokens", "2000",
                             "--prompt", "def f(x):"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 120
        while len(grandchildren := _children_of(proc.pid)) < 3:  # the three workers are up
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        time.sleep(3.0)  # loading, maybe generating
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert not [pid for pid in grandchildren if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]


def _children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                    out.add(int(entry))
            except OSError:
                pass
    return out


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@limit(120)
async def test_a_model_that_cannot_load_fails_the_same_way_in_every_backend(tmp_path: "os.PathLike[str]") -> None:
    """The child's loading error comes back as the same ModelLoadError line as in the thread backend."""
    from pathlib import Path

    from pipespec.errors import ModelLoadError

    folder = Path(tmp_path) / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')  # no weights
    messages = []
    for backend in ("thread", "process"):
        before = children()
        with pytest.raises(ModelLoadError) as err:
            await pipespec.Pipeline.load([str(folder)], device="cpu", backend=backend)
        messages.append(str(err.value))
        assert children() == before
    assert messages[0] == messages[1], messages
