"""The watermark on every route's audio, /health's report of it, and POST /v1/watermark/verify.

The demo engine watermarks with silentcipher's real code on random networks: the message does not
decode as the key, so these tests check the plumbing (what is marked, how, same length, off means
untouched, verify runs the real decode) rather than detection, as tests/audio/test_watermark.py does.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from csm_voice_api.app import build_app
from csm_voice_api.audio.watermark import (
    CPU_PHASE_SEARCH_S,
    CPU_PHASE_STEP,
    StreamWatermarker,
    demo_watermarker,
    verify_file,
)
from csm_voice_api.engine.engine import AsyncEngine

from .conftest import make_settings
from .test_sessions_support import reference, session_fields, wav_samples

SPEECH = {"model": "csm-1b", "input": "Hello there, this is a test.", "voice": "alloy", "seed": 5}


@pytest.fixture
def other_settings(tmp_path_factory):
    """Settings for a second app beside `client` (its own data dir: one server per voice store)."""
    return lambda **overrides: make_settings(tmp_path_factory.mktemp("app"), **overrides)


@pytest.fixture
async def client_off(other_settings, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(other_settings(watermark=False), engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            yield c


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def marked_like(pcm: np.ndarray, min_chunk_s: float | None, piece: int, growth: float = 1.0) -> np.ndarray:
    """`pcm` through a StreamWatermarker fed in `piece`-sample writes, as a route feeds it."""
    stream = StreamWatermarker(demo_watermarker(), min_chunk_s, growth)
    parts = [stream.write(pcm[i : i + piece]) for i in range(0, pcm.size, piece)]
    return np.concatenate([*parts, stream.flush()])


async def speech(c: httpx.AsyncClient, **extra: object) -> bytes:
    r = await c.post("/v1/audio/speech", json={**SPEECH, "max_audio_length_ms": 1200, **extra})
    assert r.status_code == 200, r.text
    return r.content


# --- what the routes return ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_speech_is_watermarked_same_length_and_off_means_untouched(client, client_off, stream):
    on = pcm16(await speech(client, response_format="pcm", stream=stream))
    off = pcm16(await speech(client_off, response_format="pcm", stream=stream))
    assert off.size == 15 * 1920  # 1.2 s: more than one message period, less than two
    assert np.array_equal(off, pcm16(await speech(client_off, response_format="pcm", stream=stream)))
    assert on.shape == off.shape
    assert 1e-4 < rel_rms(on, off) < 0.1  # silentcipher's -36 dB message, not another signal
    # Marked in look-behind pieces that start at one engine chunk (2 frames) and grow x1.5, whether
    # streamed or not: the route's audio is that, up to the int16 rounding of both sides (and not
    # whole periods).
    want = marked_like(off, 0.16, piece=2 * 1920, growth=1.5)
    other = marked_like(off, None, piece=2 * 1920)
    err = float(np.abs(on - want).max())
    assert err < 2e-3 and err < 0.25 * float(np.abs(on - other).max())


async def test_sse_audio_is_watermarked(client, client_off):
    def audio(body: bytes) -> np.ndarray:
        events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        import base64

        raw = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        return pcm16(raw)

    on = audio(await speech(client, response_format="pcm", stream_format="sse"))
    off = audio(await speech(client_off, response_format="pcm", stream_format="sse"))
    assert on.shape == off.shape and off.size > 0
    assert not np.array_equal(on, off)


async def test_stream_text_route_is_watermarked(client, client_off):
    async def say(c: httpx.AsyncClient) -> np.ndarray:
        files = {"audio_file": ("ref.wav", reference(), "audio/wav")}
        r = await c.post("/v1/streaming-session", files=files, data=session_fields())
        sid = r.json()["session_id"]
        body = {"session_id": sid, "text_chunk": "One phrase here. And another one.", "is_final": True}
        r = await c.post("/v1/stream-text", json=body)
        assert r.status_code == 200, r.text
        return wav_samples(r.content)

    on, off = await say(client), await say(client_off)
    assert on.shape == off.shape and off.size > 0
    assert not np.array_equal(on, off)


def test_websocket_audio_is_watermarked(settings_factory, engine):
    def say(watermark: bool) -> np.ndarray:
        with TestClient(build_app(settings_factory(watermark=watermark), engine)) as c:
            r = c.post("/v1/streaming-session", files={"audio_file": ("ref.wav", reference())}, data=session_fields())
            sid = r.json()["session_id"]
            with c.websocket_connect(f"/v1/ws/stream-text/{sid}") as ws:
                ws.send_text(json.dumps({"text_chunk": "First phrase here. Second one", "is_final": False}))
                ws.send_text(json.dumps({"text_chunk": " to end.", "is_final": True}))
                audio, events = bytearray(), []
                while not events or events[-1]["type"] != "done":
                    msg = ws.receive()
                    if msg.get("bytes") is not None:
                        audio += msg["bytes"]
                    else:
                        events.append(json.loads(msg["text"]))
        frames = sum(e["frames"] for e in events if e["type"] == "segment.done")
        pcm = wav_samples(bytes(audio))
        assert pcm.size == frames * 1920 > 0  # every phrase flushed: nothing held back at `done`
        return pcm

    on, off = say(True), say(False)
    assert on.shape == off.shape
    assert not np.array_equal(on, off)


async def test_voice_clone_is_watermarked(client, client_off):
    async def clone(c: httpx.AsyncClient) -> np.ndarray:
        files = {"audio_file": ("ref.wav", reference(), "audio/wav")}
        data = {"text": "Cloned words.", "max_audio_length_ms": "400", "seed": "3", "stream": "true"}
        r = await c.post("/v1/voice-clone", files=files, data=data)
        assert r.status_code == 200, r.text
        return wav_samples(r.content)

    on, off = await clone(client), await clone(client_off)
    assert on.shape == off.shape and off.size > 0
    assert not np.array_equal(on, off)


# --- /health ---------------------------------------------------------------------------------


async def test_health_reports_the_watermark(client, client_off, other_settings, engine):
    assert (await client.get("/health")).json()["watermark"] == {"enabled": True, "applied": True, "key": "public"}
    assert (await client_off.get("/health")).json()["watermark"] == {"enabled": False, "applied": False, "key": None}
    app = build_app(other_settings(watermark_key="1,2,3,4,5"), engine)
    async with app.router.lifespan_context(app):
        assert app.state.watermark.watermarker.key == (1, 2, 3, 4, 5)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).json()["watermark"]["key"] == "private"


async def test_a_bad_key_stops_startup_and_names_the_setting(settings_factory, engine):
    app = build_app(settings_factory(watermark_key="1,2,3"), engine)
    with pytest.raises(ValueError, match="CSM_WATERMARK_KEY"):
        async with app.router.lifespan_context(app):
            pass


# --- POST /v1/watermark/verify ---------------------------------------------------------------


async def test_verify_runs_the_real_decode_on_the_upload(client):
    wav = await speech(client, response_format="wav")
    r = await client.post("/v1/watermark/verify", files={"audio_file": ("out.wav", wav, "audio/wav")})
    assert r.status_code == 200, r.text
    got = r.json()
    # The demo's random networks decode some message, not the key: the answer must be exactly
    # silentcipher's decode of the file, with the bounded CPU phase search.
    want = verify_file(io.BytesIO(wav), demo_watermarker(), phase_search_s=CPU_PHASE_SEARCH_S,
                       phase_step=CPU_PHASE_STEP)  # fmt: skip
    assert got == {"watermarked": want.watermarked, "key_matches": want.key_matches,
                   "confidence": want.confidence, "key": "public"}  # fmt: skip
    assert got["key_matches"] is False


async def test_verify_works_with_watermarking_off(client_off):
    wav = await speech(client_off, response_format="wav")
    r = await client_off.post("/v1/watermark/verify", files={"audio_file": ("out.wav", wav, "audio/wav")})
    assert r.status_code == 200, r.text
    assert r.json()["key_matches"] is False and r.json()["key"] == "public"


async def test_verify_too_short_audio_is_not_watermarked(client):
    wav = await speech(client, response_format="wav", max_audio_length_ms=400)  # < one message period
    r = await client.post("/v1/watermark/verify", files={"audio_file": ("out.wav", wav, "audio/wav")})
    assert r.json() == {"watermarked": False, "key_matches": False, "confidence": None, "key": "public"}


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [(b"definitely not audio" * 50, 415, "file"), (b"", 400, "audio_file")],
)
async def test_verify_bad_uploads_in_openai_shape(client, content, status, param):
    r = await client.post("/v1/watermark/verify", files={"audio_file": ("x.wav", content, "audio/wav")})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param and set(err) >= {"message", "type", "param", "code"}


async def test_verify_needs_the_file(client):
    r = await client.post("/v1/watermark/verify", data={"x": "y"})
    assert r.status_code in (400, 422)
