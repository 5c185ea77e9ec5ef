"""/health, /ready, /metrics and the listing routes clients probe before speaking."""

from __future__ import annotations

import httpx

from csm_voice_api.app import build_app


async def test_health_reports_the_engine(client, engine):
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert (body["model"], body["is_demo"], body["device"]) == (engine.model_name, True, "cpu")
    assert body["watermark"] == {"enabled": True, "applied": True, "key": "public"}
    assert (await client.get("/ready")).json() == {"status": "ready"}


class DeadEngine:
    """Stands in for an engine whose loop has died: only what /health and routes read."""

    model_name, is_demo, demo_reason, device, healthy = "demo", True, None, "cpu", False

    def stats(self) -> dict:
        return {}


async def test_health_and_routes_go_red_when_the_engine_died(settings):
    app = build_app(settings, DeadEngine())  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead"
            assert (await c.get("/ready")).status_code == 503
            r = await c.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "engine_dead"


async def test_metrics_count_frames_and_first_audio(client):
    before = (await client.get("/metrics")).text
    r = await client.post(
        "/v1/audio/speech", json={"input": "Hi.", "voice": "echo", "max_audio_length_ms": 320, "stream": False}
    )
    frames = int(r.headers["x-audio-frames"])
    m = await client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")

    def value(text: str, name: str) -> float:
        line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), f"{name} 0")
        return float(line.split()[-1])

    assert value(m.text, "csm_frames_total") >= value(before, "csm_frames_total") + frames
    assert value(m.text, 'csm_time_to_first_audio_seconds_count{route="speech"}') == (
        value(before, 'csm_time_to_first_audio_seconds_count{route="speech"}') + 1
    )
    for name in ("csm_active_sessions", "csm_queue_depth", "csm_slots 4.0", "csm_rejections"):
        assert name in m.text


async def test_listings(client, engine):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == engine.model_name
    assert {"csm-1b", "tts-1"} <= {m["id"] for m in models["data"]}
    audio_models = (await client.get("/v1/audio/models")).json()["models"]
    assert audio_models[0]["id"] == engine.model_name
    voices = (await client.get("/v1/audio/voices")).json()
    assert voices["object"] == "list" and voices["voices"] == voices["data"]
    ids = [v["id"] for v in voices["voices"]]
    assert {"alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(ids)
    assert all(set(v) >= {"id", "name"} for v in voices["voices"])
    formats = (await client.get("/v1/audio/speech/response-formats")).json()
    assert formats["response_formats"] == ["mp3", "opus", "aac", "flac", "wav", "pcm"]
