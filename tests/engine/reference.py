"""A tiny transformers CSM: the reference our own model is checked against (test_parity.py).

Small (2+2 layers, 8 codebooks) so the parity tests run in seconds on two CPU cores.
"""

from __future__ import annotations

import torch

K = 8  # codebooks: fewer than CSM-1B's 32 keeps greedy decoding fast; the code is general in K
AUDIO_VOCAB = 2051



def tiny_csm_config(text_vocab_size: int):
    from transformers import CsmConfig, MimiConfig

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # small, so the smoothed band covers a few frequencies
    codec = MimiConfig(hidden_size=16, num_filters=4, upsampling_ratios=[8, 6, 5, 8], codebook_size=64,
                       codebook_dim=8, vector_quantization_hidden_dimension=8, upsample_groups=16,
                       num_hidden_layers=1, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=8, num_quantizers=K)
    return CsmConfig(
        num_codebooks=K, vocab_size=AUDIO_VOCAB, text_vocab_size=text_vocab_size,
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rope_theta=500_000, rope_scaling=dict(rope),
        bos_token_id=0, eos_token_id=1, pad_token_id=None, audio_token_id=2, audio_eos_token_id=3,
        depth_decoder_config=dict(
            num_codebooks=K, backbone_hidden_size=64, vocab_size=AUDIO_VOCAB, hidden_size=32, intermediate_size=80,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=K + 1,
            rope_theta=500_000, rope_scaling=dict(rope),
        ),
        codec_config=codec.to_dict(),
    )


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights large enough that every tensor (norm gains too) shapes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.08 * noise)
