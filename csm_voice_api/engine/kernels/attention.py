"""Attention for one new position per row over a short cache (the depth decoder's <= 33 positions).

One program per (row, query head): RoPE on q and on the new k, attention over cache positions
below `pos` plus the new k/v held in registers, and (by the first query head of each KV group)
the write of the new k/v into the cache. No program reads the position being written, so the
write needs no barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .pdl import chain_start, launch_opts


@triton.jit
def _attend_one_kernel(
    qkv_ptr, cache_ptr, rope_ptr, pos_ptr, out_ptr,
    stride_qkv, stride_pos, stride_ckv, stride_crow, stride_chead, stride_cpos, stride_rcs, stride_rpos,
    stride_out, scale,
    H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    dtype = out_ptr.dtype.element_ty
    m = tl.program_id(0)
    h = tl.program_id(1)
    g = h // (H // HKV)
    HALF: tl.constexpr = HD // 2
    pos = tl.load(pos_ptr + m * stride_pos)
    d = tl.arange(0, HALF)
    cos = tl.load(rope_ptr + pos * stride_rpos + d).to(tl.float32)  # cos/sin repeat across halves
    sin = tl.load(rope_ptr + stride_rcs + pos * stride_rpos + d).to(tl.float32)
    row = qkv_ptr + m * stride_qkv
    # Half-split RoPE, rounded to the activation dtype as apply_rope does.
    q1 = tl.load(row + h * HD + d).to(tl.float32)
    q2 = tl.load(row + h * HD + HALF + d).to(tl.float32)
    qr1 = (q1 * cos - q2 * sin).to(dtype).to(tl.float32)
    qr2 = (q2 * cos + q1 * sin).to(dtype).to(tl.float32)
    kx1 = tl.load(row + (H + g) * HD + d).to(tl.float32)
    kx2 = tl.load(row + (H + g) * HD + HALF + d).to(tl.float32)
    k1 = (kx1 * cos - kx2 * sin).to(dtype)
    k2 = (kx2 * cos + kx1 * sin).to(dtype)
    v1 = tl.load(row + (H + HKV + g) * HD + d)
    v2 = tl.load(row + (H + HKV + g) * HD + HALF + d)

    s = tl.arange(0, S_PAD)
    past = s < pos
    kbase = cache_ptr + m * stride_crow + g * stride_chead + s[:, None] * stride_cpos + d[None, :]
    now = (s == pos)[:, None]
    kc1 = tl.where(now, k1[None, :], tl.load(kbase, mask=past[:, None], other=0.0)).to(tl.float32)
    kc2 = tl.where(now, k2[None, :], tl.load(kbase + HALF, mask=past[:, None], other=0.0)).to(tl.float32)
    scores = (tl.sum(kc1 * qr1[None, :], axis=1) + tl.sum(kc2 * qr2[None, :], axis=1)) * scale
    scores = tl.where(s <= pos, scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=0))
    p = p / tl.sum(p, axis=0)
    vbase = kbase + stride_ckv
    vc1 = tl.where(now, v1[None, :], tl.load(vbase, mask=past[:, None], other=0.0)).to(tl.float32)
    vc2 = tl.where(now, v2[None, :], tl.load(vbase + HALF, mask=past[:, None], other=0.0)).to(tl.float32)
    o = out_ptr + m * stride_out + h * HD + d
    tl.store(o, tl.sum(vc1 * p[:, None], axis=0).to(dtype))
    tl.store(o + HALF, tl.sum(vc2 * p[:, None], axis=0).to(dtype))
    if h % (H // HKV) == 0:
        here = cache_ptr + m * stride_crow + g * stride_chead + pos * stride_cpos + d
        tl.store(here, k1)
        tl.store(here + HALF, k2)
        tl.store(here + stride_ckv, v1)
        tl.store(here + stride_ckv + HALF, v2)


def attend_one(qkv: Tensor, kv: Tensor, rope: Tensor, pos: Tensor, n_heads: int, n_kv: int) -> Tensor:
    """qkv [M, (H + 2 Hkv) hd] of one new position per row at pos [M]; kv [2, rows >= M, Hkv, S, hd]
    this layer's cache (written at pos); rope [2, >S, hd] cos/sin. Returns [M, H hd]."""
    M = qkv.shape[0]
    hd = kv.shape[-1]
    S = kv.shape[-2]
    assert qkv.stride(1) == 1 and kv.stride(-1) == 1 and rope.stride(-1) == 1
    out = torch.empty(M, n_heads * hd, dtype=qkv.dtype, device=qkv.device)
    _attend_one_kernel[(M, n_heads)](
        qkv, kv, rope, pos, out,
        qkv.stride(0), pos.stride(0), kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        rope.stride(0), rope.stride(1), out.stride(0), hd ** -0.5,
        H=n_heads, HKV=n_kv, HD=hd, S_PAD=triton.next_power_of_2(S), **launch_opts(),
    )
    return out
