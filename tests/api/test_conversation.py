"""POST /api/v1/audio/conversation: context turns (audio as base64) become the prompt of the next turn."""

from __future__ import annotations

import base64

import httpx
import pytest

from csm_voice_api.app import build_app

from .test_sessions_support import FRAME, reference

URL = "/api/v1/audio/conversation"
SAY = {"max_audio_length_ms": 400, "seed": 5, "temperature": 0.7}


def b64(audio: bytes) -> str:
    return base64.b64encode(audio).decode()


def turn(speaker: int, text: str, seconds: float | None = 0.5, freq: float = 440.0) -> dict:
    t: dict = {"speaker": speaker, "text": text}
    if seconds is not None:
        t["audio"] = b64(reference(seconds=seconds, freq=freq))
    return t


def error_of(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_next_turn_from_audio_and_text_context(client, decode_audio):
    body = {"text": "And how are you?", "speaker_id": 1, **SAY,
            "context": [turn(0, "Hello there."), turn(1, "Hi!", None), turn(0, "Nice day.", 0.4)]}  # fmt: skip
    r = await client.post(URL, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav" and r.headers["x-context-turns-dropped"] == "0"
    audio = decode_audio(r.content, "wav")
    assert audio.rate == 24_000 and len(audio.pcm) == int(r.headers["x-audio-frames"]) * FRAME > 0
    again = await client.post(URL, json=body)
    assert again.content == r.content  # same context, same seed
    other = await client.post(URL, json={**body, "context": [turn(0, "Hello there.", freq=3000.0)]})
    assert other.status_code == 200 and other.content != r.content  # the context shapes the turn


async def test_no_context_and_other_formats(client, decode_audio, codec_slack):
    r = await client.post(URL, json={"text": "Just me.", "speaker_id": 999, "response_format": "flac", **SAY})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac"
    audio = decode_audio(r.content, "flac")
    assert abs(audio.samples_24k - int(r.headers["x-audio-frames"]) * FRAME) <= codec_slack["flac"]


async def test_context_past_the_prompt_budget_drops_the_oldest_turns(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_prompt_frames", lambda: 8)  # 0.64 s of context audio
    three = [turn(0, "One."), turn(1, "Two.", None), turn(0, "Three.")]  # 0.5 s clips
    r = await client.post(URL, json={"text": "Four.", **SAY, "context": three})
    assert r.status_code == 200 and r.headers["x-context-turns-dropped"] == "1"  # "One." no longer fits
    r = await client.post(URL, json={"text": "Two.", **SAY, "context": [turn(0, "Long one.", 1.0)]})
    assert r.status_code == 200 and r.headers["x-context-turns-dropped"] == "0"  # cut, not dropped


@pytest.mark.parametrize(
    ("patch", "status", "param"),
    [
        ({"text": " "}, 400, "text"),
        ({"speaker_id": 42}, 400, "speaker_id"),
        ({"context": [{"speaker": 12, "text": "x"}]}, 400, "context[0].speaker"),
        ({"context": [turn(0, "ok"), {"speaker": 0, "audio": "%%% not base64"}]}, 400, "context[1].audio"),
        ({"context": [{"speaker": 0, "audio": b64(b"not audio at all" * 8)}]}, 415, "context[0].audio"),
        ({"context": [turn(0, "x", None)] * 33}, 422, "context"),
        ({"max_audio_length_ms": 10**7}, 413, "max_audio_length_ms"),
    ],
)
async def test_bad_conversation_requests(client, patch, status, param):
    error_of(await client.post(URL, json={"text": "Hi.", **SAY, **patch}), status, param)


async def test_context_clips_over_the_reference_limit_are_413(settings_factory, engine):
    app = build_app(settings_factory(max_reference_seconds=1.0), engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post(URL, json={"text": "Hi.", **SAY, "context": [turn(0, "ok"), turn(1, "long", 1.5)]})
    error_of(r, 413, "context[1].audio")
