"""Phrase-to-first-audio latency over the WebSocket, with 1, 16 and 64 concurrent sessions.

Starts the real server (uvicorn on 127.0.0.1) on the full-size random model unless --url is
given, opens N streaming sessions, and has each type three phrases token by token like an LLM
(one word every --token-ms). For every phrase it records the time from sending the phrase's
last token (the one that completes it) to the first binary audio frame that follows.

    python bench/ws_latency.py --sessions 1,16,64 [--model random] [--watermark off]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHRASES = ["Thanks for waiting, I found three options for you.",
           "The first one leaves at nine and arrives just before noon.",
           "The second is cheaper, but it has a long stop on the way."]


def reference_wav(seconds=5.0) -> bytes:
    pcm = (np.sin(np.arange(int(24000 * seconds)) * 2 * np.pi * 180 / 24000) * 0.3 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(24000), w.writeframes(pcm.tobytes())
    return buf.getvalue()


def start_server(model: str, watermark: bool, tmp: Path) -> str:
    import uvicorn

    from csm_voice_api.app import build_app
    from csm_voice_api.config import Settings

    os.environ["CSM_WATERMARK"] = "true" if watermark else "false"
    settings = Settings(model=model, data_dir=tmp, session_max=256, max_batch=128)
    app = build_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", ws_max_size=1 << 20))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def one_session(url: str, ref: bytes, token_ms: float, seed: int) -> list[float]:
    import httpx
    import websockets

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        r = await http.post("/v1/streaming-session", files={"audio_file": ("ref.wav", ref, "audio/wav")},
                            data={"context_text": "A short reference clip.", "output_format": "pcm",
                                  "seed": str(seed), "max_audio_length_ms": "1600"})
        r.raise_for_status()
        sid = r.json()["session_id"]
    ws_url = url.replace("http", "ws") + f"/v1/ws/stream-text/{sid}"
    latencies: list[float] = []
    sent_last: list[float] = []
    async with websockets.connect(ws_url, max_size=None) as ws:
        async def reader():
            waiting = True
            async for msg in ws:
                if isinstance(msg, bytes):
                    if waiting and len(latencies) < len(sent_last):
                        latencies.append(time.perf_counter() - sent_last[len(latencies)])
                        waiting = False
                else:
                    ev = json.loads(msg)
                    if ev.get("type") == "segment.done":
                        waiting = True
                    if ev.get("type") in ("done", "error"):
                        return

        task = asyncio.create_task(reader())
        for i, phrase in enumerate(PHRASES):
            words = phrase.split(" ")
            for j, w in enumerate(words):
                last = j == len(words) - 1
                await ws.send(json.dumps({"text_chunk": w + " ", "is_final": last and i == len(PHRASES) - 1}))
                if last:
                    sent_last.append(time.perf_counter())
                await asyncio.sleep(token_ms / 1000)
            await asyncio.sleep(1.0)  # the "LLM" pauses between sentences
        await asyncio.wait_for(task, 300)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:  # free its slot for the next level
        await http.delete(f"/v1/streaming-session/{sid}")
    return latencies


async def run(url: str, sessions: list[int], token_ms: float) -> dict:
    ref = reference_wav()
    out = {}
    for n in sessions:
        lat = [x for xs in await asyncio.gather(*[one_session(url, ref, token_ms, s) for s in range(n)]) for x in xs]
        lat.sort()
        out[n] = {"phrases": len(lat), "p50_ms": statistics.median(lat) * 1000,
                  "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1000}
        print(f"  {n:3d} sessions: phrase-to-first-audio p50 {out[n]['p50_ms']:7.1f} ms, "
              f"p99 {out[n]['p99_ms']:7.1f} ms over {len(lat)} phrases", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="an already running server; default: start one here")
    ap.add_argument("--model", default="random")
    ap.add_argument("--watermark", choices=["on", "off", "both"], default="both")
    ap.add_argument("--sessions", default="1,16,64")
    ap.add_argument("--token-ms", type=float, default=30.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    sessions = [int(s) for s in a.sessions.split(",")]
    results = {}
    modes = [a.watermark] if a.watermark != "both" else ["off", "on"]
    import tempfile

    for mode in modes:
        url = a.url or start_server(a.model, mode == "on", Path(tempfile.mkdtemp()))
        print(f"watermark {mode}:", flush=True)
        results[f"watermark_{mode}"] = asyncio.run(run(url, sessions, a.token_ms))
        if a.url:
            break
    text = json.dumps(results, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
