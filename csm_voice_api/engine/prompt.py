"""Segments to backbone input rows, exactly as Sesame's generator builds them.

Every backbone position is one row of K+1 columns: K Mimi codebooks, then the text token.
A text row sets only the text column; an audio row sets only the K codebook columns. The
model sums the embeddings of the columns whose mask is True.

A context segment is its text rows, then (when it has audio) one row per Mimi frame and a
final all-zero frame: the audio EOS the model learnt to emit when a turn ends. The text to
speak is text rows only; generation then continues with audio rows, one per frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from csm_voice_api.engine.tokenizer import TextTokenizer
from csm_voice_api.engine.types import Segment

Rows = tuple[Tensor, Tensor]  # tokens [T, K+1] int64, mask [T, K+1] bool


def text_rows(speaker: int, text: str, tokenizer: TextTokenizer, num_codebooks: int) -> Rows:
    """Rows of `[speaker]text` wrapped in BOS/EOS: text column set, audio columns masked out."""
    ids = torch.tensor(tokenizer.encode_turn(speaker, text), dtype=torch.int64)
    tokens = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.int64)
    mask = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: Tensor, num_codebooks: int, eos: bool = True) -> Rows:
    """Rows of Mimi codes [K, T] (one per frame), plus the all-zero EOS frame when `eos`."""
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise ValueError(f"codes must be [{num_codebooks}, T], got {list(codes.shape)}")
    frames = codes.to(torch.int64).T  # [T, K]
    if eos:
        frames = torch.cat([frames, frames.new_zeros(1, num_codebooks)])
    T = frames.shape[0]
    tokens = torch.cat([frames, frames.new_zeros(T, 1)], dim=1)
    mask = torch.ones(T, num_codebooks + 1, dtype=torch.bool)
    mask[:, -1] = False
    return tokens, mask


def segment_rows(segment: Segment, tokenizer: TextTokenizer, num_codebooks: int) -> Rows:
    """A turn's text rows, then its audio rows and EOS frame if it has codes."""
    tokens, mask = text_rows(segment.speaker, segment.text, tokenizer, num_codebooks)
    if segment.codes is None:
        return tokens, mask
    a_tokens, a_mask = audio_rows(segment.codes, num_codebooks)
    return torch.cat([tokens, a_tokens]), torch.cat([mask, a_mask])


def prompt_rows(segments: Sequence[Segment], tokenizer: TextTokenizer, num_codebooks: int) -> Rows:
    """All segments' rows, in order. A last segment without codes is the text to generate."""
    if not segments:
        empty = torch.zeros(0, num_codebooks + 1)
        return empty.to(torch.int64), empty.to(torch.bool)
    parts = [segment_rows(s, tokenizer, num_codebooks) for s in segments]
    return torch.cat([t for t, _ in parts]), torch.cat([m for _, m in parts])
