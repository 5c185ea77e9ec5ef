"""The job queue over ASGI on the demo engine: submit, poll, result, cancel, webhooks, refusals."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from csm_voice_api.app import build_app
from csm_voice_api.engine.types import FRAME_SAMPLES

SCENE = {"scene": [{"text": "Hi there.", "speaker_id": 0}, {"text": "Hello.", "speaker_id": 1}],
         "seed": 1, "max_audio_length_ms": 800}  # fmt: skip


@asynccontextmanager
async def app_client(settings, engine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(settings, engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
            yield c


async def finished(c: httpx.AsyncClient, status_url: str) -> dict:
    for _ in range(1200):
        s = (await c.get(status_url)).json()
        if s["status"] in ("COMPLETED", "FAILED", "CANCELED"):
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"job never finished: {s}")


async def test_scene_job_completes_with_its_audio(settings, engine, decode_audio):
    async with app_client(settings, engine) as c:
        r = await c.post("/v1/queue/scene", json=SCENE)
        assert r.status_code == 200, r.text
        sub = r.json()
        assert sub["status_url"] == f"http://test/v1/queue/scene/requests/{sub['request_id']}/status"
        s = await finished(c, sub["status_url"])
        assert s["status"] == "COMPLETED" and s["progress"] == 1.0 and s["logs"], s
        result = (await c.get(sub["response_url"])).json()
        audio = (await c.get(result["audio"]["url"])).content
    assert result["audio"]["url"].startswith("http://test/v1/audio/")
    frames = sum(t["frames"] for t in result["turns"])
    assert len(decode_audio(audio, "wav").pcm) == frames * FRAME_SAMPLES > 0


async def test_speech_job_and_failures_keep_their_status(settings, engine, decode_audio):
    async with app_client(settings, engine) as c:
        ok = (await c.post("/v1/queue/speech", json={"input": "Hello.", "response_format": "wav", "seed": 2,
                                                      "max_audio_length_ms": 400})).json()  # fmt: skip
        bad = (await c.post("/v1/queue/speech", json={"input": "Hi.", "voice": "no-such-voice"})).json()
        assert (await finished(c, ok["status_url"]))["status"] == "COMPLETED"
        assert (await finished(c, bad["status_url"]))["status"] == "FAILED"
        result = (await c.get(ok["response_url"])).json()
        wav = (await c.get(result["audio"]["url"])).content
        failed = await c.get(bad["response_url"])
    assert len(decode_audio(wav, "wav").pcm) == result["frames"] * FRAME_SAMPLES
    assert failed.status_code == 404 and failed.json()["error"]["code"] == "voice_not_found"


async def test_queued_jobs_have_positions_and_cancel(settings_factory, engine):
    async with app_client(settings_factory(queue_workers=0), engine) as c:
        a, b = [(await c.post("/v1/queue/scene", json=SCENE)).json() for _ in range(2)]
        assert [(await c.get(x["status_url"])).json()["queue_position"] for x in (a, b)] == [0, 1]
        pending = await c.get(b["response_url"])
        assert pending.status_code == 202 and pending.json()["status"] == "IN_QUEUE"
        r = await c.put(a["cancel_url"])
        assert r.status_code == 200 and r.json()["status"] == "CANCELLATION_REQUESTED"
        assert (await c.get(a["status_url"])).json()["status"] == "CANCELED"
        assert (await c.get(b["status_url"])).json()["queue_position"] == 0
        assert (await c.put(a["cancel_url"])).status_code == 409
        assert (await c.get(a["response_url"])).status_code == 409


async def test_refusals(client: httpx.AsyncClient):
    assert (await client.post("/v1/queue/clone", json={})).status_code == 404
    assert (await client.get("/v1/queue/scene/requests/0123/status")).status_code == 404
    r = await client.post("/v1/queue/scene", json={"scene": []})
    assert r.status_code == 422 and r.json()["error"]["param"] == "scene", r.text
    assert (await client.post("/v1/queue/speech", json={"input": "  "})).status_code == 400
    for hook in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "ftp://example.com/x"):
        r = await client.post("/v1/queue/scene", json={**SCENE, "webhook_url": hook})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_url", (hook, r.text)


class _Hook(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.headers["Idempotency-Key"], body))
        self.send_response(503 if len(self.received) == 1 else 200)  # the first attempt fails
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def test_webhook_to_an_allowed_local_receiver(settings_factory, engine):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/done"
    settings = settings_factory(fetch_allow_networks=["127.0.0.1"], webhook_backoff_s=0.01)
    try:
        async with app_client(settings, engine) as c:
            sub = (await c.post(f"/v1/queue/scene?webhook_url={hook}", json=SCENE)).json()
            assert (await finished(c, sub["status_url"]))["status"] == "COMPLETED"
            for _ in range(400):
                if len(_Hook.received) >= 2:
                    break
                await asyncio.sleep(0.05)
            result = (await c.get(sub["response_url"])).json()
    finally:
        server.shutdown()
    assert [k for k, _ in _Hook.received] == [sub["request_id"]] * 2
    assert _Hook.received[-1][1] == {"request_id": sub["request_id"], "status": "COMPLETED", "result": result,
                                     "error": None}  # fmt: skip
