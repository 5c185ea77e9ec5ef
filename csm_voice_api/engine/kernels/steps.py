"""CSM's step pieces (CSM.step_depth, CSM.step_backbone) on the fused kernels, for up to MAX_ROWS rows.

Same inputs, outputs and cache layouts as the PyTorch pieces, so the runner can capture either.
A layer is five kernels instead of a dozen: norm+qkv, attention, out-projection+residual,
norm+gate/up+SwiGLU, down-projection+residual. The depth decoder's attention (<= 33 positions)
is a kernel of ours; the backbone's (up to 2048) stays PyTorch's SDPA.
"""

from __future__ import annotations

from torch import Tensor

from ..model import CSM, Block
from .attention import attend_one
from .gemv import MAX_ROWS, linear


def _mlp_half(layer: Block, attn_out: Tensor, x: Tensor) -> Tensor:
    """x + wo(attn_out), then its feed-forward with residual: [B, D]."""
    ffn = layer.feed_forward
    h = linear(attn_out, layer.attention.wo.weight, residual=x)
    f = linear(h, ffn.w13.weight, norm=layer.ffn_norm.weight, eps=layer.ffn_norm.eps, swiglu=True)
    return linear(f, ffn.w2.weight, residual=h)


def _qkv(layer: Block, x: Tensor) -> Tensor:
    return linear(x, layer.attention.wqkv.weight, norm=layer.attention_norm.weight, eps=layer.attention_norm.eps)


class _Fused:
    max_rows = MAX_ROWS  # more rows: the PyTorch pieces (cuBLAS) are faster

    def __init__(self, model: CSM):
        self.model = model


class FusedDepth(_Fused):

    def __call__(self, x: Tensor, dpos: Tensor, dcache: Tensor, head: Tensor) -> Tensor:
        # x: [B, T, D] backbone-dim inputs; dpos: [B, T]; dcache: [L, 2, B, Hkv, S, hd]; head: [Dd, V].
        # T one-position passes (only the first depth step has T = 2).
        m = self.model
        dec = m.decoder
        h = None
        for t in range(x.shape[1]):
            h = linear(x[:, t], m.projection.weight)  # [B, Dd]
            pos = dpos[:, t]
            for layer, kv in zip(dec.layers, dcache):
                att = layer.attention
                y = attend_one(_qkv(layer, h), kv, dec.rope, pos, att.n_heads, att.n_kv)
                h = _mlp_half(layer, y, h)
        return linear(h, head.t(), norm=dec.norm.weight, eps=dec.norm.eps)  # [B, V]


class FusedBackbone(_Fused):

    def __call__(self, tokens: Tensor, mask: Tensor, pos: Tensor, cache: Tensor) -> Tensor:
        # tokens, mask: [B, K+1]; pos: [B]; cache: [L, 2, B, Hkv, S, hd] -> normed hidden [B, D].
        m = self.model
        bb = m.backbone
        x = m.embed(tokens[:, None], mask[:, None])[:, 0]
        rope, amask = bb.rope_and_mask(pos[:, None], cache.shape[-2])
        for layer, kv in zip(bb.layers, cache):
            y = layer.attention.attend(_qkv(layer, x)[:, None], rope, kv, pos[:, None], amask)[:, 0]
            x = _mlp_half(layer, y, x)
        return bb.norm(x)
