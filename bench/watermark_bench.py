"""Watermark cost with full-size random silentcipher networks (speed does not depend on weights).

    python bench/watermark_bench.py --device cuda --streams 1,8,32,128 --json out.json

1. `apply` of one clip per length (silentcipher's encode_wav, one piece per call).
2. Many streams at once, each marking `--audio-s` of audio in the server's pieces (one engine
   chunk, x1.5 per piece up to a 0.975 s message period), fed as fast as the watermark takes them,
   side by side in one run:
   - "per piece": every piece its own encode_wav call on 4 threads (the server before batching);
   - "batched":   every stream's pieces through one BatchEncoder (the server now).
   Prints audio seconds marked per wall second (the real-time streams the watermark can carry)
   and each piece's latency (write() call to marked audio, waiting included).
3. `verify` with and without the phase search.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from csm_voice_api.audio.watermark import MESSAGE_PERIOD_S, StreamWatermarker, Watermarker
from csm_voice_api.audio.watermark_batch import BatchEncoder

SR = 24_000
CHUNK_S = 0.16  # two CSM frames: the server's default engine chunk and first piece
GROWTH = 1.5
OLD_WORKERS = 4


def voice_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    ph = 2 * np.pi * np.cumsum(140 + 15 * np.sin(2 * np.pi * 5 * t)) / SR
    x = sum(np.sin(k * ph) / k for k in range(1, 12)) + 0.03 * rng.standard_normal(t.size)
    return (0.1 * x).astype(np.float32)


def timeit(f, reps: int, sync) -> float:
    f()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def run_streams(wm: Watermarker, streams: int, audio_s: float, apply, threads: int) -> dict:
    """`streams` streams, each fed CHUNK_S at a time; `threads` bounds streams writing at once."""
    x = voice_like(audio_s, seed=streams)
    step = round(CHUNK_S * SR)
    lat: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        s = StreamWatermarker(wm, CHUNK_S, GROWTH, apply)
        for i in range(0, x.size, step):
            t = time.perf_counter()
            out = s.write(x[i : i + step])
            if out.size:
                with lock:
                    lat.append(time.perf_counter() - t)
        s.flush()

    started = time.perf_counter()
    with ThreadPoolExecutor(min(threads, streams)) as pool:
        list(pool.map(one, range(streams)))
    wall = time.perf_counter() - started
    return {"streams": streams, "wall_s": wall, "realtime_streams": streams * audio_s / wall,
            "piece_p50_ms": 1e3 * float(np.percentile(lat, 50)), "piece_p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "pieces": len(lat)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clips", default=f"{MESSAGE_PERIOD_S},3,10", help="apply() clip lengths, seconds")
    ap.add_argument("--streams", default="1,8,32,128", help="concurrent stream counts")
    ap.add_argument("--audio-s", type=float, default=4.8, help="audio per stream, seconds")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    dev = args.device
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = 10 if cuda else 3
    wm = Watermarker.random(device=dev)
    res: dict = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "apply": {}, "streams": []}
    for s in (float(c) for c in args.clips.split(",")):
        x = voice_like(s)
        res["apply"][f"{s:.3f}"] = timeit(lambda x=x: wm.apply(x), reps, sync)
        print(f"apply {s:6.3f} s clip: {1e3 * res['apply'][f'{s:.3f}']:7.1f} ms", flush=True)

    enc = BatchEncoder(wm)
    run_streams(wm, 4, 1.0, enc.apply, 4)  # first-use costs (cuDNN plans, allocator) out of the way
    run_streams(wm, 4, 1.0, wm.apply, 4)
    print(f"\n{args.audio_s:.1f} s per stream, pieces {CHUNK_S} s x{GROWTH}; per piece = {OLD_WORKERS} threads "
          "of encode_wav, batched = one BatchEncoder")
    print(f"{'streams':>7} | {'per piece: RT streams':>21} {'p50/p99 ms':>14} | {'batched: RT streams':>19} "
          f"{'p50/p99 ms':>14} | {'pieces/batch':>12}")
    for n in (int(v) for v in args.streams.split(",")):
        old = run_streams(wm, n, args.audio_s, wm.apply, OLD_WORKERS)
        before = enc.stats()
        new = run_streams(wm, n, args.audio_s, enc.apply, n)
        after = enc.stats()
        per_batch = (after["pieces"] - before["pieces"]) / max(1, after["batches"] - before["batches"])
        res["streams"].append({"per_piece": old, "batched": new, "pieces_per_batch": per_batch})
        print(f"{n:7d} | {old['realtime_streams']:21.1f} {old['piece_p50_ms']:6.1f}/{old['piece_p99_ms']:6.1f} "
              f"| {new['realtime_streams']:19.1f} {new['piece_p50_ms']:6.1f}/{new['piece_p99_ms']:6.1f} "
              f"| {per_batch:12.1f}", flush=True)
    enc.close()

    y = wm.apply(voice_like(3.0))
    res["verify_nosearch_3s"] = timeit(lambda: wm.verify(y, SR, phase_search_s=0), reps, sync)
    if cuda:
        res["verify_search3s_3s"] = timeit(lambda: wm.verify(y, SR, phase_search_s=3.0), 2, sync)
    print("\nverify 3 s: no phase search %.1f ms%s" % (1e3 * res["verify_nosearch_3s"], "" if not cuda else
          ", 3 s search %.0f ms" % (1e3 * res["verify_search3s_3s"])))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
