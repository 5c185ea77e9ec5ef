"""Faults injected into the runner: out-of-memory steps are survived, a crash is reported."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from csm_voice_api.engine.engine import AsyncEngine
from csm_voice_api.engine.types import Conversation, Sampling, VoicePrompt
from csm_voice_api.errors import Overloaded

from ..live import demo_engine
from .conftest import engine_idle, eventually, serve


def fail_once(monkeypatch, engine: AsyncEngine, method: str, exc: BaseException) -> list[int]:
    """The runner's `method` raises `exc` on its next call, then works again. Returns a call log."""
    real = getattr(engine.runner, method)
    calls: list[int] = []

    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, method, faulty)
    return calls


def voice(speaker: int = 0) -> Conversation:
    return Conversation(VoicePrompt(segments=(), speaker=speaker))


async def test_oom_in_a_prefill_fails_only_that_request(engine, monkeypatch):
    a, b = voice(0), voice(1)
    gen_a = engine.generate(a, "Hello there, my friend.", sampling=Sampling(max_audio_ms=1600, seed=1))
    try:
        assert (await anext(gen_a)).frames > 0  # a is decoding
        calls = fail_once(monkeypatch, engine, "prefill", torch.OutOfMemoryError("injected"))
        with pytest.raises(Overloaded) as e:
            async for _ in engine.generate(b, "Another voice speaks now.", sampling=Sampling(max_audio_ms=800)):
                pass
        assert calls and e.value.code == "gpu_out_of_memory"
        rest = [c async for c in gen_a]  # a was not in that step: it runs to its normal end
        assert rest[-1].done and rest[-1].stop_reason in ("eos", "max_length")
        assert len(a.turns) == 1 and b.turns == []
        # b's slot came back and b can speak now.
        chunks = [c async for c in engine.generate(b, "Another voice speaks now.", sampling=Sampling(max_audio_ms=400))]
        assert chunks[-1].done and len(b.turns) == 1
    finally:
        await gen_a.aclose()
        engine.release(a)
        engine.release(b)
    await eventually(lambda: engine_idle(engine) and engine.stats()["warm"] == 0, what="slots released")
    assert engine.healthy


async def test_oom_in_a_decode_step_fails_the_stream_and_the_server_recovers(live_factory, engine, monkeypatch):
    live = live_factory()
    body = {"input": "Hello there, my good friend.", "voice": "alloy", "response_format": "pcm",
            "stream_format": "sse", "max_audio_length_ms": 4000}
    events = []
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
        async with c.stream("POST", "/v1/audio/speech", json=body) as r:
            lines = r.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    break
            fail_once(monkeypatch, engine, "step", torch.OutOfMemoryError("injected"))
            async for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[0]["type"] == "speech.audio.delta"
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "gpu_out_of_memory"
        await eventually(lambda: engine_idle(engine), what="failed rows released")
        health = (await c.get("/health")).json()
        assert health["status"] == "ok" and health["stats"]["active"] == 0
        r = await c.post("/v1/audio/speech", json={**body, "stream_format": "audio", "stream": False,
                                                   "max_audio_length_ms": 400})
        assert r.status_code == 200 and int(r.headers["x-audio-frames"]) >= 1
    assert engine.healthy


@pytest.fixture
def doomed_engine():
    """A separate engine that a test may kill."""
    with demo_engine(2) as eng:
        yield eng


async def test_engine_crash_turns_health_red_and_closes_sockets_1011(doomed_engine, monkeypatch, tmp_path):
    with serve(doomed_engine, tmp_path) as live:
        sid = live.open_session()
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
        fail_once(monkeypatch, doomed_engine, "step", RuntimeError("injected: device lost"))
        async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}") as ws:
            await ws.send(json.dumps({"text_chunk": "Hello there.", "is_final": True}))
            with pytest.raises(ConnectionClosed) as e:
                with anyio.fail_after(60):
                    while True:
                        await ws.recv()
        assert e.value.rcvd is not None and e.value.rcvd.code == 1011
        assert not doomed_engine.healthy
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        assert httpx.get(live.url + "/ready").status_code == 503
        r = httpx.post(live.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
