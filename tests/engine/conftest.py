"""Fixtures for the engine tests: the tiny tokenizer, and the tiny reference transformers CSM on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from csm_voice_api.engine.tokenizer import TextTokenizer, build_tiny_tokenizer

from .reference import randomize_, tiny_csm_config


@pytest.fixture(scope="session")
def tiny_tokenizer() -> TextTokenizer:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def hf_csm(tmp_path_factory, tiny_tokenizer):
    """(reference CsmForConditionalGeneration in fp32, folder it was saved to in sharded form)."""
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(0)
    model = CsmForConditionalGeneration(tiny_csm_config(tiny_tokenizer.vocab_size)).eval()
    randomize_(model, seed=1234)
    out: Path = tmp_path_factory.mktemp("hf_csm")
    model.save_pretrained(out, max_shard_size="300KB", safe_serialization=True)
    tiny_tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    return model, out
