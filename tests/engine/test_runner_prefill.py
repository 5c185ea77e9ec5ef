"""The staged prefill (the path captured as CUDA graphs on the GPU) writes the KV a direct prefill
writes: through the staging row, padded to its bucket size, with the slot's earlier rows read."""

from __future__ import annotations

import pytest
import torch

from csm_voice_api.engine.demo import build_demo
from csm_voice_api.engine.runner import ModelRunner


def prompt_rows(model, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T rows alternating text-only and audio-only, like a prompt's segments."""
    a = model.args
    K, g = a.num_codebooks, torch.Generator().manual_seed(seed)
    tokens = torch.zeros(T, K + 1, dtype=torch.long)
    mask = torch.zeros(T, K + 1, dtype=torch.bool)
    for t in range(T):
        if t % 2:
            tokens[t, :K] = torch.randint(0, a.audio_vocab_size, (K,), generator=g)
            mask[t, :K] = True
        else:
            tokens[t, K] = int(torch.randint(0, a.text_vocab_size, (1,), generator=g))
            mask[t, K] = True
    return tokens, mask


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_staged_prefill_equals_direct_prefill(device: str, monkeypatch):
    """On CPU the staged path runs eagerly; on CUDA it is the captured graphs the engine replays."""
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_demo().model.to(device).eval()
    runner = ModelRunner(model, 4, torch.device(device), torch.float32, prefill_rows=32)
    assert runner.prefill_buckets == (16, 32)
    assert runner.staged_prefill == (device == "cuda")  # graphs need the staging row; CPU goes direct
    head, head_mask = prompt_rows(model, 7, seed=1)
    tail, tail_mask = prompt_rows(model, 20, seed=2)  # padded to 32 in the staged path
    other, other_mask = prompt_rows(model, 9, seed=3)
    for slot, staged in ((0, False), (1, True)):
        runner.staged_prefill = staged
        runner.prefill(slot, head, head_mask, 0)  # padded to 16
        if staged:  # another slot's prompt goes through the staging row in between
            runner.prefill(2, other, other_mask, 0)
        runner.prefill(slot, tail, tail_mask, 7)  # reads the slot's 7 rows before it
    n = 7 + 20
    direct, staged = runner.cache[:, :, 0], runner.cache[:, :, 1]
    assert direct[..., :n, :].abs().sum() > 0
    torch.testing.assert_close(staged[..., :n, :], direct[..., :n, :], atol=1e-4, rtol=1e-4)
    # The padding rows wrote only the staging row (and its parked position): not the slot, nor others.
    assert staged[..., n:, :].abs().sum() == 0
    assert runner.cache[:, :, 2, ..., 9:, :].abs().sum() == 0 and runner.cache[:, :, 3].abs().sum() == 0
    # And the two slots decode alike from there (greedy).
    if device == "cuda":
        assert set(runner.prefill_graphs) == {16, 32}  # both sizes were replayed as graphs
    last = torch.zeros(model.args.num_codebooks + 1, dtype=torch.long)
    last_mask = torch.zeros_like(last, dtype=torch.bool)
    last_mask[-1] = True
    for slot in (0, 1):
        runner.start_row(slot, last, last_mask, n, temperature=0.0, topk=1, top_p=1.0, seed=0)
    for _ in range(3):
        codes, _ = runner.step(2)
        assert torch.equal(codes[0], codes[1])
