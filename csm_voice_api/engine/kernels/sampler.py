"""sampler.sample as one kernel per call: one program per row, no sort.

The sort of 2051 logits is replaced by exact threshold searches on the logits' bit patterns
(top-k: the k-th largest value, ties at it broken by lower token id; top-p: a search on the
mass above each value), and the draw is the same exponential race keyed by token id, with the
same counter-based hash, so a row's tokens equal sampler.sample's wherever no two kept logits
tie (ties at the top-p edge are kept or dropped together).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..sampler import SamplingTensors
from .pdl import chain_start, launch_opts

_M32 = 0xFFFFFFFF


@triton.jit
def _mul32(x, c):
    lo = x & 0xFFFF
    hi = x >> 16
    return ((lo * c) + (((hi * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(
    logits_ptr, stride_l, temp_ptr, topk_ptr, top_p_ptr, seed_ptr, step_ptr, pen_ptr,
    recent_ptr, stride_r0, stride_r1, stride_r2, cb_ptr, out_ptr, V,
    W: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    valid = offs < V
    logits = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
    cb = tl.load(cb_ptr)
    step = tl.load(step_ptr + row)
    ring = recent_ptr + row * stride_r0 + cb * stride_r1
    # Repetition penalty over this codebook's recent codes (CTRL-style), as sampler.sample.
    seen = offs < 0
    for w in tl.static_range(W):
        seen = seen | (offs == tl.load(ring + w * stride_r2))
    pen = tl.load(pen_ptr + row)
    logits = tl.where(seen & valid, tl.where(logits > 0, logits / pen, logits * pen), logits)
    greedy = tl.argmax(logits, axis=0)
    temp = tl.load(temp_ptr + row)
    z = logits / tl.maximum(temp, 1e-5)
    # Order-preserving integer keys of the floats; padding (-inf) sorts below every logit.
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    # top-k: the k-th largest key, by bisection (count(key >= lo) >= k always holds).
    k = tl.minimum(tl.load(topk_ptr + row), V)
    lo = tl.min(key, axis=0)
    hi = tl.max(key, axis=0) + 1
    for _ in range(33):
        mid = lo + (hi - lo) // 2
        ok = tl.sum((key >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    above = key > lo
    tied = key == lo
    room = k - tl.sum(above.to(tl.int32), axis=0)
    kept = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    zmax = tl.max(z, axis=0)
    e = tl.where(kept, tl.exp(z - zmax), 0.0)
    probs = e / tl.sum(e, axis=0)
    # top-p: keep a token while the mass of tokens above it is below top_p (the top one always).
    top_p = tl.load(top_p_ptr + row)
    if top_p < 1.0:
        plo = tl.min(tl.where(kept, key, 1 << 40), axis=0) - 1  # mass above plo: all of it
        phi = tl.max(key, axis=0)  # mass above phi: 0 < top_p
        for _ in range(33):
            mid = plo + (phi - plo) // 2
            ok = tl.sum(tl.where(key > mid, probs, 0.0), axis=0) < top_p
            phi = tl.where(ok, mid, phi)
            plo = tl.where(ok, plo, mid)
        kept = kept & (key >= phi)  # the smallest keys whose mass above stays under top_p
        probs = tl.where(kept, probs, 0.0)
    # The exponential race with noise keyed by token id (sampler.uniform's hash).
    seed = tl.load(seed_ptr + row) & 0xFFFFFFFF
    base = _fmix32(seed ^ _fmix32((step * 64 + cb) & 0xFFFFFFFF))
    x = _fmix32(base ^ _mul32(offs.to(tl.int64) + 1, 0x9E3779B1))
    u = (x.to(tl.float32) + 0.5) * (1.0 / 4294967296.0)
    race = tl.where(kept, probs / -tl.log(u), -1.0)
    drawn = tl.argmax(race, axis=0)
    token = tl.where(temp > 0, drawn, greedy).to(tl.int64)
    tl.store(out_ptr + row, token)
    tl.store(ring + (step % W) * stride_r2, token)


def sample(logits: Tensor, p: SamplingTensors, codebook: Tensor) -> Tensor:
    """Drop-in for sampler.sample (codebook a 1-element tensor): logits [B, V] -> tokens [B]."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    r = p.recent
    _sample_kernel[(B,)](
        logits, logits.stride(0), p.temperature, p.topk, p.top_p, p.seed, p.step, p.rep_penalty,
        r, r.stride(0), r.stride(1), r.stride(2), codebook, out, V,
        W=r.shape[-1], BLOCK_V=triton.next_power_of_2(V), num_warps=8, **launch_opts(),
    )
    return out
