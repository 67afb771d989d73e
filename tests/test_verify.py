"""The acceptance math on hand-made logits and distributions (CPU, no models)."""

from __future__ import annotations

import math

import pytest
import torch

from pipespec.verify import (SamplingParams, choose, count_accepted, gumbel_noise, rejection_verify, sample,
                             warp_logits)


def test_count_accepted_prefix_only() -> None:
    assert count_accepted([1, 2, 3], [1, 2, 3, 9]) == 3
    assert count_accepted([1, 2, 3], [1, 5, 3, 9]) == 1
    assert count_accepted([], [4]) == 0
    assert count_accepted([7], [8, 1]) == 0


def test_sampling_params_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="acceptance"):
        SamplingParams(temperature=1.0, acceptance="magic")  # type: ignore[arg-type]
    assert SamplingParams().rule == "greedy"
    assert SamplingParams(temperature=0.7).rule == "coupled"
    assert SamplingParams(temperature=0.7, acceptance="rejection").needs_probs


def test_warp_top_k_top_p_temperature() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = torch.softmax(warp_logits(logits, SamplingParams(temperature=1.0, top_k=2)), -1)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # top_p = 0.8: 0.5 + 0.3 reaches it, so the third and fourth tokens go
    p = torch.softmax(warp_logits(logits, SamplingParams(temperature=1.0, top_p=0.8)), -1)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    # the most likely token always stays, even with a tiny top_p
    p = torch.softmax(warp_logits(logits, SamplingParams(temperature=1.0, top_p=0.01)), -1)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # temperature 2 takes the square root of the probabilities (renormalised)
    p = torch.softmax(warp_logits(logits, SamplingParams(temperature=2.0)), -1)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(p[0], expected / expected.sum(), atol=1e-6)


def test_gumbel_noise_is_a_pure_function_of_seed_and_position() -> None:
    a = gumbel_noise(7, torch.tensor([3, 4, 5]), 50)
    b = gumbel_noise(7, torch.tensor([4]), 50)
    assert torch.equal(a[1], b[0])  # same (seed, position) -> same noise, whatever the batch
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(gumbel_noise(8, torch.tensor([3]), 50)[0], a[0])
    assert torch.isfinite(a).all()


def test_gumbel_noise_has_the_gumbel_distribution() -> None:
    g = gumbel_noise(1, torch.arange(400), 500).flatten()  # 200k draws
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 0.02
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.05


def test_coupled_choice_samples_the_warped_distribution() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = torch.log(probs).expand(20000, 3)
    params = SamplingParams(temperature=1.0, seed=3)
    tokens, rows = choose(logits, params, torch.arange(20000))
    assert rows is None
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)


def test_coupled_choice_agrees_when_distributions_agree() -> None:
    """Two stages with different logits but the same warped distribution (a per-row shift, and logits doubled at
    twice the temperature) choose the same tokens; the choice is the Gumbel-max of the warped log-probabilities,
    computed here from the noise; another seed chooses differently."""
    torch.manual_seed(0)
    logits = torch.randn(64, 30, dtype=torch.float64)
    positions = torch.arange(100, 164)
    params = SamplingParams(temperature=0.8, seed=11)
    a, _ = choose(logits, params, positions)
    b, _ = choose(2 * logits + torch.randn(64, 1, dtype=torch.float64), SamplingParams(temperature=1.6, seed=11),
                  positions)
    assert torch.equal(a, b)
    by_hand = torch.argmax(torch.log_softmax(logits.float() / 0.8, -1) + gumbel_noise(11, positions, 30), -1)
    assert torch.equal(a, by_hand)
    c, _ = choose(logits, SamplingParams(temperature=0.8, seed=12), positions)
    assert (a != c).sum() > 20  # independent noise: 30 tokens, so ~62 of 64 rows differ


def test_rejection_all_accepted_when_q_equals_p() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 8), -1)
    q = torch.cat([p, torch.softmax(torch.randn(1, 8), -1)])
    proposed = sample(p, gen)
    accepted, bonus = rejection_verify(proposed, p, q, gen)
    assert accepted == 5
    assert 0 <= int(bonus) < 8


def test_rejection_all_rejected_when_supports_are_disjoint() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 4)
    accepted, correction = rejection_verify(torch.tensor([0, 0, 0]), p, q, gen)
    assert accepted == 0
    assert int(correction) in (2, 3)  # drawn from norm(max(0, q - p)) = q here


def test_rejection_residual_distribution() -> None:
    """One position: the output of accept-or-resample is distributed as q, and rejections follow the residual."""
    gen = torch.Generator().manual_seed(5)
    p = torch.tensor([[0.6, 0.3, 0.1]])
    q = torch.tensor([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    n = 30000
    counts = torch.zeros(3)
    corrections = torch.zeros(3)
    for _ in range(n):
        x = sample(p, gen)
        accepted, nxt = rejection_verify(x, p, q, gen)
        out = int(x[0]) if accepted == 1 else int(nxt)
        counts[out] += 1
        if accepted == 0:
            corrections[int(nxt)] += 1
    assert torch.allclose(counts / n, q[0], atol=0.012)
    residual = torch.clamp(q[0] - p[0], min=0)
    assert torch.allclose(corrections / corrections.sum(), residual / residual.sum(), atol=0.015)


def _host_rejection_verify(proposed, p, q, generator):
    """The rule decided on the host (the implementation before rejection_verify_device): the reference."""
    n = proposed.shape[0]
    if n:
        idx = proposed.view(n, 1)
        q_x, p_x = q[:n].gather(1, idx).squeeze(1), p.gather(1, idx).squeeze(1)
        u = torch.rand(n, generator=generator, device=q.device, dtype=torch.float32)
        rejected = (u * p_x > q_x).nonzero()
        accepted = int(rejected[0, 0]) if rejected.numel() else n
    else:
        accepted = 0
    if accepted < n:
        residual = torch.clamp(q[accepted] - p[accepted], min=0.0)
        total = residual.sum()
        row = residual / total if float(total) > 0 else q[accepted]
        return accepted, int(sample(row.unsqueeze(0), generator)[0])
    return accepted, int(sample(q[n].unsqueeze(0), generator)[0])


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_rejection_decided_on_the_device_draws_the_same_tokens_as_on_the_host(device: str) -> None:
    cases = 0
    for seed in range(300):
        torch.manual_seed(seed)
        n, vocab = seed % 6, 5 + seed % 7
        p = torch.softmax(3 * torch.randn(n, vocab), -1).to(device)
        q = torch.softmax(3 * torch.randn(n + 1, vocab), -1).to(device)
        if seed % 5 == 0 and n:
            q[:n] = p  # no residual at any position: accepted to the end
        proposed = (torch.multinomial(p, 1).squeeze(-1) if n
                    else torch.zeros(0, dtype=torch.long, device=device))
        got = rejection_verify(proposed, p, q, torch.Generator(device=device).manual_seed(seed))
        want = _host_rejection_verify(proposed, p, q, torch.Generator(device=device).manual_seed(seed))
        assert (got[0], int(got[1])) == want, (seed, got, want)
        cases += 0 < want[0] < n
    assert cases > 20  # partial acceptances were among the cases
