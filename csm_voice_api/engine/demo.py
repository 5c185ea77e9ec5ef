"""The demo model: CSM's real architecture at toy size with seeded random weights.

It lets every part of the server run without the gated checkpoint: it speaks noise, but its
outputs depend on the prompt and the sampling seed like the real model's do. The same seed
gives the same weights and tokenizer in any process.
"""

from __future__ import annotations

import torch

from csm_voice_api.engine.model import CSM, ModelArgs
from csm_voice_api.engine.tokenizer import build_tiny_tokenizer
from csm_voice_api.engine.weights import LoadedModel, build_model


def build_demo(seed: int = 0) -> LoadedModel:
    """A tiny CSM (ModelArgs.tiny) with the tiny tokenizer, fp32 on the CPU; move it with `.model.to()`."""
    tokenizer = build_tiny_tokenizer()
    args = ModelArgs.tiny(text_vocab_size=tokenizer.vocab_size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CSM(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):  # a fixed order, so each tensor's draw does not depend on dict order
        noise = torch.randn(shapes[name], generator=g)
        # Norm gains near 1; matrices small enough that logits stay soft and samples vary.
        state[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise
    return LoadedModel(build_model(args, state, "cpu"), tokenizer, "demo", True, None, [])


RANDOM_FULL = "random-csm-1b"


def build_random_full(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> LoadedModel:
    """CSM-1B's full architecture with random weights, built on `device`: for benchmarks, whose
    speed does not depend on weight values. Speaks noise, like the demo model (is_demo=True)."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        model = CSM(ModelArgs.csm_1b()).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return LoadedModel(model.eval().requires_grad_(False), tokenizer, RANDOM_FULL, True, None, [])
