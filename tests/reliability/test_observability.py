"""/health exercises the engine thread; /metrics carries the gauges an operator alerts on."""

from __future__ import annotations

import asyncio
import json

import anyio
import httpx
from websockets.asyncio.client import connect

from .conftest import engine_idle, eventually


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


async def test_health_pings_the_engine_loop(live_factory, engine, monkeypatch):
    live = live_factory()
    body = httpx.get(live.url + "/health").json()
    assert body["status"] == "ok" and body["admission"]["capacity"] == engine.stats()["slots"]

    async def wedged() -> None:  # a loop that is alive but never answers
        await asyncio.sleep(3600)

    from csm_voice_api.api import health

    monkeypatch.setattr(engine, "ping", wedged)
    monkeypatch.setattr(health, "PING_TIMEOUT_S", 0.2)
    r = httpx.get(live.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "dead"


async def test_metrics_cover_sessions_queue_frames_ttfa_and_rejections(live_factory, engine):
    live = live_factory(max_inflight=1)
    sid = live.open_session()
    frames_before = metric(httpx.get(live.url + "/metrics").text, "csm_frames_total")
    async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}") as ws:
        await ws.send(json.dumps({"text_chunk": "Hi there.", "is_final": True}))
        with anyio.fail_after(60):
            while not (isinstance(m := await ws.recv(), str) and json.loads(m)["type"] == "done"):
                pass
        text = httpx.get(live.url + "/metrics").text
        assert metric(text, "csm_active_sessions") == 1
        assert metric(text, "csm_attached_sessions") == 1
        assert metric(text, "csm_open_websockets") == 1
    r = httpx.post(live.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "response_format": "pcm",
                                                        "max_audio_length_ms": 240, "stream": False}, timeout=60)
    assert r.status_code == 200
    await eventually(lambda: engine_idle(engine))
    text = httpx.get(live.url + "/metrics").text
    assert metric(text, "csm_frames_total") > frames_before
    assert metric(text, 'csm_time_to_first_audio_seconds_count{route="speech"}') >= 1
    for name in ("csm_queue_depth", "csm_active_generations", "csm_inflight_generations", "csm_draining"):
        assert metric(text, name) == 0, name
    assert 0 < metric(text, "csm_free_slots") <= metric(text, "csm_slots") == engine.stats()["slots"]
    assert metric(text, "csm_admission_capacity") == 1
    before = _rejected(text, "overloaded")
    live.admission.inflight = 1  # as if a generation were running
    try:
        assert httpx.post(live.url + "/v1/audio/speech", json={"input": "Hi."}).status_code == 429
    finally:
        live.admission.inflight = 0
    assert _rejected(httpx.get(live.url + "/metrics").text, "overloaded") == before + 1


def _rejected(text: str, reason: str) -> float:
    try:
        return metric(text, f'csm_rejections_total{{reason="{reason}"}}')
    except AssertionError:
        return 0.0
