"""Per-row sampling with parameters held in tensors, so one captured graph serves mixed requests.

Randomness is counter-based: each row draws from a hash of (seed, frame, codebook, token), never
from a shared generator. A row's samples therefore do not depend on which other rows share its
batch, the same seed reproduces the same audio, and nothing here syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-row parameters, each [B]. temperature <= 0 means greedy (argmax)."""

    temperature: Tensor  # float32
    topk: Tensor  # int64, >= 1
    top_p: Tensor  # float32 in (0, 1]
    seed: Tensor  # int64
    step: Tensor  # int64, frames sampled so far by this row (advances the random stream)

    def rows(self, n: int) -> SamplingTensors:
        return SamplingTensors(*(t[:n] for t in (self.temperature, self.topk, self.top_p, self.seed, self.step)))

    @classmethod
    def allocate(cls, n: int, device: torch.device | str) -> SamplingTensors:
        return cls(
            temperature=torch.zeros(n, device=device),
            topk=torch.ones(n, dtype=torch.long, device=device),
            top_p=torch.ones(n, device=device),
            seed=torch.zeros(n, dtype=torch.long, device=device),
            step=torch.zeros(n, dtype=torch.long, device=device),
        )


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 for x < 2**32 without int64 overflow: split x into 16-bit halves.
    lo, hi = x & 0xFFFF, x >> 16
    return ((lo * c) + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(x: Tensor) -> Tensor:
    # murmur3's finaliser: a cheap full-avalanche 32-bit mix.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seed: Tensor, step: Tensor, codebook: int | Tensor, n: int) -> Tensor:
    """[B, n] floats in (0, 1), a pure function of (seed, step, codebook, column)."""
    base = _fmix32((seed & _M32) ^ _fmix32((step * 64 + codebook) & _M32))  # [B]
    col = torch.arange(n, device=seed.device)
    x = _fmix32(base[:, None] ^ _mul32(col[None, :] + 1, 0x9E3779B1))
    return (x.float() + 0.5) * (1.0 / 4294967296.0)


def sample(logits: Tensor, p: SamplingTensors, codebook: int | Tensor) -> Tensor:
    """logits [B, V] -> token ids [B]: temperature, then top-k, then top-p, then a categorical draw."""
    logits = logits.float()
    B, V = logits.shape
    greedy = logits.argmax(-1)
    temp = p.temperature.clamp_min(1e-5)[:, None]
    sorted_logits, order = (logits / temp).sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(V, device=logits.device)[None, :]
    keep = rank < p.topk[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(before >= p.top_p[:, None], 0.0)
    # Exponential race = a categorical draw: argmax(p / E) with E ~ Exp(1), noise keyed by token id.
    noise = -torch.log(uniform(p.seed, p.step, codebook, V)).gather(1, order)
    choice = (probs / noise).argmax(-1)
    drawn = order.gather(1, choice[:, None])[:, 0]
    return torch.where(p.temperature > 0, drawn, greedy)
