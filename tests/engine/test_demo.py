from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from csm_voice_api.engine.demo import build_demo
from csm_voice_api.engine.prompt import prompt_rows
from csm_voice_api.engine.sampler import SamplingTensors, sample
from csm_voice_api.engine.types import Segment
from csm_voice_api.engine.weights import load_model

_FINGERPRINT = """
import hashlib, torch
from csm_voice_api.engine.demo import build_demo
d = build_demo({seed})
h = hashlib.sha256(d.tokenizer.tokenizer.to_str().encode())
for k, v in sorted(d.model.state_dict().items()):
    h.update(k.encode()); h.update(v.float().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def fingerprint(seed: int) -> str:
    d = build_demo(seed)
    h = hashlib.sha256(d.tokenizer.tokenizer.to_str().encode())
    for k, v in sorted(d.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_demo_is_deterministic_across_processes():
    here = fingerprint(0)
    other = subprocess.run([sys.executable, "-c", _FINGERPRINT.format(seed=0)], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert other == here
    assert fingerprint(1) != here


def test_demo_shape_and_identity():
    d = build_demo()
    assert d.is_demo and d.name == "demo" and d.mimi_weights is None and d.prompt_clips == []
    a = d.model.args
    assert a.text_vocab_size == d.tokenizer.vocab_size <= 512
    assert a.num_codebooks == 32 and a.audio_vocab_size == 2051


def frames(d, segments, n, temperature=0.0, seed=0) -> torch.Tensor:
    m, K = d.model, d.model.args.num_codebooks
    tokens, mask = prompt_rows(segments, d.tokenizer, K)
    T = tokens.shape[0]
    cache, dcache = m.backbone_cache(1, torch.float32, "cpu"), m.decoder_cache(1, torch.float32, "cpu")
    p = SamplingTensors.allocate(1, "cpu")
    p.temperature.fill_(temperature)
    p.topk.fill_(50)
    p.seed.fill_(seed)
    with torch.no_grad():
        m.prefill(tokens[None, :-1], mask[None, :-1], torch.arange(T - 1)[None], cache)
        row, row_mask, pos, out = tokens[-1:], mask[-1:], torch.tensor([T - 1]), []
        for _ in range(n):
            codes = m.frame(row, row_mask, pos, cache, dcache, lambda logits, i: sample(logits, p, i))
            out.append(codes[0])
            row, row_mask, pos = F.pad(codes, (0, 1)), F.pad(torch.ones(1, K, dtype=torch.bool), (0, 1)), pos + 1
            p.step += 1
    return torch.stack(out)


def test_demo_outputs_depend_on_prompt_and_seed():
    d = build_demo()
    a = frames(d, [Segment(0, "Hello there.")], 3)
    b = frames(d, [Segment(0, "Something else entirely.")], 3)
    assert a.shape == (3, 32) and ((a >= 0) & (a < 2051)).all()
    assert not torch.equal(a, b)
    s1 = frames(d, [Segment(0, "Hello there.")], 3, temperature=0.9, seed=1)
    s2 = frames(d, [Segment(0, "Hello there.")], 3, temperature=0.9, seed=2)
    assert not torch.equal(s1, s2)
    assert torch.equal(s1, frames(d, [Segment(0, "Hello there.")], 3, temperature=0.9, seed=1))


def test_load_demo_in_bf16_keeps_rope_fp32():
    d = load_model("demo", "cpu", torch.bfloat16)
    assert d.is_demo and d.reason is None
    assert d.model.text_embeddings.weight.dtype == torch.bfloat16
    assert d.model.backbone.rope.dtype == torch.float32
