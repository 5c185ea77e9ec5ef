"""The runner's row edits (start, close, park) set what they say, also when one turn edits a
slot twice (parked, then started again), as the engine does."""

from __future__ import annotations

import pytest
import torch

from csm_voice_api.engine.demo import build_demo
from csm_voice_api.engine.runner import ModelRunner

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _runner(device: str) -> ModelRunner:
    model = build_demo().model.to(device).eval()
    return ModelRunner(model, 4, torch.device(device), torch.float32, use_graphs=False)


def _edit(r: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    C = r.K + 1
    last = torch.arange(C, dtype=torch.long) + 7
    mask = torch.zeros(C, dtype=torch.bool)
    mask[-1] = True
    r.park_row(0)  # a slot reused in one turn: parked, then started, like the engine does
    r.start_row(0, last, mask, 41, temperature=0.7, topk=25, top_p=0.9, seed=12345, repetition_penalty=1.2)
    r.start_row(2, last, mask, 9, temperature=0.0, topk=1, top_p=1.0, seed=3)
    r.close_row(2)
    r.start_row(3, last, mask, 5, temperature=0.5, topk=3, top_p=1.0, seed=4)
    r.park_row(3)
    return last, mask


def _check(r: ModelRunner, last: torch.Tensor, mask: torch.Tensor) -> None:
    s, K, V = r.sampling, r.K, r.model.args.audio_vocab_size
    cpu = {n: getattr(r, n).cpu() for n in ("tokens", "mask", "pos", "active", "finished")}
    assert torch.equal(cpu["tokens"][0], last) and torch.equal(cpu["mask"][0], mask)
    assert cpu["pos"][0] == 41 and cpu["active"][0] and not cpu["finished"][0]
    assert s.temperature[0].item() == pytest.approx(0.7) and s.topk[0] == 25 and s.top_p[0].item() == pytest.approx(0.9)
    assert s.seed[0] == 12345 and s.step[0] == 0 and s.rep_penalty[0].item() == pytest.approx(1.2)
    assert bool((s.recent[0] == V).all())
    # Closed: the all-zero EOS frame is fed next, audio columns only, and the row stops advancing.
    assert not cpu["tokens"][2].any() and cpu["mask"][2, :K].all() and not cpu["mask"][2, K]
    assert cpu["finished"][2] and cpu["active"][2] and cpu["pos"][2] == 9
    # Parked: not active, pointed at the spare position.
    assert not cpu["active"][3] and cpu["pos"][3] == r.parked
    assert not cpu["active"][1] and cpu["pos"][1] == r.parked  # untouched rows stay parked


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_row_edits_set_the_rows_state(device: str):
    r = _runner(device)
    r.sampling.recent.zero_()  # so the reset of a started row's recent codes shows
    last, mask = _edit(r)
    _check(r, last, mask)
