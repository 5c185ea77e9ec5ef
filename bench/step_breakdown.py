"""Where a decode step's time goes: backbone, the 31 depth steps, the 32 samples, Mimi, per variant.

Each piece is captured as its own CUDA graph at batch B (full-size CSM-1B, random bf16 weights)
and replayed; `python bench/step_breakdown.py --batches 1,8 [--no-compile]`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from csm_voice_api.audio.codec import MimiCodec
from csm_voice_api.engine.demo import build_random_full
from csm_voice_api.engine.runner import ModelRunner, captured
from csm_voice_api.engine.sampler import sample


def graph_ms(fn, iters=20) -> float:
    """fn captured as one CUDA graph (after two warm-up calls on a side stream) and replayed."""
    return ModelRunner._replay_ms(captured(fn), iters)


@torch.inference_mode()
def breakdown(r: ModelRunner, B: int) -> dict:
    m, K = r.model, r.K
    r.pos[:B], r.mask[:B, :K] = 300, True
    p = r.sampling.rows(B)
    p.temperature[:] = 0.9
    p.topk[:] = 50
    tokens, mask, pos, cache, dcache = r.tokens[:B], r.mask[:B], r.pos[:B], r.cache[:, :, :B], r.dcache[:, :, :B]
    h = m.step_backbone(tokens, mask, pos, cache)
    logits = m.codebook0_head(h)
    out = {}
    pieces = {"plain": (m.step_backbone, m.step_depth, sample)}
    if r.compiled is not None:
        pieces["compiled"] = r.compiled
    if r.fused is not None and B <= r.fused[1].max_rows:
        pieces["fused"] = r.fused
    for name, (backbone, depth, fn) in pieces.items():
        if backbone is not None:
            out[f"backbone_{name}"] = graph_ms(lambda: backbone(tokens, mask, pos, cache))

        def depth_loop():
            x = torch.stack([h, m.embed_codebook(0, logits.argmax(-1))], dim=1)
            dpos = torch.arange(2, device=h.device).expand(B, 2)
            for i in range(1, K):
                c = depth(x, dpos, dcache, m.audio_head[i - 1]).argmax(-1)
                x = m.embed_codebook(i, c)[:, None]
                dpos = dpos[:, -1:] + 1
        out[f"depth31_{name}"] = graph_ms(depth_loop)
        if fn is not None:
            out[f"sample32_{name}"] = graph_ms(lambda: [fn(logits, p, r.codebook_ids[i]) for i in range(K)])
    out["frame_" + r.variant.get(B, "?")] = graph_ms(lambda: r._step(B, r.variant.get(B, "plain/plain/plain")))
    return out


def mimi_ms(codec: MimiCodec, B: int, iters: int = 20) -> dict:
    """One Mimi frame for B rows: eager (moshi's partial graphs) and as one graph (capture())."""
    out = {}
    codes = torch.randint(0, 2048, (B, 32), device="cuda")
    on = torch.ones(B, dtype=torch.bool, device="cuda")
    for name in ("eager", "graphed"):
        with codec.streaming(B) as dec:
            if name == "graphed":
                dec.capture()
            dec.step(codes, on)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(iters):
                dec.step(codes, on)
            t1.record()
            torch.cuda.synchronize()
            out[f"mimi_{name}"] = t0.elapsed_time(t1) / iters
    return out


def pdl_ms(r: ModelRunner, B: int) -> dict:
    """The all-Triton frame captured with and without programmatic dependent launch."""
    out = {}
    for flag in ("1", "0"):
        os.environ["CSM_PDL"] = flag
        out[f"frame_triton_pdl{flag}"] = graph_ms(lambda: r._step(B, "triton/triton/triton"))
    os.environ["CSM_PDL"] = "1"
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    t = time.perf_counter()
    model = build_random_full("cuda", torch.bfloat16).model.to("cuda", torch.bfloat16).eval()
    r = ModelRunner(model, max(batches), torch.device("cuda"), torch.bfloat16, compile=not a.no_compile)
    r.capture_all()
    print(f"capture {time.perf_counter() - t:.0f} s; per-bucket variant timings (ms): {r.timings}", flush=True)
    codec = MimiCodec.load(None, device="cuda")
    res = {"device": torch.cuda.get_device_name(), "capture_timings_ms": r.timings}
    for B in batches:
        res[B] = breakdown(r, B)
        res[B].update(mimi_ms(codec, max(B, 8)))  # the engine's first Mimi lane holds 8 rows
        if r.fused is not None and B <= r.fused[1].max_rows:
            res[B].update(pdl_ms(r, B))
        print(B, json.dumps(res[B], default=float), flush=True)
    print(json.dumps(res, default=float))


if __name__ == "__main__":
    main()
