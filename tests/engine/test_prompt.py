from __future__ import annotations

import pytest
import torch

from csm_voice_api.engine.prompt import audio_rows, prompt_rows, segment_rows, text_rows
from csm_voice_api.engine.types import Segment

K = 32


def test_text_rows_set_only_the_text_column(tiny_tokenizer):
    tokens, mask = text_rows(2, "Hi there", tiny_tokenizer, K)
    ids = tiny_tokenizer.encode_turn(2, "Hi there")
    assert tokens.shape == mask.shape == (len(ids), K + 1)
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool
    assert tokens[:, -1].tolist() == ids
    assert mask[:, -1].all() and not mask[:, :K].any()
    assert not tokens[:, :K].any()


def test_segment_with_audio_is_text_then_frames_then_eos_frame(tiny_tokenizer):
    codes = torch.randint(1, 2051, (K, 5))
    tokens, mask = segment_rows(Segment(0, "Hello", codes), tiny_tokenizer, K)
    n_text = len(tiny_tokenizer.encode_turn(0, "Hello"))
    assert tokens.shape == (n_text + 5 + 1, K + 1)
    audio, audio_mask = tokens[n_text:], mask[n_text:]
    assert torch.equal(audio[:5, :K], codes.T)
    assert not audio[5].any()  # the all-zero EOS frame
    assert audio_mask[:, :K].all() and not audio_mask[:, -1].any()
    assert not audio[:, -1].any()
    assert torch.equal(tokens[:n_text], text_rows(0, "Hello", tiny_tokenizer, K)[0])


def test_segment_without_audio_is_text_rows_only(tiny_tokenizer):
    tokens, mask = segment_rows(Segment(1, "Just text"), tiny_tokenizer, K)
    ref_tokens, ref_mask = text_rows(1, "Just text", tiny_tokenizer, K)
    assert torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)


def test_prompt_concatenates_segments_in_order(tiny_tokenizer):
    segs = [Segment(0, "One", torch.zeros(K, 3, dtype=torch.int64) + 7), Segment(1, "Two", torch.ones(K, 2, dtype=torch.int64)),
            Segment(0, "Three")]
    tokens, mask = prompt_rows(segs, tiny_tokenizer, K)
    parts = [segment_rows(s, tiny_tokenizer, K) for s in segs]
    assert torch.equal(tokens, torch.cat([p[0] for p in parts]))
    assert torch.equal(mask, torch.cat([p[1] for p in parts]))
    assert tokens.shape[0] == sum(len(tiny_tokenizer.encode_turn(s.speaker, s.text)) for s in segs) + (3 + 1) + (2 + 1)


def test_empty_prompt(tiny_tokenizer):
    tokens, mask = prompt_rows([], tiny_tokenizer, K)
    assert tokens.shape == mask.shape == (0, K + 1)
    assert tokens.dtype == torch.int64 and mask.dtype == torch.bool


def test_audio_rows_without_eos_and_wrong_codebooks():
    codes = torch.arange(4 * 3).view(4, 3)
    tokens, mask = audio_rows(codes, 4, eos=False)
    assert torch.equal(tokens[:, :4], codes.T) and tokens.shape == (3, 5)
    with pytest.raises(ValueError, match=r"\[32, T\]"):
        audio_rows(codes, 32)
