"""``pipespec bench`` on the CPU with the built-in family: every method runs, the outputs agree, the files appear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import noisy_copy, tiny_llama
from helpers import byte_tokenizer, save_folder
from pipespec.apps.bench.report import METHODS, cut_at_eos
from pipespec.apps.bench.report import markdown, rows
from pipespec.cli import main

torch.set_num_threads(1)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def report() -> dict:
    code, out, err = invoke("bench", "--n", "2", "--max-new-tokens", "16", "--device", "cpu", "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON object on stdout


def test_every_method_runs_and_agrees(report: dict) -> None:
    assert list(report["methods"]) == list(METHODS)
    assert report["outputs_identical"] is True
    for name, m in report["methods"].items():
        assert m["identical"] is True, name
        assert m["tokens_per_second"] > 0, name
        assert m["tokens"] > 0 and len(m["per_prompt"]) == 2, name
    assert report["methods"]["hf"]["configuration"] == "dynamic cache, eager"  # CPU: plain generate
    assert report["methods"]["hf_assisted"]["assistant"] in ("tiny-draft", "tiny-middle")


def test_speedups_and_stage_statistics(report: dict) -> None:
    methods = report["methods"]
    for name, m in methods.items():
        for base in ("hf", "hf_assisted", "ar"):
            want = methods[base]["ms_per_token"] / m["ms_per_token"]
            assert m["speedup"][f"vs_{base}"] == pytest.approx(want, rel=1e-2), (name, base)
    for mode in ("sd", "pipe"):
        stages = methods[mode]["stages"]
        assert [s["model"] for s in stages] == ["tiny-draft", "tiny-middle", "tiny-target"]
        for s in stages[1:]:
            assert 0 <= s["accepted"] <= s["proposed"]
            if mode == "sd":
                # lock step always hands each verifier a window; in pipe a verifier checks only what its
                # predecessor produced in time, and with 2 x 16 tokens on 2 busy cores that can be nothing at all
                assert s["proposed"] > 0
            if s["proposed"]:
                assert 0 <= s["acceptance"] <= 1
                assert s["accepted_per_verification"] == pytest.approx(s["accepted"] / s["verifications"], abs=1e-3)
    assert methods["ar"]["stages"] is None
    for key in ("device", "date", "models", "prompts", "max_new_tokens", "commit", "torch", "transformers"):
        assert key in report
    assert report["extra"] == {}  # hf_eager is measured on CUDA only


def test_model_folders(tmp_path: Path) -> None:
    """The shape of the acceptance command: three model folders on disk, all five methods, greedy outputs agree."""
    tok = byte_tokenizer(300)
    target = tiny_llama(0, hidden=48, vocab=len(tok), scale=4.0)
    chain = ",".join([save_folder(noisy_copy(target, 0.6, 2), tok, tmp_path / "a"),
                      save_folder(noisy_copy(target, 0.3, 1), tok, tmp_path / "b"),
                      save_folder(target, tok, tmp_path / "c")])
    code, out, err = invoke("bench", "--models", chain, "--n", "2", "--max-new-tokens", "32", "--device", "cpu",
                            "--json")
    assert code == 0, err
    data = json.loads(out)
    assert list(data["methods"]) == list(METHODS) and data["outputs_identical"] is True
    assert all(m["tokens_per_second"] > 0 for m in data["methods"].values())
    assert data["models"] == chain.split(",")


def test_files_without_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code, stdout, err = invoke("bench", "--n", "1", "--max-new-tokens", "8", "--placement", "cpu,cpu,cpu",
                               "--no-adaptive", "--methods", "ar,pipe", "--out", str(out))
    assert code == 0, err
    assert "pipespec bench" in stdout  # the Rich table
    data = json.loads((out / "bench.json").read_text())
    assert list(data["methods"]) == ["ar", "pipe"] and data["outputs_identical"] is True
    assert data["settings"]["adaptive"] is False
    md = (out / "bench.md").read_text()
    assert "| method |" in md and "| pipe |" in md
    assert (out / "bench.png").exists() or "bench.png skipped" in err


@pytest.mark.parametrize("args, message", [
    (["--methods", "ar,nope"], "unknown method"),
    (["--n", "0"], "--n must be >= 1"),
    (["--n", "99"], "asks for more prompts"),
    (["--prompts", "no-such-set"], "unknown prompt set"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--placement", "cpu,cpu"], "has 2 entries for 3 models"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    code, _, err = invoke("bench", "--device", "cpu", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_hf_baseline() -> None:
    """On CUDA, hf is the compiled static-cache generate and the eager figure is reported beside it."""
    code, out, err = invoke("bench", "--n", "2", "--max-new-tokens", "32", "--device", "cuda", "--dtype", "float32",
                            "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["methods"]["hf"]["configuration"] == "static cache, compiled"
    assert data["extra"]["hf_eager"]["tokens_per_second"] > 0
    assert data["outputs_identical"] is True, {k: m.get("identical") for k, m in data["methods"].items()}


def test_repeats_and_hf_in_child_processes() -> None:
    """--repeats R: R timed passes, the median reported with min and max; --hf-isolation process: hf and hf_assisted
    each run in a child process that loads the models itself, and still agree token for token with ar."""
    code, out, err = invoke("bench", "--n", "2", "--max-new-tokens", "8", "--device", "cpu", "--methods",
                            "hf,hf_assisted,ar", "--repeats", "3", "--hf-isolation", "process", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["settings"]["repeats"] == 3 and data["settings"]["hf_isolation"] == "process"
    assert data["outputs_identical"] is True, data["methods"]
    for name, m in data["methods"].items():
        passes = m["passes_ms_per_token"]
        assert len(passes) == 3, name
        assert m["ms_per_token_min"] <= m["ms_per_token"] <= m["ms_per_token_max"], name
        assert m["ms_per_token"] == pytest.approx(sorted(passes)[1], abs=1e-3), name  # the median of three
        assert m["unstable"] == [] and len(m["per_prompt"]) == 2, name
    assert data["methods"]["hf_assisted"]["assistant"] in ("tiny-draft", "tiny-middle")


def test_hf_child_process_failure_is_one_methods_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that dies is that method's failure, reported with its exit status; the other methods still run."""
    monkeypatch.setenv("PIPESPEC_TEST_HF_CHILD_CRASH", "1")
    code, out, err = invoke("bench", "--n", "1", "--max-new-tokens", "4", "--device", "cpu", "--methods", "hf,ar",
                            "--hf-isolation", "process", "--json")
    data = json.loads(out)
    assert code != 0
    assert "died (exit status" in data["methods"]["hf"]["error"]
    assert data["methods"]["ar"]["tokens"] > 0


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_repeats(args: list[str], message: str) -> None:
    code, _, err = invoke("bench", "--device", "cpu", *args)
    assert code == 2 and message in err


def test_cut_at_eos_keeps_the_eos() -> None:
    assert cut_at_eos([5, 6, 1, 7], {1}) == (5, 6, 1)
    assert cut_at_eos([5, 6], {1}) == (5, 6)


def test_report_rows_mark_failures_and_differences() -> None:
    report = {"date": "d", "commit": None, "torch": "t", "transformers": "x", "device": "cpu", "models": ["a", "b"],
              "prompts": {"source": "text", "count": 1, "tokens": [3]}, "max_new_tokens": 8, "dtype": "float32",
              "reference": "ar", "outputs_identical": False, "extra": {},
              "methods": {"ar": {"ms_per_token": 2.0, "tokens_per_second": 500.0, "tokens": 8, "identical": True,
                                 "speedup": {"vs_ar": 1.0}, "stages": None, "gpu": None},
                          "pipe": {"ms_per_token": 1.0, "tokens_per_second": 1000.0, "tokens": 8, "identical": False,
                                   "speedup": {"vs_ar": 2.0}, "gpu": {"util_percent": 40.0, "power_watts": 300.0},
                                   "stages": [{"acceptance": None, "accepted_per_verification": None},
                                              {"acceptance": 0.5, "accepted_per_verification": 2.0}]},
                          "hf": {"error": "failed: RuntimeError: boom", "identical": None}}}
    table = {r[0]: r for r in rows(report)}
    assert table["pipe"][5] == "2.00" and table["pipe"][6] == "NO" and table["pipe"][7] == "0.50"
    assert table["pipe"][9] == "40" and table["pipe"][10] == "300"
    assert table["hf"][1].startswith("failed")
    assert "outputs identical across methods: NO" in markdown(report)
