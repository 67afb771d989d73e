"""Mode auto's choices remembered across processes (``scheduler.choices``): the store itself, a pipeline that reads
one back instead of probing, and the CLI (``run`` defaults to auto; a second command skips the probes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import limit
from pipespec.apps.simulate import simulated_pipeline
from pipespec.scheduler.choices import MAX_ENTRIES, ChoiceStore, default_dir
from pipespec.scheduler import pipeline as pipeline_module
from pipespec.scheduler.pipeline import WARM_UP_TOKENS, choice_parts

PROMPT = list(range(3, 19))
SCOPE = {"models": ["a", "b"], "devices": ["cpu", "cpu"]}
GREEDY = {"sampled": False, "lookahead": None}


def test_a_choice_is_read_back_by_a_new_store_with_the_same_key(tmp_path: Path) -> None:
    ChoiceStore(tmp_path / "c.json", SCOPE).put(GREEDY, "sd", "sd (lookahead 16): fastest", 16)
    found = ChoiceStore(tmp_path / "c.json", SCOPE).get(GREEDY)
    assert found is not None and (found.mode, found.reason, found.lookahead) == ("sd", "sd (lookahead 16): fastest", 16)
    # another placement, another kind of request, or --reprobe: nothing to read back
    assert ChoiceStore(tmp_path / "c.json", {**SCOPE, "devices": ["cpu", "cuda:0"]}).get(GREEDY) is None
    assert ChoiceStore(tmp_path / "c.json", SCOPE).get({**GREEDY, "sampled": True}) is None
    assert ChoiceStore(tmp_path / "c.json", SCOPE, reprobe=True).get(GREEDY) is None


def test_the_newest_choices_are_kept_and_a_new_one_replaces_the_old(tmp_path: Path) -> None:
    store = ChoiceStore(tmp_path / "c.json", SCOPE)
    for i in range(MAX_ENTRIES + 5):
        store.put({"n": i}, "pipe", f"#{i}", None)
    store.put({"n": MAX_ENTRIES + 4}, "ar", "again", None)
    choices = json.loads((tmp_path / "c.json").read_text())["choices"]
    assert len(choices) == MAX_ENTRIES
    assert store.get({"n": 4}) is None and store.get({"n": 5}) is not None
    assert store.get({"n": MAX_ENTRIES + 4}).mode == "ar"  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "choices": {}}', '["a list"]',
                                     '{"format": 1, "choices": {"k": {"mode": "fast", "reason": "?"}}}'])
def test_a_file_this_version_cannot_read_counts_as_empty_and_is_rewritten(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    store = ChoiceStore(path, SCOPE)
    assert store.get(GREEDY) is None
    store.put(GREEDY, "ar", "fastest", None)
    assert ChoiceStore(path, SCOPE).get(GREEDY).mode == "ar"  # type: ignore[union-attr]


def test_a_folder_that_cannot_be_written_costs_the_memory_not_the_generation(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the store's folder would have to be made inside a file (fails for root too)
    store = ChoiceStore(blocker / "pipespec" / "c.json", SCOPE)
    store.put(GREEDY, "ar", "fastest", None)  # no exception
    assert store.get(GREEDY) is None


def test_the_default_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIPESPEC_CACHE_DIR", str(tmp_path / "own"))
    assert default_dir() == tmp_path / "own"
    monkeypatch.delenv("PIPESPEC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "pipespec"


@limit(120)
async def test_a_pipeline_with_a_remembered_choice_runs_it_without_probing(tmp_path: Path) -> None:
    """The first pipeline probes and writes its choice; a second one (a later command) reads it and runs that mode
    from its first generation, with the same tokens; --reprobe probes again."""
    path = tmp_path / "c.json"
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        pipe.choices = ChoiceStore(path, SCOPE)
        first = await pipe.generate(PROMPT, max_new_tokens=40, mode="auto")
        assert "fastest in probes" in (first.stats.reason or "")
        assert pipe.preparing is None
    assert path.exists()
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        pipe.choices = ChoiceStore(path, SCOPE)
        generations = 0
        real = pipe._run  # noqa: SLF001 - counting the generations the choice costs

        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal generations
            generations += 1
            return await real(*args, **kwargs)

        pipe._run = counted  # type: ignore[method-assign]  # noqa: SLF001
        again = await pipe.generate(PROMPT, max_new_tokens=40, mode="auto")
        assert generations == 2  # the auto request and the chosen mode's generation: no probe
        assert again.stats.mode == first.stats.mode and again.token_ids == first.token_ids
        assert (again.stats.reason or "").startswith("remembered from the probes of ")
        assert first.stats.reason in (again.stats.reason or "") and "--reprobe" not in (again.stats.reason or "")
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        pipe.choices = ChoiceStore(path, SCOPE, reprobe=True)
        probed = await pipe.generate(PROMPT, max_new_tokens=40, mode="auto")
        assert "fastest in probes" in (probed.stats.reason or "") and probed.token_ids == first.token_ids


@limit(60)
async def test_probes_are_not_shown_as_the_generation() -> None:
    """While mode auto probes, ``snapshot`` shows no probe (a live view, or Ctrl-C's printout, would show a probe's
    text as the caller's); ``preparing`` says which probe runs."""
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        seen: list[tuple[object, str | None]] = []
        real = pipe._run  # noqa: SLF001

        async def watched(request, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append((pipe.snapshot(), pipe.preparing))
            return await real(request, *args, **kwargs)

        pipe._run = watched  # type: ignore[method-assign]  # noqa: SLF001
        g = await pipe.generate(PROMPT, max_new_tokens=30, mode="auto")
        probes = seen[1:-1]  # the auto request itself, the probes, the chosen mode's generation
        assert len(probes) >= 6 and all(snap is None for snap, _ in probes), seen
        assert [note for _, note in probes][:3] == ["mode auto: probe 1, ar", "mode auto: probe 2, sd:8",
                                                    "mode auto: probe 3, pipe"]
        assert pipe.preparing is None and pipe.snapshot() is not None and pipe.snapshot().committed == len(g.token_ids)


def test_the_request_parts_of_the_key() -> None:
    from pipespec.scheduler.request import Request
    from pipespec.verify import SamplingParams

    greedy = Request(prompt=(1, 2), max_new_tokens=8, mode="auto", params=SamplingParams(), lookahead_given=False)
    sampled = Request(prompt=(5,), max_new_tokens=99, mode="auto", params=SamplingParams(temperature=0.7),
                      lookahead_given=False)
    assert choice_parts(greedy)["sampled"] is False and choice_parts(sampled)["sampled"] is True
    assert choice_parts(greedy)["lookahead"] is None  # left unset: the tuned one is remembered
    # neither the prompt nor the length is part of it
    assert choice_parts(greedy) == choice_parts(Request(prompt=(9, 9, 9), max_new_tokens=500, mode="auto",
                                                        params=SamplingParams(), lookahead_given=False))


def test_run_defaults_to_auto_and_a_second_run_remembers(tmp_path: Path) -> None:
    """``pipespec run`` on the built-in family: the first command probes and says so in its JSON stats; the second
    runs the remembered mode with the same text; ``--reprobe`` probes again."""
    env = {**os.environ, "PIPESPEC_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "pipespec", "run", "--prompt", "def f(x):", "-n", "24", "--device", "cpu", "--json"]

    def run(*extra: str) -> dict:
        proc = subprocess.run(args + list(extra), capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first, second, third = run(), run(), run("--reprobe")
    assert "fastest in probes" in first["stats"]["reason"], first["stats"]
    assert second["stats"]["reason"].startswith("remembered from the probes of "), second["stats"]
    assert "(--reprobe probes again): " in second["stats"]["reason"]  # the CLI's words, named by the CLI's store
    assert "fastest in probes" in third["stats"]["reason"], third["stats"]
    assert first["stats"]["mode"] == second["stats"]["mode"] == first["stats"]["mode_chosen"]
    assert first["token_ids"] == second["token_ids"] == third["token_ids"]
    assert len(json.loads((tmp_path / "auto-choices.json").read_text())["choices"]) == 1


# -- warming up before a process's first generation (CUDA) -------------------------------------------------------


def _counting(pipe):  # type: ignore[no-untyped-def]
    runs: list[tuple[str, int, bool]] = []
    real = pipe._run  # noqa: SLF001

    async def counted(request, on_piece=None, trace=None, publish=True):  # type: ignore[no-untyped-def]
        if request.mode != "auto":
            runs.append((request.mode, request.max_new_tokens, publish))
        return await real(request, on_piece, trace, publish)

    pipe._run = counted  # noqa: SLF001
    return runs


@limit(120)
async def test_a_first_generation_on_cuda_is_preceded_by_a_short_unpublished_one(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``generate(warm_up=True)`` (what the CLI asks): on a pipeline with a model on CUDA that has run nothing yet,
    first WARM_UP_TOKENS tokens of the same request, unpublished, so the real one replays the graphs captured at its
    start; then never again. Lossless all the same. On the CPU, or with mode auto's probes run, nothing more."""
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        want = (await pipe.generate(PROMPT, max_new_tokens=40, mode="ar")).token_ids
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
        monkeypatch.setattr(pipeline_module, "_on_cuda", lambda members: True)
        runs = _counting(pipe)
        g = await pipe.generate(PROMPT, max_new_tokens=40, mode="pipe", warm_up=True)
        assert runs == [("pipe", WARM_UP_TOKENS, False), ("pipe", 40, True)] and g.token_ids == want
        assert pipe.preparing is None and pipe.snapshot().committed == 40  # type: ignore[union-attr]
        await pipe.generate(PROMPT, max_new_tokens=40, mode="sd", warm_up=True)
        assert runs[2:] == [("sd", 40, True)]  # warm already
    # mode auto with a remembered choice: the short run is of the chosen mode; with probes: none
    path = tmp_path / "c.json"
    ChoiceStore(path, SCOPE).put(choice_parts(pipe.make_request(PROMPT, mode="auto")), "sd", "sd: fastest", 4)
    for store, first in ((ChoiceStore(path, SCOPE), [("sd", WARM_UP_TOKENS, False)]), (None, None)):
        async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:
            pipe.choices = store
            runs = _counting(pipe)
            async for _ in pipe.stream(PROMPT, max_new_tokens=40, mode="auto", warm_up=True):
                pass
            assert pipe.snapshot().committed == 40  # type: ignore[union-attr]  # the generation, not a warm-up
            if first is not None:
                assert runs == first + [("sd", 40, True)], runs
            else:  # the probes ran (unpublished), then the generation, and no warm-up between them
                assert len(runs) >= 7 and not any(publish for *_, publish in runs[:-1]) and runs[-1][2], runs
    monkeypatch.undo()
    async with simulated_pipeline([0.3, 4.0], [0.9], seed=1, vocab=1000) as pipe:  # the CPU: nothing to warm
        runs = _counting(pipe)
        await pipe.generate(PROMPT, max_new_tokens=40, mode="pipe", warm_up=True)
        assert runs == [("pipe", 40, True)]
