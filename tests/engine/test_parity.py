"""Our CSM against the reference: transformers' CsmForConditionalGeneration with the same random weights.

The reference is saved with save_pretrained (sharded, so the index path is exercised) and loaded by
our loader; then the same weights are written in Sesame's original torchtune layout (interleaved
RoPE) and must load to the very same model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from csm_voice_api.engine.model import apply_rope, rope_frequencies
from csm_voice_api.engine.prompt import prompt_rows
from csm_voice_api.engine.sampler import SamplingTensors, sample
from csm_voice_api.engine.types import Segment
from csm_voice_api.engine.weights import MIMI_FILE, LoadedModel, load_model

from .reference import AUDIO_VOCAB, K

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Toy-sized matmuls: extra threads only fight the other processes on a small shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ready_folder(folder: Path) -> Path:
    # The loader resolves Mimi's weights too; a placeholder in the folder keeps it off the network.
    (folder / MIMI_FILE).write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def ours(hf_csm) -> LoadedModel:
    _, folder = hf_csm
    return load_model(str(ready_folder(folder)), "cpu", torch.float32)


@pytest.fixture(scope="module")
def rows(tiny_tokenizer):
    """A prompt mixing text rows and audio rows (with the EOS frame), then the text to speak."""
    g = torch.Generator().manual_seed(7)
    segments = [
        Segment(0, "Hello there, how are you?", torch.randint(0, AUDIO_VOCAB, (K, 6), generator=g)),
        Segment(1, "Fine, thanks.", torch.randint(0, AUDIO_VOCAB, (K, 4), generator=g)),
        Segment(0, "Good to hear."),
    ]
    return prompt_rows(segments, tiny_tokenizer, K)


def reference_embeds(hf, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Input embeddings built with the reference's own modules: text rows, or summed audio codebooks."""
    text = hf.embed_text_tokens(tokens[:, -1])  # [T, D]
    audio = hf.backbone_model.embed_tokens(tokens[None, :, :K])[0]  # [T, D], sum over codebooks
    is_text = mask[:, -1:]
    assert torch.equal(mask[:, :K].any(-1), ~mask[:, -1])  # every row is text xor audio
    return torch.where(is_text, text, audio)[None]


@torch.no_grad()
def test_backbone_logits_match(hf_csm, ours, rows):
    hf, _ = hf_csm
    tokens, mask = rows
    T = tokens.shape[0]
    ref = hf(inputs_embeds=reference_embeds(hf, tokens, mask)).logits[0]  # [T, V]
    m = ours.model
    h = m.prefill(tokens[None], mask[None], torch.arange(T)[None], m.backbone_cache(1, torch.float32, "cpu"))
    got = m.codebook0_head(h)[0]
    assert got.shape == ref.shape == (T, AUDIO_VOCAB)
    assert rel_err(got, ref) <= TOL


@torch.no_grad()
def test_depth_logits_match_teacher_forced(hf_csm, ours, rows):
    hf, _ = hf_csm
    tokens, mask = rows
    T = tokens.shape[0]
    g = torch.Generator().manual_seed(3)
    h = hf.backbone_model(inputs_embeds=reference_embeds(hf, tokens, mask)).last_hidden_state[0, -4:]  # [4, D]
    codes = torch.randint(0, AUDIO_VOCAB, (4, K), generator=g)
    ref = hf.depth_decoder(input_ids=F.pad(codes[:, : K - 1], (1, 0)), backbone_last_hidden_state=h).logits
    m = ours.model
    got = m.depth_logits(h, codes, m.decoder_cache(4, torch.float32, "cpu"))
    assert got.shape == ref.shape == (4, K - 1, AUDIO_VOCAB)
    assert rel_err(got, ref) <= TOL
    assert T > 4


def greedy_codes(loaded: LoadedModel, tokens: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Our decode loop at temperature 0: prefill the prompt, then one frame per step, fed back as audio rows."""
    m = loaded.model
    T = tokens.shape[0]
    cache, dcache = m.backbone_cache(1, torch.float32, "cpu"), m.decoder_cache(1, torch.float32, "cpu")
    params = SamplingTensors.allocate(1, "cpu")  # temperature 0: argmax
    m.prefill(tokens[None, :-1], mask[None, :-1], torch.arange(T - 1)[None], cache)
    row, row_mask, pos = tokens[-1:], mask[-1:], torch.tensor([T - 1])
    out = []
    for _ in range(frames):
        codes = m.frame(row, row_mask, pos, cache, dcache, lambda logits, i: sample(logits, params, i))  # [1, K]
        out.append(codes[0])
        row = F.pad(codes, (0, 1))
        row_mask = torch.ones(1, K + 1, dtype=torch.bool)
        row_mask[:, -1] = False
        pos = pos + 1
    return torch.stack(out)


@torch.no_grad()
def test_greedy_generation_matches_reference(hf_csm, ours, rows):
    hf, _ = hf_csm
    tokens, mask = rows
    frames = 20
    emb = reference_embeds(hf, tokens, mask)
    ref = hf.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                      max_new_tokens=frames, do_sample=False, depth_decoder_do_sample=False)[0]
    got = greedy_codes(ours, tokens, mask, frames)
    assert ref.shape == got.shape == (frames, K)
    assert torch.equal(got, ref)
    assert len({tuple(r) for r in got.tolist()}) > 1  # not a degenerate constant output


# ---- Sesame's original layout ---------------------------------------------------------------
def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Inverse of convert_csm.py's permute_for_rope: rows back into torchtune's (x0, x1) pairs.
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def torchtune_state(hf) -> dict[str, torch.Tensor]:
    """The reference weights under the names of Sesame's models.py (torchtune modules)."""
    cfg, dcfg = hf.config, hf.config.depth_decoder_config
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    out = {
        "text_embeddings.weight": sd["embed_text_tokens.weight"],
        "audio_embeddings.weight": sd["backbone_model.embed_tokens.embed_audio_tokens.weight"],
        "projection.weight": sd["depth_decoder.model.inputs_embeds_projector.weight"],
        "codebook0_head.weight": sd["lm_head.weight"],
        "audio_head": sd["depth_decoder.codebooks_head.weight"],
        "backbone.norm.scale": sd["backbone_model.norm.weight"],
        "decoder.norm.scale": sd["depth_decoder.model.norm.weight"],
    }
    for tt, hf_prefix, c in (("backbone", "backbone_model", cfg), ("decoder", "depth_decoder.model", dcfg)):
        for i in range(c.num_hidden_layers):
            src, dst = f"{hf_prefix}.layers.{i}.", f"{tt}.layers.{i}."
            out[dst + "sa_norm.scale"] = sd[src + "input_layernorm.weight"]
            out[dst + "mlp_norm.scale"] = sd[src + "post_attention_layernorm.weight"]
            out[dst + "attn.q_proj.weight"] = half_to_interleaved(sd[src + "self_attn.q_proj.weight"], c.num_attention_heads)
            out[dst + "attn.k_proj.weight"] = half_to_interleaved(sd[src + "self_attn.k_proj.weight"], c.num_key_value_heads)
            out[dst + "attn.v_proj.weight"] = sd[src + "self_attn.v_proj.weight"]
            out[dst + "attn.output_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
            for ours_name, hf_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out[dst + f"mlp.{ours_name}.weight"] = sd[src + f"mlp.{hf_name}.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def test_interleaved_permutation_matches_torchtune_rope(ours):
    """half_to_interleaved really is torchtune's layout: its interleaved RoPE equals ours, up to the permutation."""
    a = ours.model.args.backbone
    g = torch.Generator().manual_seed(5)
    H, hd, T = a.n_heads, a.hd, 12
    w_half = torch.randn(H * hd, a.dim, generator=g)
    x = torch.randn(T, a.dim, generator=g)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), rope_frequencies(a))  # [T, hd/2]
    # torchtune: consecutive pairs (x[2i], x[2i+1]) rotate by angle i.
    q_tt = (x @ half_to_interleaved(w_half, H).T).view(T, H, hd // 2, 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    tt = torch.stack([q_tt[..., 0] * cos - q_tt[..., 1] * sin, q_tt[..., 1] * cos + q_tt[..., 0] * sin], -1)
    emb = torch.cat([angles, angles], -1)[None, :, None]  # [1, T, 1, hd]
    half = apply_rope((x @ w_half.T).view(1, T, H, hd), emb.cos(), emb.sin())[0]
    torch.testing.assert_close(tt[..., 0], half[..., : hd // 2])
    torch.testing.assert_close(tt[..., 1], half[..., hd // 2 :])


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_torchtune_layout_loads_identical(hf_csm, ours, rows, tmp_path, fmt):
    hf, folder = hf_csm
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(folder / name, tmp_path / name)
    state = torchtune_state(hf)
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "ckpt.pt")
    tt = load_model(str(ready_folder(tmp_path)), "cpu", torch.float32)
    ref_sd, tt_sd = ours.model.state_dict(), tt.model.state_dict()
    assert ref_sd.keys() == tt_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], tt_sd[k]), k
    tokens, mask = rows
    assert torch.equal(greedy_codes(tt, tokens, mask, 4), greedy_codes(ours, tokens, mask, 4))


def test_hub_layout_prefers_transformers_index(hf_csm, ours, tmp_path):
    """sesame/csm-1b ships transformers-0000N shards + an index next to a torchtune model.safetensors."""
    hf, folder = hf_csm
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        new = shard.replace("model-", "transformers-")
        shutil.copy(folder / shard, tmp_path / new)
        renamed[shard] = new
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (tmp_path / "transformers.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = "transformers.safetensors.index.json"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    decoy = {k: torch.zeros_like(v) for k, v in torchtune_state(hf).items()}  # would load as zeros
    save_file(decoy, str(tmp_path / "model.safetensors"))
    loaded = load_model(str(ready_folder(tmp_path)), "cpu", torch.float32)
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
