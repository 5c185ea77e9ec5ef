"""POST /v1/audio/speech against the demo engine: every format, streaming, SSE, speed, clone."""

from __future__ import annotations

import base64
import io
import json
import wave

import httpx
import numpy as np
import pytest

from csm_voice_api.api.models import RESPONSE_FORMATS
from csm_voice_api.app import build_app

FRAME = 1920
SHORT = {"model": "csm-1b", "voice": "alloy", "input": "Hello there.", "max_audio_length_ms": 800, "seed": 7}


def sse_events(body: bytes) -> list[dict]:
    events = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: ") :]))
    return events


@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
async def test_whole_file_decodes_to_generated_length(client, decode_audio, codec_slack, fmt):
    r = await client.post("/v1/audio/speech", json={**SHORT, "response_format": fmt, "stream": False})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == {
        "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
    }[fmt]  # fmt: skip
    assert int(r.headers["content-length"]) == len(r.content)
    frames = int(r.headers["x-audio-frames"])
    assert 1 <= frames <= 10  # 800 ms at most
    audio = decode_audio(r.content, fmt)
    assert audio.channels == 1
    # Opus always decodes at 48 kHz; the stream itself was encoded from 24 kHz.
    assert audio.rate == (48_000 if fmt == "opus" else 24_000)
    assert abs(audio.samples_24k - frames * FRAME) <= codec_slack[fmt]


async def test_whole_wav_has_exact_header_sizes(client):
    r = await client.post("/v1/audio/speech", json={**SHORT, "response_format": "wav", "stream": False})
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        assert w.getnframes() == int(r.headers["x-audio-frames"]) * FRAME


@pytest.mark.parametrize("fmt", RESPONSE_FORMATS)
async def test_sse_deltas_then_done_in_every_format(client, decode_audio, codec_slack, fmt):
    body = {**SHORT, "response_format": fmt, "stream_format": "sse"}
    r = await client.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert len(events) >= 2
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens"] > 0 and 1 <= usage["output_tokens"] <= 10
    stream = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    audio = decode_audio(stream, fmt)
    assert abs(audio.samples_24k - usage["output_tokens"] * FRAME) <= codec_slack[fmt]


async def test_streamed_audio_matches_the_whole_file(client):
    # (ASGITransport buffers the body: that it arrives in pieces is checked in test_live.py.)
    body = {**SHORT, "response_format": "pcm", "max_audio_length_ms": 1600}
    async with client.stream("POST", "/v1/audio/speech", json=body) as r:
        assert r.status_code == 200
        assert "content-length" not in r.headers
        streamed = b"".join([c async for c in r.aiter_raw()])
    assert len(streamed) % (2 * FRAME) == 0 and streamed
    whole = await client.post("/v1/audio/speech", json={**body, "stream": False})
    # Same seed, same prompt: the same audio, whether streamed or not.
    assert streamed == whole.content


async def test_speed_two_halves_duration(client, decode_audio):
    body = {**SHORT, "response_format": "pcm", "max_audio_length_ms": 2000, "stream": False}
    r = await client.post("/v1/audio/speech", json={**body, "speed": 2.0})
    assert r.status_code == 200, r.text
    frames = int(r.headers["x-audio-frames"])
    assert frames >= 10
    n = len(decode_audio(r.content, "pcm").pcm)
    assert n == pytest.approx(frames * FRAME / 2, rel=0.05)


async def test_speed_two_streams_in_mp3_too(client, decode_audio, codec_slack):
    body = {**SHORT, "response_format": "mp3", "max_audio_length_ms": 2000, "speed": 2.0, "stream_format": "sse"}
    events = sse_events((await client.post("/v1/audio/speech", json=body)).content)
    frames = events[-1]["usage"]["output_tokens"]
    audio = decode_audio(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), "mp3")
    assert abs(audio.samples_24k - frames * FRAME / 2) <= 0.05 * frames * FRAME / 2 + codec_slack["mp3"]


async def test_voice_object_form_and_case(client):
    r = await client.post(
        "/v1/audio/speech", json={**SHORT, "voice": {"id": "Nova"}, "response_format": "pcm", "stream": False}
    )
    assert r.status_code == 200, r.text
    assert len(r.content) == int(r.headers["x-audio-frames"]) * FRAME * 2


def wav_b64(seconds: float) -> str:
    rng = np.random.default_rng(0)
    pcm = (0.3 * rng.standard_normal(int(seconds * 24_000))).clip(-1, 1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24_000)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


async def test_custom_voice_clones_from_a_sample(client):
    body = {**SHORT, "voice": "custom", "voice_sample": wav_b64(1.0), "voice_sample_text": "Some words.",
            "response_format": "pcm", "stream": False}  # fmt: skip
    r = await client.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    assert len(r.content) == int(r.headers["x-audio-frames"]) * FRAME * 2 > 0


@pytest.mark.parametrize(
    ("patch", "status", "param"),
    [
        ({"voice_sample": None}, 400, "voice_sample"),
        ({"voice_sample_text": " "}, 400, "voice_sample_text"),
        ({"voice_sample": base64.b64encode(b"not audio at all" * 8).decode()}, 415, "voice_sample"),
        ({"voice_sample": "%%% not base64 %%%"}, 400, "voice_sample"),
    ],
)
async def test_custom_voice_bad_samples(client, patch, status, param):
    body = {**SHORT, "voice": "custom", "voice_sample": wav_b64(0.5), "voice_sample_text": "Hi.", **patch}
    r = await client.post("/v1/audio/speech", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_custom_voice_sample_over_the_reference_limit(settings_factory, engine):
    app = build_app(settings_factory(max_reference_seconds=1.0), engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {**SHORT, "voice": "custom", "voice_sample": wav_b64(2.0), "voice_sample_text": "Hi."}
            r = await c.post("/v1/audio/speech", json=body)
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "voice_sample"
