"""Skinny matmuls (a few rows against a weight matrix) with the neighbouring elementwise work fused.

`linear(x, w)` computes x @ w.T for x [M, K] with M <= 16, optionally with
- `norm`: an RMSNorm of x (weight `norm`) in the prologue, so the normed row never touches memory;
- `swiglu`: w is the fused gate/up matrix [2H, K]; the output is silu(x @ gate.T) * (x @ up.T) [M, H];
- `residual`: adds a [M, N] tensor in the epilogue.
Roundings follow the PyTorch modules step by step (each op's output rounded to the activation dtype),
so the fused path differs from the unfused one only in accumulation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting
from .pdl import chain_start, launch_opts

MAX_ROWS = 16  # more rows than this: cuBLAS is the better kernel


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr,
    M, N, K, stride_xm, stride_wn, stride_wk, stride_om, stride_rm, up_offset, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    chain_start(PDL)
    dtype = out_ptr.dtype.element_ty
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if NORM:  # sum of squares over the whole row first: every program needs the full rstd
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :],
                         other=0.0).to(tl.float32)
            ss += tl.sum(xs * xs, axis=1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # RMSNorm as the module does it: (x * rstd) rounded, times the weight, rounded
            nw = tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * nw[None, :]).to(dtype)
        w_off = rk[:, None] * stride_wk + rn[None, :] * stride_wn  # [BLOCK_K, BLOCK_N]
        w_ok = k_ok[:, None] & n_ok[None, :]
        w = tl.load(w_ptr + w_off, mask=w_ok, other=0.0)
        if BLOCK_M == 1:  # one row: a reduction, no tensor-core tile to fill
            acc += tl.sum(w.to(tl.float32) * tl.reshape(x.to(tl.float32), [BLOCK_K, 1]), axis=0)[None, :]
        else:
            acc += tl.dot(x, w)
        if SWIGLU:
            u = tl.load(w_ptr + up_offset + w_off, mask=w_ok, other=0.0)
            if BLOCK_M == 1:
                acc_up += tl.sum(u.to(tl.float32) * tl.reshape(x.to(tl.float32), [BLOCK_K, 1]), axis=0)[None, :]
            else:
                acc_up += tl.dot(x, u)
    y = acc.to(dtype).to(tl.float32)
    if SWIGLU:  # F.silu(gate) * up, each rounded like the module's ops
        s = (y * tl.sigmoid(y)).to(dtype).to(tl.float32)
        y = s * acc_up.to(dtype).to(tl.float32)
    o_ok = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        r = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=o_ok, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32) + r
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(dtype), mask=o_ok)


def _configs(block_m: int) -> list[triton.Config]:
    if block_m == 1:
        shapes = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 128, 4), (64, 128, 4),
                  (16, 1024, 8), (8, 1024, 8)]
    else:
        shapes = [(16, 128, 4), (32, 128, 4), (64, 64, 4), (32, 256, 4), (64, 128, 8), (16, 256, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in shapes]


def _bench(fn, quantiles=None, **_):
    # Shorter than Triton's default (25 ms warm-up, 100 ms measure): start-up tunes ~50 shape/config pairs.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


_KEY = ["N", "K", "stride_wk", "NORM", "SWIGLU", "RESIDUAL"]
_tuned = {bm: triton.autotune(_configs(bm), key=_KEY, do_bench=_bench)(_linear_kernel) for bm in (1, 16)}


def linear(x: Tensor, w: Tensor, *, norm: Tensor | None = None, eps: float = 1e-5, residual: Tensor | None = None,
           swiglu: bool = False) -> Tensor:
    """x [M, K] (unit stride on K) @ w [N or 2N, K].T -> [M, N]; see the module docstring."""
    M, K = x.shape
    assert M <= MAX_ROWS and x.stride(1) == 1 and w.shape[1] == K
    N = w.shape[0] // 2 if swiglu else w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == (M, N) and residual.stride(1) == 1
    block_m = 1 if M == 1 else 16
    args = (x, w, out, residual if residual is not None else out, norm if norm is not None else x,
            M, N, K, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
            residual.stride(0) if residual is not None else 0, N * w.stride(0), eps)
    flags = dict(BLOCK_M=block_m, NORM=norm is not None, SWIGLU=swiglu, RESIDUAL=residual is not None, **launch_opts())
    if interpreting():  # the interpreter cannot time configs: use a fixed one
        bn, bk = 16, 32
        _linear_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, **flags)
    else:
        _tuned[block_m][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return out
