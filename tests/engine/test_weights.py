from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from csm_voice_api.engine import weights
from csm_voice_api.engine.model import ModelArgs, RopeScaling
from csm_voice_api.engine.weights import (
    DEFAULT_REPO, MIMI_FILE, MIMI_REPO, args_from_hf_config, load_model, resolve_auto, select_weight_files,
)

LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    # No test may reach the network: without a token the loader only reads the cache.
    monkeypatch.setattr(weights, "hub_token", lambda: None)


def test_args_from_transformers_config():
    from transformers import CsmConfig

    cfg = CsmConfig(rope_scaling=dict(LLAMA3), depth_decoder_config={"rope_scaling": dict(LLAMA3)}).to_dict()
    args = args_from_hf_config(json.loads(json.dumps(cfg)))
    ref = ModelArgs.csm_1b()
    assert args.backbone == ref.backbone and args.decoder == ref.decoder
    assert args.backbone.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert (args.text_vocab_size, args.audio_vocab_size, args.num_codebooks) == (128_256, 2051, 32)
    assert args.decoder.hd == 128 and args.backbone.hd == 64


def test_args_from_config_without_scaling_and_sesame_style():
    args = args_from_hf_config({"model_type": "csm", "hidden_size": 128, "num_attention_heads": 4,
                                "depth_decoder_config": {"backbone_hidden_size": 128}})
    assert args.backbone.dim == 128 and args.backbone.rope_scaling is None and args.backbone.n_layers == 16
    sesame = args_from_hf_config({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                                  "text_vocab_size": 128_256, "audio_vocab_size": 2051, "audio_num_codebooks": 32})
    assert sesame == ModelArgs.csm_1b()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        args_from_hf_config({"hidden_size": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="backbone_hidden_size"):
        args_from_hf_config({"hidden_size": 64, "depth_decoder_config": {"backbone_hidden_size": 32}})


def test_weight_file_choice():
    hub = ["ckpt.pt", "config.json", "model.safetensors", "transformers-00001-of-00002.safetensors",
           "transformers-00002-of-00002.safetensors", "transformers.safetensors.index.json"]
    assert select_weight_files(hub, {}) == ["transformers.safetensors.index.json"]
    assert select_weight_files(["ckpt.pt", "model.safetensors"], {}) == ["model.safetensors"]
    assert select_weight_files(["ckpt.pt", "prompts/a.wav"], {}) == ["ckpt.pt"]
    with pytest.raises(FileNotFoundError):
        select_weight_files(["README.md"], {})


def fake_hub(cache: Path, repo: str, files: dict[str, Path | bytes]) -> None:
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        dst = root / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            dst.write_bytes(content)
        else:
            shutil.copy(content, dst)


def test_auto_without_cache_or_token_is_the_demo(tmp_path):
    spec, reason = resolve_auto(tmp_path)
    assert spec == "demo" and "HF_TOKEN" in reason
    loaded = load_model("auto", "cpu", torch.float32, cache_dir=tmp_path)
    assert loaded.is_demo and loaded.name == "demo" and loaded.reason == reason
    assert loaded.mimi_weights is None and loaded.prompt_clips == []


def test_auto_with_token_chooses_download(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "hub_token", lambda: "hf_x")
    assert resolve_auto(tmp_path)[0] == DEFAULT_REPO
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, reason = resolve_auto(tmp_path)
    assert spec == "demo" and "HF_HUB_OFFLINE" in reason


def test_auto_loads_cached_repo(tmp_path, hf_csm):
    """sesame/csm-1b and Mimi's weights in the cache: "auto" loads them without any network."""
    hf, folder = hf_csm
    files: dict[str, Path | bytes] = {p.name: p for p in folder.iterdir()}
    files["prompts/conversational_a.wav"] = b"RIFF"
    fake_hub(tmp_path, DEFAULT_REPO, files)
    fake_hub(tmp_path, MIMI_REPO, {MIMI_FILE: b"mimi"})
    assert resolve_auto(tmp_path)[0] == DEFAULT_REPO
    loaded = load_model("auto", "cpu", torch.bfloat16, cache_dir=tmp_path)
    assert not loaded.is_demo and loaded.name == DEFAULT_REPO
    assert loaded.mimi_weights is not None and loaded.mimi_weights.read_bytes() == b"mimi"
    assert [p.name for p in loaded.prompt_clips] == ["conversational_a.wav"]
    assert loaded.model.text_embeddings.weight.dtype == torch.bfloat16
    assert loaded.model.backbone.rope.dtype == torch.float32
    assert torch.equal(loaded.model.codebook0_head.weight, hf.lm_head.weight.to(torch.bfloat16))


def test_uncached_repo_without_token_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="HF_TOKEN"):
        load_model(DEFAULT_REPO, cache_dir=tmp_path)


def test_missing_mimi_is_an_error_for_the_real_model(tmp_path, hf_csm):
    _, folder = hf_csm
    for p in folder.iterdir():
        if p.name != MIMI_FILE:
            shutil.copy(p, tmp_path / p.name)
    with pytest.raises(FileNotFoundError, match="Mimi"):
        load_model(str(tmp_path), cache_dir=tmp_path / "empty-cache")
    explicit = tmp_path / "elsewhere" / "mimi.safetensors"
    loaded = load_model(str(tmp_path), cache_dir=tmp_path / "empty-cache", mimi_weights=explicit)
    assert loaded.mimi_weights == explicit


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_checkpoint_pickles_are_never_executed(tmp_path, hf_csm):
    _, folder = hf_csm
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / MIMI_FILE).write_bytes(b"")
    marker = tmp_path / "pwned"
    torch.save({"backbone.layers.0.attn.q_proj.weight": torch.zeros(1), "evil": _Payload(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_model(str(tmp_path), "cpu", torch.float32)
    assert not marker.exists()


def test_incomplete_checkpoint_names_missing_tensors(tmp_path, hf_csm):
    from safetensors.torch import save_file

    _, folder = hf_csm
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / MIMI_FILE).write_bytes(b"")
    save_file({"backbone.layers.0.sa_norm.scale": torch.ones(64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="torchtune checkpoint lacks"):
        load_model(str(tmp_path), "cpu", torch.float32)
