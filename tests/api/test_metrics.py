"""csm_stage_seconds: every step between the engine and the socket is timed on real requests."""

from __future__ import annotations

import json

import anyio
import httpx
import numpy as np
from websockets.asyncio.client import connect

from csm_voice_api.api import metrics


def stage_counts(text: str) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith('csm_stage_seconds_count{stage="'):
            name = line.split('"')[1]
            counts[name] = float(line.split()[-1])
    return counts


def scrape(url: str) -> dict[str, float]:
    return stage_counts(httpx.get(url + "/metrics", timeout=30).text)


async def test_stages_are_recorded_for_speech_streams_and_websockets(live_server):
    url = live_server.url
    before = scrape(url)
    assert set(before) == set(metrics.STAGES)  # exported from the first scrape, zeros included
    body = {"input": "Hello there.", "voice": "alloy", "response_format": "mp3", "max_audio_length_ms": 480}
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", url + "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200
            assert len(b"".join([b async for b in r.aiter_bytes()])) > 0
        after_speech = scrape(url)
        form = {"voice_id": "alloy", "output_format": "pcm", "max_audio_length_ms": "480"}
        sid = (await c.post(url + "/v1/streaming-session", data=form)).json()["session_id"]
    async with connect(f"ws{url[4:]}/v1/ws/stream-text/{sid}") as ws:
        await ws.send(json.dumps({"text_chunk": "Hi there.", "is_final": True}))
        with anyio.fail_after(60):
            while not (isinstance(m := await ws.recv(), str) and json.loads(m)["type"] == "done"):
                pass
    after_ws = scrape(url)
    # 480 ms is three chunks of two frames: one first chunk and two gaps per stream.
    for stage in ("engine_first_chunk", "engine_chunk_gap", "engine_wait", "watermark_wait",
                  "watermark_compute", "loop_lag", "encode", "send_http"):  # fmt: skip
        assert after_speech[stage] > before[stage], stage
    assert after_speech["engine_chunk_gap"] - before["engine_chunk_gap"] >= 2
    assert after_speech["send_ws"] == before["send_ws"]
    for stage in ("engine_first_chunk", "engine_chunk_gap", "watermark_compute", "encode", "send_ws"):
        assert after_ws[stage] > after_speech[stage], stage


def test_stage_observations_land_in_their_buckets():
    hist = metrics.STAGE_SECONDS.labels(stage="encode")
    count, total = _count_sum(hist)
    metrics.observe("encode", 0.004)
    metrics.observe("encode", -1.0)  # a clock step never records a negative time
    new_count, new_total = _count_sum(hist)
    assert new_count == count + 2 and np.isclose(new_total - total, 0.004)
    assert metrics.STAGE_BUCKETS[0] == 0.001 and metrics.STAGE_BUCKETS[-1] == 10.0


def _count_sum(hist) -> tuple[float, float]:  # noqa: ANN001 - a prometheus_client child
    samples = {s.name: s.value for s in hist.collect()[0].samples if not s.name.endswith("_bucket")}
    return samples["csm_stage_seconds_count"], samples["csm_stage_seconds_sum"]
