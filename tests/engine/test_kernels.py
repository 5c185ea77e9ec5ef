"""The Triton depth-decoder kernels equal the PyTorch modules they replace.

Without CUDA they run in Triton's interpreter (set before the kernels are imported); on the GPU
machine the same tests run the compiled kernels, plus a full-size bf16 check (marked gpu).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from csm_voice_api.engine.kernels.steps import FusedBackbone, FusedDepth  # noqa: E402
from csm_voice_api.engine.kernels.gemv import linear  # noqa: E402
from csm_voice_api.engine.model import CSM, ModelArgs, RMSNorm  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# fp32 everywhere; on the GPU tl.dot rounds fp32 inputs to tf32 (10-bit mantissa), compounding over layers.
TOL = dict(rtol=2e-2, atol=2e-2) if CUDA else dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _no_tf32_in_reference():
    torch.backends.cuda.matmul.allow_tf32 = False


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("M", [1, 5])
def test_linear_plain_norm_swiglu_residual(M):
    K, N = 96, 20
    x, w, nw, r = _rand(M, K, seed=1), _rand(2 * N, K, seed=2), _rand(K, seed=3), _rand(M, N, seed=4)
    norm = RMSNorm(K, 1e-5).to(DEVICE)
    norm.weight.data = nw
    torch.testing.assert_close(linear(x, w), x @ w.T, **TOL)
    torch.testing.assert_close(linear(x, w, norm=nw), norm(x) @ w.T, **TOL)
    gate, up = (norm(x) @ w.T).split(N, -1)
    torch.testing.assert_close(linear(x, w, norm=nw, swiglu=True, residual=r), F.silu(gate) * up + r, **TOL)
    wt = _rand(K, 2 * N, seed=5)  # a [in, out] matrix (the audio heads' layout), passed transposed
    torch.testing.assert_close(linear(x, wt.t()), x @ wt, **TOL)


def test_linear_reads_strided_rows():
    x = _rand(3, 2, 64, seed=6)[:, 1]  # rows 128 apart, as the depth step reads x[:, t]
    w = _rand(40, 64, seed=7)
    torch.testing.assert_close(linear(x, w), x @ w.T, **TOL)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = CSM(ModelArgs.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.to(DEVICE)


@torch.no_grad()
def test_fused_depth_equals_module_step_over_a_frame():
    """Logits and the written KV cache agree step by step, from the 2-position first step on."""
    m = _tiny_model()
    fused, B = FusedDepth(m), 3
    a = m.args
    ref_cache = m.decoder_cache(B, torch.float32, DEVICE)
    fused_cache = ref_cache.clone()
    x = _rand(B, 2, a.backbone.dim, seed=8)
    dpos = torch.arange(2, device=DEVICE).expand(B, 2)
    for i in range(6):  # the 2-position first step and five more (the interpreter is slow)
        ref = m.step_depth(x, dpos, ref_cache, m.audio_head[i])
        got = fused(x, dpos, fused_cache, m.audio_head[i])
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(fused_cache, ref_cache, **TOL)
        x = m.embed_codebook(i + 1, ref.argmax(-1))[:, None]
        dpos = dpos[:, -1:] + 1


@torch.no_grad()
def test_fused_backbone_equals_module_step():
    """Hidden states and the written backbone KV agree over a few positions of mixed rows."""
    m = _tiny_model(1)
    fused, B = FusedBackbone(m), 3
    a = m.args
    ref_cache = m.backbone_cache(B, torch.float32, DEVICE)
    fused_cache = ref_cache.clone()
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        tokens = torch.randint(0, 500, (B, a.columns), generator=g).to(DEVICE)
        mask = (torch.rand(B, a.columns, generator=g) > 0.3).to(DEVICE)
        pos = torch.tensor([step, 5 + step, 40 + step], device=DEVICE)
        ref = m.step_backbone(tokens, mask, pos, ref_cache)
        got = fused(tokens, mask, pos, fused_cache)
        torch.testing.assert_close(got, ref, **TOL)
        torch.testing.assert_close(fused_cache, ref_cache, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@torch.no_grad()
@pytest.mark.parametrize("B", [1, 8])
def test_fused_depth_full_size_bf16(B):
    """CSM-1B's real shapes in bf16: the fused step's logits match the module's to bf16 noise."""
    torch.manual_seed(0)
    m = CSM(ModelArgs.csm_1b()).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    fused = FusedDepth(m)
    ref_cache = m.decoder_cache(B, torch.bfloat16, "cuda")
    fused_cache = ref_cache.clone()
    x = torch.randn(B, 2, 2048, device="cuda", dtype=torch.bfloat16)
    dpos = torch.arange(2, device="cuda").expand(B, 2)
    for i in range(8):
        ref = m.step_depth(x, dpos, ref_cache, m.audio_head[i]).float()
        got = fused(x, dpos, fused_cache, m.audio_head[i]).float()
        err = (got - ref).abs().max() / ref.abs().max()
        assert err < 0.03, (i, float(err))
        x = m.embed_codebook(i + 1, ref.argmax(-1))[:, None]
        dpos = dpos[:, -1:] + 1


def test_fused_sampler_equals_sampler_over_mixed_rows():
    """Per-row temperature, top-k, top-p, penalty and seed: the same tokens and the same recent ring."""
    from csm_voice_api.engine.kernels.sampler import sample as fused_sample
    from csm_voice_api.engine.sampler import SamplingTensors, sample

    B, V, K = 12, 2051, 4
    g = torch.Generator().manual_seed(11)
    ref = SamplingTensors.allocate(B, DEVICE, K, V)
    ref.temperature[:] = torch.tensor([0.0, 0.9, 0.9, 1.3, 0.5, 0.9, 0.9, 0.7, 2.0, 0.9, 0.9, 0.9])
    ref.topk[:] = torch.tensor([1, 50, 1, 2051, 5, 50, 3000, 50, 50, 10, 50, 2])
    ref.top_p[:] = torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 0.5, 0.95, 1.0, 0.3, 1.0, 0.9, 1.0])
    ref.seed[:] = torch.arange(B) * 7919
    ref.rep_penalty[:] = torch.tensor([1.0, 1.0, 1.3, 1.0, 1.2, 1.0, 1.0, 1.5, 1.0, 1.0, 1.1, 1.0])
    got = SamplingTensors(*(t.clone() for t in (ref.temperature, ref.topk, ref.top_p, ref.seed, ref.step,
                                                 ref.rep_penalty, ref.recent)))
    for frame in range(3):
        for cb in range(K):
            logits = (torch.randn(B, V, generator=g) * 3).to(DEVICE)
            ids = torch.tensor([cb], device=DEVICE)
            want = sample(logits, ref, ids)
            torch.testing.assert_close(fused_sample(logits, got, ids), want, rtol=0, atol=0)
        ref.step += 1
        got.step += 1
    torch.testing.assert_close(got.recent, ref.recent, rtol=0, atol=0)
