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
PENALTY_WINDOW = 16  # frames of each codebook's recent codes that repetition_penalty looks back over


@dataclass
class SamplingTensors:
    """Per-row parameters, each [B]. temperature <= 0 means greedy (argmax)."""

    temperature: Tensor  # float32
    topk: Tensor  # int64, >= 1
    top_p: Tensor  # float32 in (0, 1]
    seed: Tensor  # int64
    step: Tensor  # int64, frames sampled so far by this row (advances the random stream)
    rep_penalty: Tensor  # float32 >= 1; 1 leaves logits untouched
    recent: Tensor  # int64 [B, K, PENALTY_WINDOW]: the row's last codes per codebook; V = empty

    def rows(self, n: int) -> SamplingTensors:
        return SamplingTensors(*(t[:n] for t in (self.temperature, self.topk, self.top_p, self.seed, self.step,
                                                 self.rep_penalty, self.recent)))

    @classmethod
    def allocate(cls, n: int, device: torch.device | str, num_codebooks: int = 32, vocab: int = 2051) -> SamplingTensors:
        return cls(
            temperature=torch.zeros(n, device=device),
            topk=torch.ones(n, dtype=torch.long, device=device),
            top_p=torch.ones(n, device=device),
            seed=torch.zeros(n, dtype=torch.long, device=device),
            step=torch.zeros(n, dtype=torch.long, device=device),
            rep_penalty=torch.ones(n, device=device),
            recent=torch.full((n, num_codebooks, PENALTY_WINDOW), vocab, dtype=torch.long, device=device),
        )

    def reset_row(self, row: int, vocab: int) -> None:
        self.recent[row] = vocab


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
    """logits [B, V] -> token ids [B]: repetition penalty, temperature, top-k, top-p, then a categorical draw.

    Records the drawn ids in the row's recent-codes ring (p.recent), which the penalty reads.
    """
    logits = logits.float()
    B, V = logits.shape
    # 1-d, never 0-d: indexing with a 0-d tensor makes PyTorch call .item(), a host sync that
    # breaks CUDA graph capture.
    cb = torch.as_tensor(codebook, device=logits.device).reshape(1)
    # Repetition penalty over this codebook's last PENALTY_WINDOW codes (CTRL-style: divide
    # positive logits, multiply negative ones). With penalty 1 the logits stay bit-identical.
    recent = p.recent.index_select(1, cb).squeeze(1)  # [B, W]
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, recent, True)[:, :V]
    pen = p.rep_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
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
    token = torch.where(p.temperature > 0, drawn, greedy)
    rows = torch.arange(B, device=logits.device)
    p.recent[rows, cb.expand(B), p.step % p.recent.shape[-1]] = token
    return token
