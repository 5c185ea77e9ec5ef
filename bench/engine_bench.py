"""GPU benchmark of the engine against the transformers peer, on full-size random bf16 weights.

Speed does not depend on weight values, so both sides get the same random CSM-1B-shaped weights
(built by transformers, converted by our loader) and the same prompt: 10 s of reference audio
codes + its transcript + a sentence. Prints a table and writes JSON (see --out).

    python bench/engine_bench.py --out bench/results/<device>-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm_voice_api.audio.codec import MimiCodec  # noqa: E402
from csm_voice_api.engine.engine import AsyncEngine, EngineConfig  # noqa: E402
from csm_voice_api.engine.model import ModelArgs  # noqa: E402
from csm_voice_api.engine.tokenizer import build_tiny_tokenizer  # noqa: E402
from csm_voice_api.engine.types import Conversation, Sampling, Segment, VoicePrompt  # noqa: E402

TRANSCRIPT = ("So I was thinking about the trip next month, and honestly I am not sure we should drive the "
              "whole way, because last time it took us almost eleven hours and everyone was exhausted.")
SENTENCE = "That sounds like a plan, let's book the train tickets tonight before the prices go up."


def log(*a):
    print(*a, flush=True)


def build_weights(device, dtype, tiny=False):
    """Full-size random weights via transformers (the peer), converted into our model."""
    from csm_voice_api.engine.weights import _Tensors, build_model, convert_state, args_from_hf_config

    try:
        from transformers import CsmConfig, CsmForConditionalGeneration
    except ImportError:
        return None, _random_ours(device, dtype)
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, text_vocab_size=1024) if tiny else {}
    dsmall = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, backbone_hidden_size=64) if tiny else {}
    cfg = CsmConfig(**small, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    depth_decoder_config={"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **dsmall})
    torch.manual_seed(0)
    with torch.device(device):
        peer = CsmForConditionalGeneration(cfg).to(dtype).eval()
    tmp = Path(tempfile.mkdtemp())
    peer.save_pretrained(tmp)
    files = sorted(tmp.glob("*.safetensors"))
    args = args_from_hf_config(json.loads((tmp / "config.json").read_text()))
    ours = build_model(args, convert_state(_Tensors(files), args, device, dtype), device)
    return peer, ours


def _random_ours(device, dtype):
    from csm_voice_api.engine.model import CSM

    with torch.device(device):
        m = CSM(ModelArgs.csm_1b()).to(dtype)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.eval()


def cuda_ms(fn, iters):
    for _ in range(3):  # warm-up: first use of a shape pays for autotuning and allocation
        fn()
    if not torch.cuda.is_available():  # CPU dry run of the script
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1000 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def pipelined_ms(eng: AsyncEngine, B, iters) -> float:
    """Wall ms per frame of the engine's own loop code (AsyncEngine._launch / _apply): each step is
    queued (with its codes' copy to the host and its Mimi decode on the codec's stream) before the
    previous step's outputs are waited for, so neither Mimi nor the host's work holds up the next."""
    sync = torch.cuda.synchronize if eng.device.type == "cuda" else (lambda: None)
    prev = None
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        launched = eng._launch(B)
        if prev is not None:
            eng._apply(*prev)
        prev = launched
    eng._apply(*prev)
    eng._hand_out_audio()
    sync()
    return (time.perf_counter() - t) * 1000 / iters


def frame_timings(eng: AsyncEngine, batches, iters=30):
    """ms per decode step (all rows live at ~position 300), Mimi decode of those rows, and both."""
    r, lanes = eng.runner, eng._lanes
    eng.drain()  # the engine's last step may still hold the codec's other buffer
    out = {}
    for B in batches:
        if B > eng.max_batch:
            continue
        with torch.inference_mode():
            r.pos[:B] = 300
            r.active[:B] = True
            r.finished[:B] = False
            r.mask[:B, :32] = True
            r.sampling.temperature[:B] = 0.9
            r.sampling.topk[:B] = 50
            step = cuda_ms(lambda: r.step(B), iters)
            r.audible[:B] = True
            mimi = cuda_ms(lambda: lanes.step(r.out, r.audible, B), iters)

            def both():
                r.step(B)
                lanes.step(r.out, r.audible, B)
            serial = cuda_ms(both, iters)
            total = pipelined_ms(eng, B, iters)
            r.pos[:B] = r.parked
            r.active[:B] = False
        out[B] = {"step_ms": step, "mimi_ms": mimi, "serial_ms": serial, "frame_ms": total, "agg_fps": B * 1000 / total}
        log(f"  B={B:4d}  step {step:6.2f} ms  mimi {mimi:5.2f} ms  step+mimi {serial:6.2f} ms  "
            f"frame (engine loop) {total:6.2f} ms  per-stream {1000 / total:6.1f} fps  aggregate {B * 1000 / total:8.0f} fps")
    return out


async def stream_run(eng, voice, n, frames, chunk_frames=1):
    """n concurrent requests; per-stream frame rate and gaps between chunks."""
    async def one(i):
        conv = Conversation(voice)
        stamps = []
        t0 = time.perf_counter()
        first = None
        async for ch in eng.generate(conv, SENTENCE, sampling=Sampling(0.9, 50, seed=i, max_audio_ms=frames * 80),
                                     chunk_frames=chunk_frames):
            now = time.perf_counter()
            if ch.frames:
                first = first or now
                stamps.append((now, ch.frames))
        eng.release(conv)
        nframes = sum(f for _, f in stamps)
        gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        rate = (nframes - stamps[0][1]) / (stamps[-1][0] - stamps[0][0]) if len(stamps) > 1 else 0.0
        return {"ttfa": first - t0, "frames": nframes, "fps": rate, "gaps": gaps}

    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(i) for i in range(n)])
    wall = time.perf_counter() - t0
    gaps = sorted(g for r in res for g in r["gaps"])
    p99 = gaps[int(0.99 * (len(gaps) - 1))] * 1000 if gaps else 0.0
    return {"streams": n, "min_stream_fps": min(r["fps"] for r in res),
            "median_stream_fps": statistics.median(r["fps"] for r in res), "p99_gap_ms": p99,
            "aggregate_fps": sum(r["frames"] for r in res) / wall,
            "median_ttfa_ms": statistics.median(r["ttfa"] for r in res) * 1000}


async def ttfa(eng, voice_codes, n=5):
    """Time to first audio: cold (voice KV computed) and warm (voice KV cached)."""
    cold, warm = [], []
    for i in range(n):
        voice = VoicePrompt((Segment(0, TRANSCRIPT + f" {i}", voice_codes),), 0)  # new key: cold
        for bucket in (cold, warm):
            conv = Conversation(voice)
            t0 = time.perf_counter()
            agen = eng.generate(conv, SENTENCE, sampling=Sampling(0.9, 50, seed=i, max_audio_ms=800), chunk_frames=1)
            async for ch in agen:
                if ch.frames:
                    bucket.append((time.perf_counter() - t0) * 1000)
                    break
            await agen.aclose()
            eng.release(conv)
    return statistics.median(cold), statistics.median(warm)


def graph_vs_eager(eng, B=4, n=16):
    """Greedy codes from captured graphs equal the same step run eagerly, from identical state.

    Compared at the runner with a fixed bucket: across requests, bf16 results also depend on the
    batch size a frame ran at (cuBLAS picks kernels by shape), which timing makes vary.
    """
    r = eng.runner
    if not r.use_graphs:
        return {"skipped": "no CUDA graphs on this device"}
    with torch.inference_mode():
        g = torch.Generator(device="cpu").manual_seed(0)
        r.pos[:B] = 300 + torch.arange(B, device=r.device)
        r.active[:B], r.finished[:B] = True, False
        r.tokens[:B] = torch.randint(0, 2048, (B, 33), generator=g).to(r.device)
        r.mask[:B, :32], r.mask[:B, 32] = True, False
        r.sampling.temperature[:B] = 0.0
        saved, kv = r._snapshot(), r.cache[:, :, :B].clone()

        def run(graph):
            r._restore(saved)
            r.cache[:, :, :B].copy_(kv)
            outs = []
            for _ in range(n):
                if graph:
                    r.graphs[B].replay()
                else:
                    r._step(B, r.variant.get(B, "plain/plain/plain"))
                outs.append(r.out[:B].clone())
            return torch.stack(outs)  # [n, B, K]

        on, off, off2 = run(True), run(False), run(False)
        for i in range(B):
            r.park_row(i)
        bad = (on != off).flatten(1).any(1).nonzero()
    return {"graphs_equal_eager": bool(torch.equal(on, off)), "eager_repeatable": bool(torch.equal(off, off2)),
            "first_mismatch_frame": int(bad[0]) if len(bad) else None, "frames": n, "rows": B,
            "variant": r.variant.get(B, "eager")}


def peer_frame_ms(peer, n_prompt, device, frames=64):
    """transformers' documented fast path: static caches on backbone and depth decoder (compiled).

    Its CSM generate ignores custom stopping criteria, so each run makes `frames` frames; the
    figure is the best of two warm runs over the frames produced (a 200-token prefill included,
    which only flatters the peer's per-frame time by a fraction of a percent).
    """
    peer.generation_config.cache_implementation = "static"
    peer.depth_decoder.generation_config.cache_implementation = "static"
    ids = torch.randint(0, min(30000, peer.config.text_vocab_size), (1, n_prompt), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def gen():
        sync()
        t = time.perf_counter()
        out = peer.generate(input_ids=ids, max_new_tokens=frames, min_new_tokens=frames, do_sample=True,
                            depth_decoder_do_sample=True)
        sync()
        seq = out if torch.is_tensor(out) else getattr(out, "sequences", out)
        made = seq.shape[1] - (n_prompt if seq.ndim == 2 else 0)  # codes [B, frames, K], or ids with the prompt
        return time.perf_counter() - t, int(made)

    t_first = gen()[0]
    runs = [gen() for _ in range(2)]
    t, made = min(runs)
    return t / max(1, made) * 1000, t_first, {"frames": made, "seconds": [r[0] for r in runs]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--streams", default="1,16,64,128,192,256")
    ap.add_argument("--stream-frames", type=int, default=40)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--frames-only", action="store_true", help="only the decode-step timings")
    ap.add_argument("--peer-only", action="store_true", help="only the transformers peer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the script, times nothing real")
    a = ap.parse_args()
    if a.dry_run:
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu-dry-run"
    else:
        device, dtype, name = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    log(f"device: {name}; torch {torch.__version__}")
    t = time.perf_counter()
    peer, ours = build_weights(device, dtype, tiny=a.dry_run)
    if a.peer_only:
        ms, first, detail = peer_frame_ms(peer, 200, device)
        log(json.dumps({"peer_frame_ms_b1": ms, "peer_first_call_s": first, **detail}))
        return
    log(f"weights built in {time.perf_counter() - t:.1f} s (peer: {'transformers' if peer is not None else 'none'})")
    tok = build_tiny_tokenizer()
    codec = MimiCodec.load(None, device=device, tiny=a.dry_run)
    loaded = types.SimpleNamespace(model=ours, tokenizer=tok, name="csm-1b-random", is_demo=False, prompt_clips=[])
    eng = AsyncEngine(loaded, codec, EngineConfig(device=device.type, max_batch=a.max_batch, voice_cache_size=64))
    results: dict = {"device": name, "date": dt.date.today().isoformat(), "torch": torch.__version__}
    # BENCH_COMMIT first: a copied working tree may carry a stale .git (the device machine's does).
    results["commit"] = os.environ.get("BENCH_COMMIT") or "unknown"
    if results["commit"] == "unknown":
        try:
            results["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except Exception:  # noqa: BLE001 - no git here: leave it unknown
            pass

    async def run():
        t0 = time.perf_counter()
        await eng.start()
        results["startup_capture_s"] = time.perf_counter() - t0
        results["compiled"] = eng.runner.compiled is not None
        results["variants"] = dict(eng.runner.variant)
        results["variant_replay_ms"] = dict(eng.runner.timings)
        log(f"graphs captured for buckets {eng.runner.buckets} in {results['startup_capture_s']:.1f} s "
            f"(variant per bucket: {eng.runner.variant})")
        if a.frames_only:
            results["frames"] = await eng._call(frame_timings, eng, [int(b) for b in a.batches.split(",")])
            await eng.shutdown()
            return
        ref = (np.random.RandomState(0).randn(24000 * 10) * 0.1).astype(np.float32)
        codes = await eng.encode(ref)
        voice = VoicePrompt((Segment(0, TRANSCRIPT, codes),), 0)
        log(f"prompt: {codes.shape[1]} reference frames + transcript + sentence")
        results["graphs_vs_eager_greedy"] = await eng._call(graph_vs_eager, eng)
        log(f"graphs on vs off (greedy, 3 rows): {results['graphs_vs_eager_greedy']}")
        cold, warm = await ttfa(eng, codes)
        results.update(ttfa_cold_ms=cold, ttfa_warm_ms=warm)
        log(f"TTFA cold {cold:.1f} ms, warm {warm:.1f} ms")
        log("decode step timings (CUDA events):")
        results["frames"] = await eng._call(frame_timings, eng, [int(b) for b in a.batches.split(",")])
        streams = []
        for n in [int(s) for s in a.streams.split(",") if int(s) <= eng.max_batch]:
            st = await stream_run(eng, voice, n, a.stream_frames)
            st["realtime"] = st["min_stream_fps"] >= 12.5 and st["p99_gap_ms"] <= 80
            streams.append(st)
            log(f"  {n:4d} streams: min {st['min_stream_fps']:6.1f} fps/stream, p99 gap {st['p99_gap_ms']:6.1f} ms, "
                f"aggregate {st['aggregate_fps']:7.0f} fps, median TTFA {st['median_ttfa_ms']:7.1f} ms, realtime {st['realtime']}")
        results["streams"] = streams
        results["max_realtime_streams"] = max([s["streams"] for s in streams if s["realtime"]], default=0)
        await eng.shutdown()

    asyncio.run(run())
    if a.frames_only:
        print(json.dumps(results, default=float))
        return
    kv = eng.runner.cache
    results["mem_per_session_mb"] = (kv.numel() * kv.element_size() / eng.max_batch) / 2**20
    if device.type == "cuda":
        results["gpu_mem_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    f1 = results["frames"][1]["frame_ms"]
    results["frame_ms_b1"], results["rtf_b1"] = f1, f1 / 80
    if peer is not None and not a.no_peer:
        try:
            ms, first, detail = peer_frame_ms(peer, 200, device)
            results.update(peer_frame_ms_b1=ms, peer_first_call_s=first, peer_detail=detail, speedup_vs_peer=ms / f1)
        except Exception as exc:  # noqa: BLE001 - report, keep our numbers
            results["peer_error"] = repr(exc)
    log("\n| metric | ours | transformers static+compile |\n|---|---|---|")
    log(f"| ms/frame, batch 1 (incl. Mimi) | {f1:.2f} | {results.get('peer_frame_ms_b1', float('nan')):.1f} |")
    log(f"| RTF, batch 1 | {f1 / 80:.3f} | {results.get('peer_frame_ms_b1', float('nan')) / 80:.3f} |")
    log(f"| speedup | {results.get('speedup_vs_peer', float('nan')):.1f}x | 1x |")
    log(f"| TTFA cold / warm | {results['ttfa_cold_ms']:.0f} / {results['ttfa_warm_ms']:.0f} ms | |")
    log(f"| max real-time streams | {results['max_realtime_streams']} | |")
    log(f"| KV per session | {results['mem_per_session_mb']:.0f} MiB | |")
    text = json.dumps(results, indent=2, default=float)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    log(text)


if __name__ == "__main__":
    main()
