"""Watermark cost with full-size random silentcipher networks (speed does not depend on weights).

    python bench/watermark_bench.py cuda 0.975 3 10   # device, then clip lengths in seconds
"""
import sys, time, json, numpy as np, torch
from csm_voice_api.audio.watermark import Watermarker, StreamWatermarker, MESSAGE_PERIOD_S
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
SR = 24000
def sig(s, seed=0):
    rng = np.random.default_rng(seed); t = np.arange(int(s*SR))/SR
    ph = 2*np.pi*np.cumsum(140+15*np.sin(2*np.pi*5*t))/SR
    return (0.1*sum(np.sin(k*ph)/k for k in range(1,12)) + 0.003*rng.standard_normal(t.size)).astype(np.float32)
def timeit(f, reps):
    f(); sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
wm = Watermarker.random(device=dev)
res = {"device": dev, "torch_threads": torch.get_num_threads()}
reps = 3 if dev == "cpu" else 10
for s in [float(a) for a in sys.argv[2:]] or [MESSAGE_PERIOD_S, 3.0, 10.0]:
    x = sig(s)
    res[f"apply_{s:.3f}s"] = timeit(lambda: wm.apply(x), reps)
x = sig(10.0)
for chunk in [None, 0.48, 0.24]:
    st_t = time.perf_counter()
    stream = StreamWatermarker(wm, min_chunk_s=chunk)
    per = []
    for i in range(0, x.size, 1920):  # one CSM frame (80 ms) at a time
        t = time.perf_counter(); out = stream.write(x[i:i+1920]); sync()
        if out.size: per.append(time.perf_counter() - t)
    stream.flush(); sync()
    tot = time.perf_counter() - st_t
    res[f"stream_{chunk}"] = {"chunk_s": stream.step/SR, "total_s_per_audio_s": tot/10.0,
                              "median_chunk_compute_s": float(np.median(per)), "max_chunk_compute_s": float(np.max(per))}
y = wm.apply(sig(3.0))
res["verify_nosearch_3s"] = timeit(lambda: wm.verify(y, SR, phase_search_s=0), reps)
if dev != "cpu":
    res["verify_search3s_3s"] = timeit(lambda: wm.verify(y, SR, phase_search_s=3.0), 2)
    y10 = wm.apply(sig(10.0))
    res["verify_fullsearch_10s"] = timeit(lambda: wm.verify(y10, SR, phase_search_s=None), 1)
print(json.dumps(res, indent=1))
