"""Weight-only 8-bit weights (pipespec.kernels): the round trip's error bound, the kernels agreeing with dequantize-
then-matmul, the quantized static forward equal to a model holding the dequantized weights, and a quantized chain
reproducing the same quantized target decoding alone (losslessness is relative to the quantized target)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import byte_tokenizer, hf_greedy, limit, run_interpreted, save_folder
from pipespec.errors import ConfigError
from pipespec.kernels.quant import (INT4_GROUP, QuantWeight, dequantize, linear, parse_quantize, quantize, set_backend,
                                    unpack_int4)
from pipespec.placement import estimate_bytes
from pipespec.workers import make_worker
from pipespec.workers.static import StaticWorker

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_copy(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """A copy of ``model`` whose linear weights are replaced by dequantize(quantize(w)): the reference the quantized
    static forward must equal (scales are per output row, so fusing q/k/v before quantizing changes nothing)."""
    ref = noisy_copy(model, 0.0, 0)
    with torch.no_grad():
        for layer in ref.model.layers:
            for mod in (*(getattr(layer.self_attn, n, None) for n in LINEARS), *(getattr(layer.mlp, n, None)
                                                                               for n in LINEARS)):
                if mod is not None:
                    mod.weight.copy_(dequantize(quantize(mod.weight, kind), mod.weight.dtype))
    return ref


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_round_trip_error_is_bounded(kind: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    w[5] = 0.0  # an all-zero row must survive (no division by zero)
    qw = quantize(w, kind)
    if kind == "int4":
        _check_int4_round_trip(w, qw, 128)
        return
    assert qw.q.dtype == (torch.int8 if kind == "int8" else torch.float8_e4m3fn) and qw.scale.shape == (64,)
    back = dequantize(qw)
    err = (back - w).abs()
    amax = w.abs().amax(dim=1, keepdim=True)
    if kind == "int8":  # rounding to the nearest of 255 evenly spaced levels: half a step
        assert (err <= amax / 127 / 2 * (1 + 1e-5) + 1e-12).all()
    else:  # e4m3: 3 significand bits (relative 2^-4), subnormals below 2^-6 of the top spaced 2^-9 of it
        assert (err <= torch.maximum(w.abs() * 2**-4, amax / 448 * 2**-9) * (1 + 1e-5) + 1e-12).all()
    assert back[5].abs().max() == 0
    assert qw.nbytes == 64 * 300 + 64 * 4


def _check_int4_round_trip(w: torch.Tensor, qw: QuantWeight, group: int) -> None:
    """int4: packed [out, in / 2] bytes, a scale per group (a shorter tail group), half a step of error per group."""
    out, k = w.shape
    groups = -(-k // group)
    assert qw.kind == "int4" and qw.group == group and qw.shape == (out, k)
    assert qw.q.dtype == torch.uint8 and qw.q.shape == (out, k // 2) and qw.scale.shape == (out, groups)
    q = unpack_int4(qw.q)
    assert q.abs().max() <= 7 and q.abs().max() == 7  # the symmetric range, and each group's max maps to +-7
    back = dequantize(qw)
    for g in range(groups):
        cols = slice(g * group, min(k, (g + 1) * group))
        amax = w[:, cols].abs().amax(dim=1, keepdim=True)
        assert torch.allclose(qw.scale[:, g:g + 1], (amax / 7).clamp(min=1e-12 / 7), rtol=1e-6)
        assert ((back[:, cols] - w[:, cols]).abs() <= amax / 7 / 2 * (1 + 1e-5) + 1e-12).all(), g
    assert back[5].abs().max() == 0
    assert qw.nbytes == out * k // 2 + out * groups * 4


def test_int4_groups_and_packing() -> None:
    torch.manual_seed(3)
    w = torch.randn(9, 200) * torch.logspace(-2, 1, 200)[None, :]  # groups of very different magnitude
    w[5] = 0.0
    for group in (16, 64, 128, 256):  # 200 = 12 x 16 + 8, 3 x 64 + 8, 128 + 72, one short group
        _check_int4_round_trip(w, quantize(w, "int4", group), group)
    qw = quantize(torch.tensor([[-1.0, 0.5, 7.0, -7.0]]), "int4", group=4)  # scale 1: q = -1, 0 (half to even), 7, -7
    assert qw.q.tolist() == [[(-1 + 8) | ((0 + 8) << 4), (7 + 8) | ((-7 + 8) << 4)]]  # even k low nibble
    for bad in (torch.randn(4, 7), torch.randn(4, 8)):  # odd K; and an odd group below
        with pytest.raises(ValueError, match="must be even"):
            quantize(bad, "int4", group=3 if bad.shape[1] == 8 else 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_backends_match_dequantize_then_matmul(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w, x, b = torch.randn(40, 96), torch.randn(3, 96).to(dtype), torch.randn(40).to(dtype)
    rel = 1e-5 if dtype == torch.float32 else 3 * 2**-8  # bf16: up to three roundings (matmul, scale, bias)
    for kind in ("int8", "fp8", "int4"):
        qw = quantize(w, kind, group=32)  # int4: 3 groups of 32 (the group is ignored for the 8-bit kinds)
        want = x.float() @ dequantize(qw).T + b.float()
        # int4's torch path rounds each dequantized weight to x's dtype first (as a model holding dequantize(w) in
        # bf16 would): a 2^-9 relative error per term, bounded by sum |x| |w|
        slack = 2**-8 * (x.float().abs() @ dequantize(qw).abs().T) if kind == "int4" and dtype != torch.float32 else 0
        for backend in ("torch", "int8pack", "auto"):
            set_backend(backend)
            try:
                got = linear(x, qw, b)
            finally:
                set_backend("auto")
            assert got.dtype == dtype and got.shape == (3, 40)
            assert ((got.float() - want).abs() <= rel * want.abs() + slack + 1e-3).all(), (kind, backend)
    assert torch.equal(linear(x.float(), w), torch.nn.functional.linear(x.float(), w))  # plain tensors untouched


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_quantized_static_forward_equals_dequantized_model(kind: str) -> None:
    model = tiny_llama(3, hidden=32)
    reference = _dequantized_copy(model, kind)
    worker = StaticWorker(model, "m", torch.device("cpu"), capacity=64, quantize=kind)
    layer = worker.static.layers[0]
    assert all(isinstance(layer[k], QuantWeight) for k in ("qkv", "o", "gate_up", "down"))
    # the bf16 (here float64) copies are gone from the HF modules: the memory really is freed
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    worker.reset(None, 64)
    seq = [5, 17, 33, 2, 9, 40, 41, 7]
    got = worker.logits(seq, 1)  # [len - 1, vocab] for positions 1..
    want = reference(torch.tensor([seq])).logits[0, :]
    assert torch.allclose(got.double(), want, atol=1e-8)
    plain = tiny_llama(3, hidden=32)(torch.tensor([seq])).logits[0, :]
    assert not torch.allclose(got.double(), plain, atol=1e-4)  # it did quantize


def test_hf_forward_refuses_to_quantize() -> None:
    with pytest.raises(ConfigError, match="only the static path quantizes"):
        make_worker(tiny_llama(1), "m", torch.device("cpu"), fast=False, quantize="int8")


@pytest.mark.parametrize(("kind", "spec", "per_model"), [("int8", "int8", ["int8"] * 3),
                                                     ("int4", "target=int4", [None, None, "int4"])])
@limit(120)
async def test_quantized_chain_equals_quantized_target_alone(target: torch.nn.Module, kind: str, spec: str,
                                                             per_model: list[str | None]) -> None:
    prompt, n = [5, 17, 33, 2, 9], 30
    want = hf_greedy(_dequantized_copy(target, kind), prompt, n)  # the quantized target decoding alone
    assert want != hf_greedy(target, prompt, n)  # ... which is not the bf16 target's output here
    models = [noisy_copy(target, 0.5, 1), noisy_copy(target, 0.2, 2), noisy_copy(target, 0.0, 3)]
    async with pipespec.Pipeline.load(models, device="cpu", fast=True, quantize=spec) as pipe:
        assert [m.worker.static.quantize for m in pipe.members] == per_model
        alone = await pipe.generate(prompt, max_new_tokens=n, mode="ar")
        assert list(alone.token_ids) == want
        for mode in ("pipe", "sd"):
            g = await pipe.generate(prompt, max_new_tokens=n, mode=mode)
            assert list(g.token_ids) == want, mode


@limit(120)
async def test_target_only_quantization(target: torch.nn.Module) -> None:
    prompt, n = [3, 1, 4, 1, 5], 24
    want = hf_greedy(_dequantized_copy(target, "fp8"), prompt, n)
    models = [noisy_copy(target, 0.3, 4), noisy_copy(target, 0.0, 5)]
    async with pipespec.Pipeline.load(models, device="cpu", fast=True, quantize="target=fp8") as pipe:
        assert [m.worker.static.quantize for m in pipe.members] == [None, "fp8"]
        for mode in ("ar", "pipe"):
            assert list((await pipe.generate(prompt, max_new_tokens=n, mode=mode)).token_ids) == want, mode


def test_spec_parser() -> None:
    assert parse_quantize(None, 3) == [None, None, None]
    assert parse_quantize("none", 2) == [None, None]
    assert parse_quantize("int8", 3) == ["int8"] * 3
    assert parse_quantize("target=fp8", 3) == [None, None, "fp8"]
    assert parse_quantize(" target = int8 ", 1) == ["int8"]
    assert parse_quantize("none,int8,fp8", 3) == [None, "int8", "fp8"]
    assert parse_quantize("int4", 2) == ["int4", "int4"] and parse_quantize("target=int4", 2) == [None, "int4"]
    for bad, match in [("int3", "unknown kind 'int3'"), ("int8,int8", "2 entries for 3 models"),
                       ("draft=int8", "target=KIND"), ("int5", "unknown kind 'int5'"),
                       ("target=int8,fp8", "target=KIND")]:
        with pytest.raises(ConfigError, match=match):
            parse_quantize(bad, 3)


def test_memory_estimate_accounts_for_quantized_weights(tmp_path: Path) -> None:
    # bf16 checkpoint: 1000 x 100 embedding + lm_head (untied) = 400 kB, the rest 600 kB of linear weights
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "vocab_size": 1000, "hidden_size": 100}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    assert estimate_bytes(str(tmp_path), 2) == 1_000_000
    assert estimate_bytes(str(tmp_path), 2, quantize="int8") == 400_000 + 300_000
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16", "vocab_size": 1000, "hidden_size": 100,
                                                      "tie_word_embeddings": True}))
    assert estimate_bytes(str(tmp_path), 2, quantize="fp8") == 200_000 + 400_000
    # int4: 400k weights at half a byte, plus a float32 scale per 128 of them
    assert estimate_bytes(str(tmp_path), 2, quantize="int4") == 200_000 + 200_000 + 400_000 * 4 // 128
    assert INT4_GROUP == 128  # the group size the estimate counts (placement may not import kernels)


def test_triton_kernel_in_the_interpreter() -> None:
    """Our GEMV's math on the CPU through Triton's interpreter (Triton is not a CI dependency: skipped without it).
    Run in a child process: TRITON_INTERPRET must be set before triton is imported."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels.quant import quantize, dequantize
from pipespec.kernels.triton_gemv import wgemv
torch.manual_seed(0)
for kind in ("int8", "fp8"):
    for m, dt in ((1, torch.bfloat16), (3, torch.float16), (16, torch.float32)):
        w, x, b = torch.randn(40, 200), torch.randn(m, 200).to(dt), torch.randn(40).to(dt)
        qw = quantize(w, kind)
        want = x.float() @ dequantize(qw).T + b.float()
        # one rounding to x's dtype at the end (2^-7 relative: the interpreter emulates bf16 by truncation)
        err = ((wgemv(x, qw.q, qw.scale, b).float() - want).abs() - 2**-7 * want.abs()).max().item()
        assert err < 1e-3, (kind, m, dt, err)
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_by_rows_hands_the_kernel_at_most_16_rows() -> None:
    """``quant.by_rows``: how ``linear`` serves 17..64 rows with a 16-row GEMV (one launch per 16 rows, not the torch
    path's whole-weight conversion per call). Every slice is at most 16 rows and the result is the whole product."""
    from pipespec.kernels.quant import by_rows

    w, seen = torch.randn(7, 5), []

    def gemv16(part: torch.Tensor) -> torch.Tensor:
        seen.append(part.shape[0])
        assert part.shape[0] <= 16
        return part @ w.T

    for n in (1, 16, 17, 40, 64):
        seen.clear()
        x = torch.randn(n, 5)
        assert torch.allclose(by_rows(gemv16, x, 16), x @ w.T)
        assert sum(seen) == n and len(seen) == -(-n // 16)


def test_chunked_linear_in_the_interpreter() -> None:
    """``linear`` on the ``triton`` backend past 16 rows (40: three launches) equals x @ dequant(W).T + b, int8 and
    fp8 (float32 in the interpreter), and int4 through its own GEMV (v1: the split-K int4 kernel's masks fail in
    Triton 3.9's interpreter, as ``test_int4_splitk_kernel_in_the_interpreter`` shows there)."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels import quant
torch.manual_seed(0)
quant.set_backend("triton")
for kind in ("int8", "fp8", "int4"):
    quant.set_gemv("v1" if kind == "int4" else "mixed")
    w, b = torch.randn(40, 256), torch.randn(40)
    qw = quant.quantize(w, kind)
    for m in (17, 40):
        x = torch.randn(m, 256)
        want = x @ quant.dequantize(qw).T + b
        err = (quant.linear(x, qw, b) - want).abs().max().item()
        assert err < 1e-3 * (1 + want.abs().max().item()), (kind, m, err)
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_gemm_kernel_in_the_interpreter() -> None:
    """Our GEMM (``triton_wgemm``, a prompt's rows) equals x @ dequant(q).T + b for odd shapes (M, N and K not
    multiples of the tiles, more row blocks than a group) with and without a bias, int8 and fp8 (float32: the
    interpreter's bf16 dots are wrong), and gives the same bits on a repeat; ``auto`` routes ``GEMM_ROWS`` to it on
    CUDA only (the CPU keeps the torch path)."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels import quant
from pipespec.kernels.triton_wgemm import row_bucket, wgemm
assert [row_bucket(m) for m in (1, 17, 64, 65, 700, 5000)] == [1, 32, 64, 128, 1024, 1024]
torch.manual_seed(0)
n, k = 37, 300
for kind in ("int8", "fp8"):
    qw = quant.quantize(torch.randn(n, k), kind)
    for m in (1, 16, 33, 70):
        x, b = torch.randn(m, k), torch.randn(n)
        for bias in (None, b):
            want = x @ quant.dequantize(qw).T + (0 if bias is None else bias)
            got = wgemm(x, qw.q, qw.scale, bias)
            err = (got - want).abs().max().item()
            assert err < 1e-3 * (1 + want.abs().max().item()), (kind, m, err)
            assert torch.equal(got, wgemm(x, qw.q, qw.scale, bias))
    quant.set_backend("wgemm")
    x = torch.randn(70, k)
    assert torch.allclose(quant.linear(x, qw), x @ quant.dequantize(qw).T, atol=1e-3, rtol=1e-3)
    quant.set_backend("auto")
assert quant.gemm_rows()[0] == 17  # past the GEMV's 16 rows (measured faster there: docs/benchmarks.md)
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemm_on_the_gpu_in_bf16() -> None:
    """On CUDA in bf16 (the interpreter checks float32 only): the GEMM equals x @ dequant(q).T + b within bf16's
    rounding at prompt-like row counts and 70B-like widths, repeats bit for bit, and ``auto`` takes it past 16
    rows (the same bits as calling it)."""
    pytest.importorskip("triton")
    from pipespec.kernels import quant
    from pipespec.kernels.triton_wgemm import wgemm

    torch.manual_seed(0)
    dev = torch.device("cuda", 0)
    for kind in ("int8", "fp8"):
        for n, k in ((1000, 8192), (4096, 1000)):
            qw = quant.quantize(torch.randn(n, k, device=dev) * 0.02, kind)
            b = torch.randn(n, device=dev, dtype=torch.bfloat16)
            for m in (17, 100, 700):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                want = x.float() @ quant.dequantize(qw).T + b.float()
                got = wgemm(x, qw.q, qw.scale, b)
                tol = 2**-7 * want.abs() + 1e-3 * (x.float().abs() @ quant.dequantize(qw).abs().T) + 1e-2
                assert ((got.float() - want).abs() <= tol).all(), (kind, n, k, m)
                assert torch.equal(got, wgemm(x, qw.q, qw.scale, b))
                if m >= quant.gemm_rows()[0]:
                    assert torch.equal(quant.linear(x, qw, b), got)


def test_gemm_rows_setting() -> None:
    """``PIPESPEC_WGEMM_ROWS``: "LO-HI", "LO-" (no upper end) or "off"; anything else a one-line ConfigError."""
    from pipespec.errors import ConfigError
    from pipespec.kernels.quant import _gemm_rows

    assert _gemm_rows("65-") == (65, 1 << 62)
    assert _gemm_rows("17-4096") == (17, 4096)
    lo, hi = _gemm_rows("off")
    assert lo > hi
    with pytest.raises(ConfigError, match="PIPESPEC_WGEMM_ROWS='many': use LO-HI"):
        _gemm_rows("many")


def test_splitk_kernel_in_the_interpreter() -> None:
    """v2 (split-K) equals x @ dequant(q).T + b for odd shapes (K, N not multiples of the tiles), with 1, 2 and 3
    splits and both int8 conversions, and gives the same bits on a repeat (the fixed-order reduction)."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels.quant import quantize, dequantize
from pipespec.kernels.triton_gemv import SplitKConfig, launch, plan, wgemv_splitk
torch.manual_seed(0)
n, k = 21, 300  # N % 16 != 0, K % 64 != 0
for kind in ("int8", "fp8"):
    w = torch.randn(n, k)
    qw = quantize(w, kind)
    for m, dt in ((1, torch.bfloat16), (5, torch.float16), (16, torch.float32)):
        x, b = torch.randn(m, k).to(dt), torch.randn(n).to(dt)
        want = x.float() @ dequantize(qw).T + b.float()
        runs = [(SplitKConfig(16, 64, 1), True), (SplitKConfig(32, 64, 3), True)]
        runs += [(SplitKConfig(16, 64, 2), False)] if kind == "int8" else []  # the cvt conversion
        for cfg, magic in runs:
            assert plan(k, cfg.block_k, cfg.split)[1] == cfg.split
            y = launch(x, qw.q, qw.scale, b, cfg, magic)
            err = ((y.float() - want).abs() - 2**-7 * want.abs()).max().item()
            assert err < 1e-3, (kind, m, dt, cfg, magic, err)
            if cfg.split == 3:
                assert torch.equal(y, launch(x, qw.q, qw.scale, b, cfg, magic)), "not deterministic"
        y = wgemv_splitk(x, qw.q, qw.scale, None)  # the custom op, no bias, its heuristic config
        assert ((y.float() - (want - b.float())).abs() - 2**-7 * want.abs()).max().item() < 1e-3 + 2**-7 * 8
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_int4_kernel_in_the_interpreter() -> None:
    """The int4 GEMV equals x @ dequantize(q).T + b: K a multiple of the group (4 steps of 32 per group of 128) and a
    tail group (K = 320 = 2 x 128 + 64), N not a multiple of BLOCK_N, bf16/fp16/fp32, 1-16 tokens; the same bits on
    a repeat; and linear() routes int4 to it under the triton backend with the v1 GEMV."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels import quant
from pipespec.kernels.quant import quantize, dequantize
from pipespec.kernels.triton_gemv import wgemv4
torch.manual_seed(0)
for n, k, group in ((21, 256, 128), (37, 320, 128), (5, 96, 32)):
    w = torch.randn(n, k) * torch.logspace(-1, 1, k)[None, :]  # groups of different magnitude
    qw = quantize(w, "int4", group)
    # bf16 only at one token: Triton 3.6's interpreter gets tl.dot on bf16 wrong (v1's int8 kernel too: ~1e10 off)
    for m, dt in ((1, torch.bfloat16), (3, torch.float16), (16, torch.float32)):
        x, b = torch.randn(m, k).to(dt), torch.randn(n).to(dt)
        want = x.float() @ dequantize(qw).T + b.float()
        y = wgemv4(x, qw.q, qw.scale, b, group)
        assert y.dtype == dt and y.shape == (m, n)
        # fp32 accumulation, one rounding to x's dtype at the end (2^-7 relative: the interpreter truncates bf16)
        err = ((y.float() - want).abs() - 2**-7 * want.abs()).max().item()
        assert err < 1e-3, (n, k, group, m, dt, err)
        assert torch.equal(y, wgemv4(x, qw.q, qw.scale, b, group)), "not deterministic"
        if m > 1:
            continue
        y0 = wgemv4(x, qw.q, qw.scale, None, group)  # no bias
        assert ((y0.float() - (want - b.float())).abs() - 2**-7 * want.abs()).max().item() < 1e-3 + 2**-7 * 8
quant.set_backend("triton")
quant.set_gemv("v1")
x = torch.randn(2, 96)
qw = quantize(torch.randn(5, 96), "int4", 32)
assert torch.equal(quant.linear(x, qw), wgemv4(x, qw.q, qw.scale, None, 32))
qw = quantize(torch.randn(5, 96), "int4", 48)  # not a multiple of 32: the torch path serves it
assert torch.equal(quant.linear(x, qw), torch.nn.functional.linear(x, dequantize(qw)))
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_int4_splitk_kernel_in_the_interpreter() -> None:
    """int4 split-K equals x @ dequantize(q).T + b at 1, 3, 8 and 16 tokens, N odd (21, 37), K whole groups (256 in
    groups of 32) and a tail group (320 in groups of 128), 1-3 splits and 1-4 groups a step, with and without bias;
    the same bits on a repeat (fixed-order reduction); linear() routes int4 to it by default."""
    pytest.importorskip("triton")
    code = """
import torch
from pipespec.kernels import quant
from pipespec.kernels.quant import quantize, dequantize
from pipespec.kernels.triton_gemv import SplitKConfig, launch, plan, wgemv4_splitk
torch.manual_seed(0)
for n, k, group in ((21, 256, 32), (37, 320, 128)):
    w = torch.randn(n, k) * torch.logspace(-1, 1, k)[None, :]  # groups of very different magnitude
    qw = quantize(w, "int4", group)
    ref = dequantize(qw, torch.float64)  # [N, K]
    # bf16 only at one token: Triton 3.6's interpreter gets tl.dot on bf16 wrong (see the v1 test above)
    for m, dt in ((1, torch.bfloat16), (3, torch.float16), (8, torch.float32), (16, torch.float16)):
        x, b = torch.randn(m, k).to(dt), torch.randn(n).to(dt)
        # fp32 accumulation (1e-6 of sum |x| |w|), one rounding to x's dtype (2^-7: the interpreter truncates bf16)
        want = x.double() @ ref.T + b.double()
        tol = 1e-6 * (x.double().abs() @ ref.abs().T) + (0 if dt == torch.float32 else 2**-7 * want.abs()) + 1e-6
        # one split of 4 groups a step or 1 (group 128); 3 splits (2 for K = 256: 128 a split) of 1-4 groups a step
        for cfg in (SplitKConfig(16, 128, 1), SplitKConfig(32, 128, 3)):
            y = launch(x, qw.q, qw.scale, b, cfg, group=group)
            assert y.dtype == dt and y.shape == (m, n)
            assert ((y.double() - want).abs() <= tol).all(), (n, k, group, m, dt, cfg)
        assert plan(k, 128, 3)[1] > 1 and torch.equal(y, launch(x, qw.q, qw.scale, b, cfg, group=group)), "not deterministic"
        if m in (3, 8):
            continue
        y = wgemv4_splitk(x, qw.q, qw.scale, None, group)  # the custom op (its heuristic config), no bias
        assert ((y.double() - want + b.double()).abs() <= tol + 2**-7 * b.double().abs()).all(), (n, k, group, m, dt)
quant.set_backend("triton")  # the default GEMV (mixed) takes int4 to split-K at every token count
x = torch.randn(3, 96)
qw = quantize(torch.randn(5, 96), "int4", 32)
assert torch.equal(quant.linear(x, qw), wgemv4_splitk(x, qw.q, qw.scale, None, 32))
print("ok")
"""
    out = run_interpreted(code)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_splitk_plan_and_heuristic() -> None:
    """The launcher's arithmetic, in pure Python: every split non-empty and BLOCK_K-aligned, the splits cover K,
    and the heuristic gives the big 70B shapes >= ~4 programs per SM without splitting below 4 steps."""
    triton_gemv = pytest.importorskip("pipespec.kernels.triton_gemv", exc_type=ImportError)
    for k in (64, 300, 4096, 11008, 28672):
        for bk in (64, 128, 256, 512):
            for split in (1, 2, 3, 4, 7, 16, 64):
                k_split, splits = triton_gemv.plan(k, bk, split)
                assert k_split % bk == 0 and 1 <= splits <= split
                assert (splits - 1) * k_split < k <= splits * k_split  # covers K, the last split not empty
    assert triton_gemv.plan(11008, 512, 4) == (3072, 4) and triton_gemv.plan(1000, 512, 4) == (512, 2)
    for m_bucket, n, k in [(1, 8192, 28672), (16, 8192, 28672), (1, 8192, 8192), (1, 57344, 8192),
                           (16, 10240, 8192), (1, 4096, 4096)]:
        cfg = triton_gemv.heuristic(m_bucket, n, k, sms=132)
        programs = -(-n // cfg.block_n) * triton_gemv.plan(k, cfg.block_k, cfg.split)[1]
        assert programs >= 4 * 132 or cfg.split == max(1, k // (4 * cfg.block_k)), (m_bucket, n, k, cfg)
        assert k // cfg.split >= 4 * cfg.block_k or cfg.split == 1
        assert cfg in triton_gemv.candidates(m_bucket, n, k, sms=132)
        for group in (32, 128, 256, 1024):  # int4: every step whole groups
            for c in triton_gemv.candidates(m_bucket, n, k, sms=132, group=group):
                assert c.block_k % group == 0 and c.block_k >= group, (group, c)
            assert triton_gemv.heuristic(m_bucket, n, k, 132, group) in triton_gemv.candidates(m_bucket, n, k, 132,
                                                                                               group)


def test_cli_refuses_a_bad_spec_in_one_line() -> None:
    from click.testing import CliRunner

    from pipespec.cli import main

    for args, match in [(["run", "-p", "hi", "--quantize", "int3"], "unknown kind 'int3'"),
                        (["chat", "--quantize", "int8,int8"], "2 entries for 3 models"),
                        (["bench", "--quantize", "draft=fp8"], "target=KIND")]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0], result.output


def test_cli_runs_int4_on_the_cpu(tmp_path: Path) -> None:
    """``pipespec run --quantize int4`` (every model) and ``target=int4`` on the CPU (torch backend): both print the
    int4 target's greedy decoding alone, which differs from the float target's."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from pipespec.cli import main

    tok = byte_tokenizer(300)
    target = tiny_llama(0, hidden=64, vocab=len(tok), dtype=torch.float32, scale=4.0)
    chain = ",".join([save_folder(noisy_copy(target, 0.4, 1), tok, tmp_path / "draft"),
                      save_folder(target, tok, tmp_path / "target")])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "target", dtype="float32")
    prompt = tok("def add(a, b):")["input_ids"]
    want = hf_greedy(_dequantized_copy(loaded, "int4"), prompt, 16)
    assert want != hf_greedy(loaded, prompt, 16)
    for spec in ("int4", "target=int4"):
        result = CliRunner().invoke(main, ["run", "--models", chain, "--prompt", "def add(a, b):", "--max-new-tokens",
                                           "16", "--device", "cpu", "--dtype", "float32", "--quantize", spec, "--json"])
        assert result.exit_code == 0, result.stderr
        got = json.loads(result.stdout)["token_ids"]
        assert got == want, spec


def test_bench_refuses_hf_baselines_with_quantize() -> None:
    from pipespec.apps.bench.run import BenchSettings

    with pytest.raises(ConfigError, match="HF baselines"):
        BenchSettings(models=("a", "b"), methods=("hf", "pipe"), quantize="int8").validate()
    BenchSettings(models=("a", "b"), methods=("ar", "pipe"), quantize="int8").validate()
