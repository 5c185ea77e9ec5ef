"""CSM-1B in plain PyTorch: a Llama backbone over 33-column frames and a small depth decoder.

Written for serving, after gpt-fast: one ModelArgs, static KV caches allocated once for a
pool of slots, and short forwards with shape comments. Shape letters: B batch rows, T new
positions, S cache positions, K codebooks (32), V audio vocab (2051), D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (rope_type "llama3")."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerArgs:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclass(frozen=True)
class ModelArgs:
    backbone: TransformerArgs
    decoder: TransformerArgs
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32

    @classmethod
    def csm_1b(cls) -> ModelArgs:
        return cls(
            backbone=TransformerArgs(16, 2048, 32, 8, 8192, max_seq_len=2048),
            decoder=TransformerArgs(4, 1024, 8, 2, 8192, max_seq_len=33),
        )

    @classmethod
    def tiny(cls, text_vocab_size: int = 512, num_codebooks: int = 32) -> ModelArgs:
        """The real architecture at toy size: what the demo model and the tests run."""
        return cls(
            backbone=TransformerArgs(2, 64, 4, 2, 128, max_seq_len=2048),
            decoder=TransformerArgs(2, 32, 4, 2, 64, max_seq_len=num_codebooks + 1),
            text_vocab_size=text_vocab_size,
            num_codebooks=num_codebooks,
        )

    @property
    def columns(self) -> int:
        """Codebook columns plus the text column of each position."""
        return self.num_codebooks + 1


def rope_frequencies(args: TransformerArgs) -> Tensor:
    """Inverse frequencies [hd/2], with Llama-3 scaling (same maths as transformers' "llama3")."""
    hd = args.hd
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def rope_cache(args: TransformerArgs, n_positions: int) -> Tensor:
    """[n_positions, hd] as (cos, sin) stacked on a leading dim of 2, in fp32."""
    inv_freq = rope_frequencies(args)
    freqs = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, T, H, hd]; cos/sin: [B, T, 1, hd]. Half-split ("rotate_half") layout, as transformers;
    # torchtune's interleaved checkpoints are permuted into it at load time (weights.py).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.hd
        # q, k and v in one matmul: a third of the launches in the latency-bound decode step.
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.hd, bias=False)
        self.wo = nn.Linear(args.n_heads * args.hd, args.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, kv: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        # x: [B, T, D]; rope: [2, B, T, 1, hd]; kv: [2, B, Hkv, S, hd] (this layer's cache rows);
        # pos: [B, T] cache positions to write; mask: [B, 1, T, S] True where attention is allowed.
        return self.wo(self.attend(self.wqkv(x), rope, kv, pos, mask))

    def attend(self, qkv: Tensor, rope: Tensor, kv: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """qkv [B, T, (H + 2 Hkv) hd] -> attention output [B, T, H hd] before wo; writes k, v at pos."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q = apply_rope(q.view(B, T, self.n_heads, self.hd), rope[0], rope[1])
        k = apply_rope(k.view(B, T, self.n_kv, self.hd), rope[0], rope[1])
        v = v.view(B, T, self.n_kv, self.hd)
        rows = torch.arange(B, device=qkv.device)[:, None].expand(B, T)
        kv[0, rows, :, pos] = k.to(kv.dtype)  # [B, T, Hkv, hd] scattered to their positions
        kv[1, rows, :, pos] = v.to(kv.dtype)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), kv[0], kv[1], attn_mask=mask, enable_gqa=self.n_heads != self.n_kv
        )  # [B, H, T, hd]
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)


class FeedForward(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden, -1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, rope: Tensor, kv: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, kv, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama stack without embeddings or output head; the caller owns the KV cache tensor."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # One spare position past max_seq_len: idle batch rows write there (see ModelRunner).
        self.register_buffer("rope", rope_cache(args, args.max_seq_len + 1), persistent=False)

    def forward(self, x: Tensor, pos: Tensor, cache: Tensor) -> Tensor:
        # x: [B, T, D]; pos: [B, T]; cache: [L, 2, B, Hkv, S, hd], its first B rows are these rows.
        rope, mask = self.rope_and_mask(pos, cache.shape[-2])
        for layer, kv in zip(self.layers, cache):
            x = layer(x, rope, kv, pos, mask)
        return self.norm(x)


    def rope_and_mask(self, pos: Tensor, S: int) -> tuple[Tensor, Tensor]:
        """pos [B, T] -> rope [2, B, T, 1, hd] and the causal mask [B, 1, T, S] over S cache positions."""
        mask = (torch.arange(S, device=pos.device) <= pos[..., None]).unsqueeze(1)
        return self.rope[:, pos].unsqueeze(-2), mask


class CSM(nn.Module):
    """Backbone + depth decoder + embeddings + heads. Stateless: caches are passed in."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        K, V = args.num_codebooks, args.audio_vocab_size
        D, Dd = args.backbone.dim, args.decoder.dim
        self.backbone = Transformer(args.backbone)
        self.decoder = Transformer(args.decoder)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, D)
        # One table for all codebooks, offset by codebook * V; shared by backbone and decoder inputs.
        self.audio_embeddings = nn.Embedding(K * V, D)
        self.projection = nn.Linear(D, Dd, bias=False)
        self.codebook0_head = nn.Linear(D, V, bias=False)
        self.audio_head = nn.Parameter(torch.empty(K - 1, Dd, V))
        self.register_buffer("codebook_offsets", torch.arange(K) * V, persistent=False)
        # Depth positions as a buffer: a frame slices it instead of launching an add per depth step.
        self.register_buffer("depth_positions", torch.arange(K + 1), persistent=False)
        nn.init.normal_(self.audio_head, std=0.02)

    # ---- caches -------------------------------------------------------------------------
    def backbone_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        a = self.args.backbone
        return torch.zeros(a.n_layers, 2, rows, a.n_kv_heads, a.max_seq_len + 1, a.hd, dtype=dtype, device=device)

    def decoder_cache(self, rows: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        a = self.args.decoder
        return torch.zeros(a.n_layers, 2, rows, a.n_kv_heads, a.max_seq_len, a.hd, dtype=dtype, device=device)

    # ---- embeddings -----------------------------------------------------------------------
    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        # tokens, mask: [B, T, K+1] (audio columns, then text); returns the masked sum [B, T, D].
        K = self.args.num_codebooks
        audio = self.audio_embeddings(tokens[..., :K] + self.codebook_offsets)  # [B, T, K, D]
        text = self.text_embeddings(tokens[..., K:])  # [B, T, 1, D]
        e = torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1).to(audio.dtype)
        return e.sum(dim=-2)

    def embed_codebook(self, codebook: int, codes: Tensor) -> Tensor:
        V = self.args.audio_vocab_size  # this codebook's rows of the shared table: a view, no offset add
        return F.embedding(codes, self.audio_embeddings.weight[codebook * V : (codebook + 1) * V])

    # ---- forwards -------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, mask: Tensor, pos: Tensor, cache: Tensor) -> Tensor:
        """Writes the KV of `tokens` at `pos` into `cache`; returns backbone hidden states [B, T, D]."""
        return self.backbone(self.embed(tokens, mask), pos, cache)

    def depth_logits(self, last_h: Tensor, codes: Tensor, cache: Tensor) -> Tensor:
        """Teacher-forced depth decoder: logits [B, K-1, V] of codebooks 1.. given codes [B, K]."""
        K = self.args.num_codebooks
        B = last_h.shape[0]
        inp = torch.cat([last_h[:, None], torch.stack(
            [self.embed_codebook(i, codes[:, i]) for i in range(K - 1)], dim=1)], dim=1)  # [B, K, D]
        pos = torch.arange(K, device=last_h.device).expand(B, K)
        h = self.decoder(self.projection(inp), pos, cache)  # [B, K, Dd]
        return torch.einsum("bkd,kdv->bkv", h[:, 1:], self.audio_head)

    def step_backbone(self, tokens: Tensor, mask: Tensor, pos: Tensor, cache: Tensor) -> Tensor:
        """One backbone position per row: tokens, mask [B, K+1], pos [B] -> normed hidden [B, D]."""
        return self.prefill(tokens[:, None], mask[:, None], pos[:, None], cache)[:, 0]

    def step_depth(self, x: Tensor, dpos: Tensor, dcache: Tensor, head: Tensor) -> Tensor:
        """Depth decoder over x [B, T, D] at dpos [B, T]; logits [B, V] of the last position via head [Dd, V]."""
        return self.decoder(self.projection(x), dpos, dcache)[:, -1] @ head

    def frame(self, tokens: Tensor, mask: Tensor, pos: Tensor, cache: Tensor, dcache: Tensor, sample,
              steps=None) -> Tensor:
        """One frame for B rows: one backbone step, then codebook 0, then 31 depth steps.

        tokens, mask: [B, K+1] the input row at positions pos [B]; sample(logits [B, V], codebook) -> [B].
        `steps` optionally replaces (step_backbone, step_depth) with compiled versions of the same.
        Returns codes [B, K].
        """
        backbone, depth = steps or (self.step_backbone, self.step_depth)
        K = self.args.num_codebooks
        B = tokens.shape[0]
        h = backbone(tokens, mask, pos, cache)  # [B, D]
        c = sample(self.codebook0_head(h), 0)
        codes = [c]
        x = torch.stack([h, self.embed_codebook(0, c)], dim=1)  # [B, 2, D]
        dpos = self.depth_positions[:2].expand(B, 2)
        for i in range(1, K):
            c = sample(depth(x, dpos, dcache, self.audio_head[i - 1]), i)
            codes.append(c)
            x = self.embed_codebook(i, c)[:, None]
            dpos = self.depth_positions[i + 1 : i + 2].expand(B, 1)
        return torch.stack(codes, dim=1)
