"""The batched sampler: per-row parameters, counter-based randomness, top-k/top-p, repetition penalty."""

from __future__ import annotations

import torch

from csm_voice_api.engine.sampler import SamplingTensors, sample

V = 50


def params(n, temperature=1.0, topk=V, top_p=1.0, seed=0, penalty=1.0):
    p = SamplingTensors.allocate(n, "cpu", num_codebooks=2, vocab=V)
    p.temperature.fill_(temperature)
    p.topk.fill_(topk)
    p.top_p.fill_(top_p)
    p.seed.copy_(torch.arange(n) + seed)
    p.rep_penalty.fill_(penalty)
    return p


def test_greedy_and_topk1_are_argmax():
    logits = torch.randn(4, V)
    assert torch.equal(sample(logits, params(4, temperature=0.0), 0), logits.argmax(-1))
    assert torch.equal(sample(logits, params(4, topk=1), 0), logits.argmax(-1))


def test_draws_depend_on_seed_step_and_codebook_only():
    logits = torch.randn(1, V).expand(64, V)
    p = params(64)
    a = sample(logits, p, 0)
    assert len(set(a.tolist())) > 5  # 64 seeds: varied draws
    # The same row alone (same seed and step) draws the same token: no dependence on neighbours.
    for row in (0, 17, 63):
        alone = params(1, seed=row)
        assert sample(logits[:1], alone, 0).item() == a[row].item()
    assert not torch.equal(sample(logits, params(64), 1), a)  # another codebook, another stream
    p.step.add_(1)
    assert not torch.equal(sample(logits, p, 0), a)  # next frame, new draws


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4))
    n = 4000
    p = params(n)
    counts = torch.bincount(sample(logits.expand(n, V), p, 0), minlength=V).float() / n
    assert torch.allclose(counts[:4], torch.softmax(logits, -1)[:4], atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4))).expand(2000, V)
    assert set(sample(logits, params(2000, topk=2), 0).tolist()) == {0, 1}
    assert set(sample(logits, params(2000, top_p=0.6), 0).tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.8
    assert set(sample(logits, params(2000, top_p=0.4), 0).tolist()) == {0}


def test_repetition_penalty_steers_away_from_recent_codes():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 7] = 3.0, 2.0
    p = params(1, temperature=0.0, penalty=10.0)
    assert sample(logits, p, 0).item() == 5
    p.step.add_(1)
    assert sample(logits, p, 0).item() == 7  # 5 was used in this codebook within the window
    assert sample(logits, p, 1).item() == 5  # other codebooks keep their own history
    plain = params(1, temperature=0.0, penalty=1.0)
    for _ in range(3):
        assert sample(logits, plain, 0).item() == 5
        plain.step.add_(1)
