"""Loading CSM checkpoints into our model: both layouts sesame/csm-1b ships, from the hub or a folder.

Layouts, told apart by tensor names (never by file names, since the hub repo carries both):
- transformers (`backbone_model.*`, `depth_decoder.*`): config.json + sharded safetensors with an
  index; q/k rows are already in the half-split RoPE layout our model uses.
- Sesame's original torchtune names (`backbone.layers.N.attn.q_proj`, `sa_norm.scale`, ...):
  `model.safetensors` or `ckpt.pt`; q/k rows are in torchtune's interleaved RoPE layout and are
  permuted on load, as transformers' convert_csm.py does.
Nothing user-supplied is unpickled: `.pt` files go through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from csm_voice_api.engine.model import CSM, ModelArgs, RopeScaling, TransformerArgs, rope_cache
from csm_voice_api.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

DEFAULT_REPO = "sesame/csm-1b"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
_PROGRESS_BYTES = 256 << 20  # show a progress bar only for checkpoints at least this big


@dataclass
class LoadedModel:
    """A ready model and what serving it needs besides the weights."""

    model: CSM
    tokenizer: TextTokenizer
    name: str
    is_demo: bool
    mimi_weights: Path | None  # None only for the demo (it runs a random Mimi)
    prompt_clips: list[Path] = field(default_factory=list)  # the model repo's prompts/*.wav
    reason: str | None = None  # why "auto" chose this model, for the caller's banner


# ---- ModelArgs from config.json -------------------------------------------------------------
def _rope_scaling(d: dict | None) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}: CSM uses 'llama3'")
    return RopeScaling(
        factor=float(d["factor"]),
        low_freq_factor=float(d["low_freq_factor"]),
        high_freq_factor=float(d["high_freq_factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
    )


def _transformer_args(d: dict, defaults: TransformerArgs) -> TransformerArgs:
    dim, n_heads = d.get("hidden_size", defaults.dim), d.get("num_attention_heads", defaults.n_heads)
    head_dim = d.get("head_dim")
    return TransformerArgs(
        n_layers=d.get("num_hidden_layers", defaults.n_layers),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or d.get("num_attention_heads", defaults.n_kv_heads),
        intermediate_size=d.get("intermediate_size", defaults.intermediate_size),
        max_seq_len=d.get("max_position_embeddings", defaults.max_seq_len),
        norm_eps=d.get("rms_norm_eps", defaults.norm_eps),
        rope_theta=float(d.get("rope_theta", defaults.rope_theta)),
        rope_scaling=_rope_scaling(d.get("rope_scaling")),
        head_dim=None if head_dim == dim // n_heads else head_dim,  # explicit only when it is not implied
    )


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a transformers CsmConfig dict (config.json); missing keys take CsmConfig's defaults.

    A Sesame-style config (`backbone_flavor`, ...) gives csm_1b() with its vocab sizes.
    """
    base = ModelArgs.csm_1b()
    if "backbone_flavor" in cfg:
        return ModelArgs(
            backbone=base.backbone,
            decoder=base.decoder,
            text_vocab_size=cfg.get("text_vocab_size", base.text_vocab_size),
            audio_vocab_size=cfg.get("audio_vocab_size", base.audio_vocab_size),
            num_codebooks=cfg.get("audio_num_codebooks", base.num_codebooks),
        )
    depth = cfg.get("depth_decoder_config") or {}
    args = ModelArgs(
        backbone=_transformer_args(cfg, base.backbone),
        decoder=_transformer_args(depth, base.decoder),
        text_vocab_size=cfg.get("text_vocab_size", base.text_vocab_size),
        audio_vocab_size=cfg.get("vocab_size", base.audio_vocab_size),
        num_codebooks=cfg.get("num_codebooks", base.num_codebooks),
    )
    mismatched = {
        k: (depth[k], want)
        for k, want in (("backbone_hidden_size", args.backbone.dim), ("num_codebooks", args.num_codebooks),
                        ("vocab_size", args.audio_vocab_size))
        if k in depth and depth[k] != want
    }
    if mismatched:
        raise ValueError(f"depth_decoder_config disagrees with the backbone config: {mismatched}")
    return args


# ---- checkpoint tensors -----------------------------------------------------------------------
class _Tensors:
    """Lazy name -> tensor access over safetensors files or weights-only torch checkpoints."""

    def __init__(self, files: list[Path]):
        self._get: dict[str, Callable[[], Tensor]] = {}
        for f in files:
            if f.name.endswith(".safetensors"):
                handle = safe_open(str(f), framework="pt", device="cpu")
                for k in handle.keys():
                    self._get[k] = lambda k=k, h=handle: h.get_tensor(k)
            else:
                for k, v in _load_pt(f).items():
                    self._get[k] = lambda v=v: v

    def keys(self) -> set[str]:
        return set(self._get)

    def __getitem__(self, name: str) -> Tensor:
        return self._get[name]()


def _load_pt(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """q/k projection rows from torchtune's interleaved RoPE pairs to the half-split layout."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


_HF_LAYER = {
    "attention_norm.weight": ["input_layernorm.weight"],
    "attention.wqkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.wo.weight": ["self_attn.o_proj.weight"],
    "ffn_norm.weight": ["post_attention_layernorm.weight"],
    "feed_forward.w13.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "feed_forward.w2.weight": ["mlp.down_proj.weight"],
}
_TT_LAYER = {
    "attention_norm.weight": ["sa_norm.scale"],
    "attention.wqkv.weight": ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"],
    "attention.wo.weight": ["attn.output_proj.weight"],
    "ffn_norm.weight": ["mlp_norm.scale"],
    "feed_forward.w13.weight": ["mlp.w1.weight", "mlp.w3.weight"],
    "feed_forward.w2.weight": ["mlp.w2.weight"],
}
_HF_TOP = {
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
    "backbone.norm.weight": "backbone_model.norm.weight",
    "decoder.norm.weight": "depth_decoder.model.norm.weight",
}
_HF_TIED_AUDIO = "depth_decoder.model.embed_tokens.weight"
_TT_TOP = {
    **{k: k for k in ("text_embeddings.weight", "audio_embeddings.weight", "projection.weight",
                      "codebook0_head.weight", "audio_head")},
    "backbone.norm.weight": "backbone.norm.scale",
    "decoder.norm.weight": "decoder.norm.scale",
}


def detect_layout(keys: set[str]) -> str:
    """"transformers" or "torchtune", from the tensor names of a checkpoint."""
    if any(k.startswith("backbone_model.") for k in keys):
        return "transformers"
    if any(k.startswith("backbone.layers.") for k in keys):
        return "torchtune"
    raise ValueError("not a CSM checkpoint: no backbone_model.* (transformers) or backbone.layers.* (Sesame) tensors")


def convert_state(src: _Tensors, args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Our state dict (fused qkv / gate-up, half-split RoPE) from either checkpoint layout."""
    layout = detect_layout(src.keys())
    hf = layout == "transformers"
    plan: dict[str, tuple[list[str], list[int | None]]] = {}
    for ours, theirs in (_HF_TOP if hf else _TT_TOP).items():
        plan[ours] = ([theirs], [None])
    stacks = (("backbone", "backbone_model", "backbone", args.backbone),
              ("decoder", "depth_decoder.model", "decoder", args.decoder))
    for ours_prefix, hf_prefix, tt_prefix, a in stacks:
        for i in range(a.n_layers):
            for ours, theirs in (_HF_LAYER if hf else _TT_LAYER).items():
                prefix = f"{hf_prefix if hf else tt_prefix}.layers.{i}."
                rope = [None] * len(theirs)
                if ours == "attention.wqkv.weight" and not hf:
                    rope = [a.n_heads, a.n_kv_heads, None]
                plan[f"{ours_prefix}.layers.{i}.{ours}"] = ([prefix + t for t in theirs], rope)
    keys = src.keys()
    if hf and _HF_TOP["audio_embeddings.weight"] not in keys and _HF_TIED_AUDIO in keys:
        # One table, tied in transformers: save_pretrained may keep only the depth decoder's copy.
        plan["audio_embeddings.weight"] = ([_HF_TIED_AUDIO], [None])
    missing = sorted(n for names, _ in plan.values() for n in names if n not in keys)
    if missing:
        raise ValueError(f"{layout} checkpoint lacks {len(missing)} tensors, e.g. {missing[:4]}")
    total = sum(src[n].numel() * src[n].element_size() for names, _ in plan.values() for n in names)
    out: dict[str, Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading CSM", disable=total < _PROGRESS_BYTES) as bar:
        for ours, (names, rope) in plan.items():
            parts = []
            for n, heads in zip(names, rope):
                t = src[n]
                bar.update(t.numel() * t.element_size())
                t = t.to(device=device, dtype=dtype)
                parts.append(interleaved_to_half(t, heads) if heads else t)
            out[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def build_model(args: ModelArgs, state: dict[str, Tensor], device: torch.device | str) -> CSM:
    """A CSM holding `state`'s tensors as its parameters (no copy, no random init)."""
    with torch.device("meta"):
        model = CSM(args)
    model.load_state_dict(state, strict=True, assign=True)
    reset_buffers(model, device)
    return model.eval().requires_grad_(False)


def reset_buffers(model: CSM, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers (absent from checkpoints; RoPE tables stay fp32 after `.to(bf16)`)."""
    args = model.args
    model.backbone.rope = rope_cache(args.backbone, args.backbone.max_seq_len + 1).to(device)
    model.decoder.rope = rope_cache(args.decoder, args.decoder.max_seq_len + 1).to(device)
    model.codebook_offsets = torch.arange(args.num_codebooks, device=device) * args.audio_vocab_size
    model.depth_positions = torch.arange(args.num_codebooks + 1, device=device)


# ---- where files come from: a local folder or a Hugging Face repo (cache first) ---------------
def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_token() -> str | None:
    """The token for gated repos (HF_TOKEN or the one stored by `huggingface-cli login`)."""
    from huggingface_hub import get_token

    return get_token()


def downloads_allowed() -> bool:
    """Hub downloads happen only with a token and without HF_HUB_OFFLINE; otherwise the cache is all."""
    return not hub_offline() and hub_token() is not None


class _Source:
    """Lists and fetches a model's files; a hub repo is read from the cache unless `online`."""

    def __init__(self, spec: str, cache_dir: Path | None, online: bool):
        self.spec, self.cache_dir, self.online = spec, cache_dir, online
        self.root = Path(spec) if Path(spec).is_dir() else None

    def names(self) -> list[str]:
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
        if self.online:
            from huggingface_hub import HfApi

            return sorted(HfApi().list_repo_files(self.spec, token=hub_token()))
        from huggingface_hub import snapshot_download

        try:
            snap = Path(snapshot_download(self.spec, cache_dir=self.cache_dir, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any miss means "not cached"
            raise FileNotFoundError(
                f"{self.spec} is not in the Hugging Face cache and downloads are off: set HF_TOKEN "
                f"(the repo is gated; accept its terms on huggingface.co), or pass a local folder"
            ) from e
        return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())

    def get(self, name: str) -> Path:
        if self.root is not None:
            return self.root / name
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.spec, name, cache_dir=self.cache_dir,
                                    local_files_only=not self.online, token=hub_token()))


def select_weight_files(names: list[str], config: dict) -> list[str]:
    """The checkpoint files to read: a safetensors index's shards, else model.safetensors, else ckpt.pt."""
    indexes = sorted(n for n in names if "/" not in n and n.endswith(".safetensors.index.json"))
    preferred = config.get("transformers_weights")
    if preferred in indexes:
        indexes = [preferred]
    if indexes:
        return [indexes[0]]
    for single in ("model.safetensors", "ckpt.pt"):
        if single in names:
            return [single]
    raise FileNotFoundError(f"no CSM checkpoint among {names[:20]}: want *.safetensors.index.json, "
                            "model.safetensors or ckpt.pt")


def _fetch_weights(src: _Source, names: list[str], config: dict) -> list[Path]:
    chosen = select_weight_files(names, config)
    if not chosen[0].endswith(".index.json"):
        return [src.get(chosen[0])]
    weight_map = json.loads(src.get(chosen[0]).read_text())["weight_map"]
    # The transformers checkpoint also carries the Mimi codec (codec_model.*): its shards may be skipped.
    shards = sorted({f for k, f in weight_map.items() if not k.startswith("codec_model.")})
    return [src.get(s) for s in shards]


def _tokenizer(src: _Source, names: list[str], cache_dir: Path | None, online: bool) -> TextTokenizer:
    if "tokenizer.json" in names:
        return TextTokenizer.from_file(src.get("tokenizer.json"))
    return TextTokenizer.from_file(_Source(TOKENIZER_REPO, cache_dir, online).get("tokenizer.json"))


def resolve_mimi(src_root: Path | None, cache_dir: Path | None, online: bool) -> Path:
    """Mimi's weights: in the model folder if there, else kyutai's file from the cache (or downloaded)."""
    if src_root is not None and (src_root / MIMI_FILE).is_file():
        return src_root / MIMI_FILE
    try:
        return _Source(MIMI_REPO, cache_dir, online).get(MIMI_FILE)
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(f"Mimi weights ({MIMI_REPO}/{MIMI_FILE}) are not in the Hugging Face cache "
                                "and downloads are off (they need HF_TOKEN set and HF_HUB_OFFLINE unset)") from e


# ---- entry points ------------------------------------------------------------------------------
def resolve_auto(cache_dir: Path | None = None) -> tuple[str, str]:
    """("sesame/csm-1b" or "demo", why): the real model when cached or downloadable, else the demo."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(DEFAULT_REPO, "config.json", cache_dir=cache_dir), str)
    if cached:
        try:
            src = _Source(DEFAULT_REPO, cache_dir, online=False)
            names = src.names()
            config = json.loads(src.get("config.json").read_text())
            _fetch_weights(src, names, config)
            resolve_mimi(None, cache_dir, online=False)
            return DEFAULT_REPO, f"{DEFAULT_REPO} found in the Hugging Face cache"
        except (FileNotFoundError, OSError, ValueError, KeyError) as e:
            cache_miss = f"{DEFAULT_REPO} is only partly cached ({e})"
    else:
        cache_miss = f"{DEFAULT_REPO} is not in the Hugging Face cache"
    if hub_offline():
        return "demo", f"{cache_miss} and HF_HUB_OFFLINE is set"
    if hub_token() is None:
        return "demo", f"{cache_miss} and HF_TOKEN is not set (the repo is gated)"
    return DEFAULT_REPO, f"{cache_miss}; downloading it with HF_TOKEN"


def load_model(
    spec: str = DEFAULT_REPO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    cache_dir: str | Path | None = None,
    mimi_weights: str | Path | None = None,
) -> LoadedModel:
    """Load "demo", "auto", a Hugging Face repo id, or a local folder laid out like one.

    A repo is read from the cache; it is downloaded only when HF_TOKEN is set and HF_HUB_OFFLINE is not.
    `mimi_weights` (an explicit file) skips looking Mimi up; without it a real model whose Mimi
    weights cannot be found is an error (FileNotFoundError), never a silently random codec.
    """
    from csm_voice_api.engine.demo import build_demo

    cache = Path(cache_dir) if cache_dir is not None else None
    reason = None
    if spec == "auto":
        spec, reason = resolve_auto(cache)
    if spec in ("random", "random-csm-1b"):
        from csm_voice_api.engine.demo import build_random_full

        return build_random_full(device, dtype)
    if spec == "demo":
        loaded = build_demo()
        reset_buffers(loaded.model.to(device=device, dtype=dtype), device)
        loaded.reason = reason
        return loaded
    online = downloads_allowed()
    src = _Source(spec, cache, online=online)
    names = src.names()
    config = json.loads(src.get("config.json").read_text()) if "config.json" in names else {}
    args = args_from_hf_config(config) if config else ModelArgs.csm_1b()
    tokenizer = _tokenizer(src, names, cache, online)
    mimi = Path(mimi_weights) if mimi_weights is not None else resolve_mimi(src.root, cache, online)
    files = _fetch_weights(src, names, config)
    log.info("loading %s from %s", spec, ", ".join(f.name for f in files))
    model = build_model(args, convert_state(_Tensors(files), args, device, dtype), device)
    if tokenizer.vocab_size > args.text_vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds {args.text_vocab_size}")
    clips = [src.get(n) for n in names if n.startswith("prompts/") and n.endswith(".wav")]
    name = src.root.name if src.root is not None else spec
    return LoadedModel(model, tokenizer, name, False, mimi, clips, reason)
