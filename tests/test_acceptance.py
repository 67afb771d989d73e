"""Acceptance under sampling: a chain must not only be lossless, it must accept what the theory says it accepts.

A target that rejects every sampled draft and emits its own sample is lossless, and passes every distribution and
seed-for-seed test; these tests catch it.

- A draft equal to the target: every proposal is accepted, under both rules, in ``pipe`` and ``sd``, on both
  workers (HF's forward and the static-cache worker that LLaMA models get by default).
- A noisy draft, one proposal from a fixed context, through the workers' own ``draft`` and ``step``: the share of
  accepted proposals matches the exact expectation, computed here by hand from the two models' warped rows p
  (draft) and q (target): ``1 - TV(p, q)`` for the rejection rule and, for the coupled (Gumbel-max) rule,
  ``sum_x 1 / sum_y max(p_y / p_x, q_y / q_x)`` (x wins both races: Gumbel-max with weights c_y = max(...)), which
  is at least the ``(1 - TV) / (1 + TV)`` of docs/sampling.md. Hoeffding's bound gives the tolerance: the test
  fails by chance with probability at most 1e-6 per check (deterministic anyway: fixed seeds).
"""

from __future__ import annotations

import math

import pytest
import torch

import pipespec
from conftest import noisy_copy, tiny_llama
from helpers import limit, slow
from pipespec.workers import make_worker
from pipespec.verify import SamplingParams, warp_logits

V = 6
PROMPT = [1, 4, 2, 5, 0, 3]
TRIALS = 1500
FALSE_FAILURE = 1e-6
# Hoeffding: P(|mean - E| >= eps) <= 2 exp(-2 n eps^2) for n Bernoulli trials
EPS = math.sqrt(math.log(2 / FALSE_FAILURE) / (2 * TRIALS))  # 0.070 for 1500 trials


def next_token_rows(model: torch.nn.Module, params: SamplingParams) -> torch.Tensor:
    """The model's warped distribution of the token after PROMPT, by HF's own forward: [V] float64."""
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT])).logits[0, -1:]
    return torch.softmax(warp_logits(logits, params).double(), -1)[0]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p - q).abs().sum() / 2)


def gumbel_agreement(p: torch.Tensor, q: torch.Tensor) -> float:
    """P(argmax(log p + g) == argmax(log q + g)) for shared standard Gumbel noise g, in closed form.

    Both pick x iff g_y + log c_y < g_x for every y != x, with c_y = max(p_y / p_x, q_y / q_x) (c_x = 1): that is
    the Gumbel-max event "x is the argmax of log c + g", of probability c_x / sum_y c_y = 1 / sum_y c_y."""
    total = 0.0
    for x in range(len(p)):
        if p[x] > 0 and q[x] > 0:
            total += 1.0 / float(torch.maximum(p / p[x], q / q[x]).sum())
    return total


def test_gumbel_agreement_by_hand() -> None:
    same = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert gumbel_agreement(same, same) == pytest.approx(1.0)
    assert gumbel_agreement(same, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) == pytest.approx(0.5)
    # p = (1/2, 1/2), q = (1, 0): x = 0 wins both races with probability p_0 = 1/2; 1 - TV = 1/2; bound 1/3
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert gumbel_agreement(p, q) == pytest.approx(0.5) and total_variation(p, q) == pytest.approx(0.5)


@torch.inference_mode()
def accepted_share(draft: torch.nn.Module, target: torch.nn.Module, params: SamplingParams, fast: bool) -> float:
    """One proposal from PROMPT per trial, through the workers' draft and step (what every stage runs); each trial
    has its own seed (the coupled noise, and the rejection rule's generators)."""
    cpu = torch.device("cpu")
    d, t = make_worker(draft, "draft", cpu, fast), make_worker(target, "target", cpu, fast)
    accepted = 0
    for seed in range(TRIALS):  # (workers run under inference mode on their runner threads; so do they here)
        trial = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed,
                               acceptance=params.acceptance)
        d.reset(seed, 64)
        t.reset(seed + 1_000_000, 64)
        proposal = d.draft(PROMPT, 1, trial)
        rows = [(proposal.probs, 0)] if proposal.probs is not None else None
        accepted += t.step(PROMPT + list(proposal.tokens), len(PROMPT), trial, rows).accepted
    return accepted / TRIALS


@pytest.mark.parametrize("fast", [False, True], ids=["hf-forward", "static-worker"])
@pytest.mark.parametrize("acceptance", ["rejection", "coupled"])
def test_acceptance_of_a_noisy_draft_matches_the_theory(acceptance: str, fast: bool) -> None:
    target = tiny_llama(11, hidden=16, layers=1, vocab=V)
    draft = noisy_copy(target, 1.5, 12)
    params = SamplingParams(temperature=1.0, acceptance=acceptance)  # type: ignore[arg-type]
    p, q = next_token_rows(draft, params), next_token_rows(target, params)  # before a static worker re-points them
    tv = total_variation(p, q)
    expected = 1 - tv if acceptance == "rejection" else gumbel_agreement(p, q)
    assert 0.25 < tv < 0.75, tv  # a draft far enough from the target that "always accept" would be caught
    assert gumbel_agreement(p, q) >= (1 - tv) / (1 + tv) - 1e-12  # docs/sampling.md's coupled bound
    share = accepted_share(draft, target, params, fast)
    print(f"\n{acceptance}: TV {tv:.3f}, expected acceptance {expected:.3f}, measured {share:.3f} (+- {EPS:.3f})")
    assert abs(share - expected) < EPS, (share, expected, tv)
    bound = 1 - tv if acceptance == "rejection" else (1 - tv) / (1 + tv)
    assert share > bound - EPS, (share, bound)


@pytest.mark.parametrize("fast", [False, True], ids=["hf-forward", "static-worker"])
@limit(120)
async def test_a_draft_equal_to_the_target_is_always_accepted(fast: bool) -> None:
    """Every stage is the target: every proposal checked is accepted, under both rules, in sd and pipe.

    In ``pipe`` mode under the rejection rule the stages sample with their own generators, and the target, rarely
    idle here, mostly decodes on its own before a proposal reaches it (then the drafts roll back): the check there
    holds for the few proposals it does verify, and the count is required only where the timing guarantees one."""
    target = tiny_llama(13, hidden=32, layers=1)
    models = [noisy_copy(target, 0.0, 1), noisy_copy(target, 0.0, 2), slow(target, 0.002)]
    async with pipespec.Pipeline.load(models, device="cpu", fast=fast) as pipe:
        for acceptance in ("coupled", "rejection"):
            for mode in ("sd", "pipe"):
                checked = 0
                for seed in range(4):
                    g = await pipe.generate(PROMPT, max_new_tokens=24, mode=mode, temperature=1.0, seed=seed,
                                            acceptance=acceptance)
                    for i in (1, 2):
                        st = g.stats.stages[i]
                        assert st["accepted"] == st["proposed"], (acceptance, mode, seed, i, st)
                        checked += st["proposed"]
                    assert g.stats.stages[2]["rollbacks"] == 0
                if mode == "sd" or acceptance == "coupled":
                    assert checked > (24 if mode == "sd" else 0), (acceptance, mode, checked)
