"""POST/GET/DELETE /v1/streaming-session and POST /v1/stream-text at the ASGI boundary."""

from __future__ import annotations

import io
import wave

import httpx
import pytest

from csm_voice_api.app import build_app

from .test_sessions_support import FRAME, reference, session_fields


async def open_session(client: httpx.AsyncClient, audio: bytes | None = None, name: str = "ref.wav", **fields):
    files = {"audio_file": (name, audio if audio is not None else reference(), "application/octet-stream")}
    return await client.post("/v1/streaming-session", files=files, data=session_fields(**fields))


def wav_frames(body: bytes) -> int:
    """Frames (of 1920 samples) in a streamed WAV; checks it is mono 16-bit 24 kHz."""
    assert body[:4] == b"RIFF" and body.count(b"RIFF") == 1
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
    samples = (len(body) - 44) // 2
    assert samples % FRAME == 0
    return samples // FRAME


@pytest.mark.parametrize("kind", ["wav", "mp3", "flac", "ogg-opus", "m4a"])
async def test_open_from_an_upload_in_any_common_format(client, kind):
    r = await open_session(client, reference(kind, rate=48_000 if kind == "ogg-opus" else 16_000), name=f"ref.{kind}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"].startswith("sess_") and body["message"]
    state = (await client.get(f"/v1/streaming-session/{body['session_id']}")).json()
    assert state["state"] == "warm" and state["segments"] == 0


async def test_stream_text_speaks_completed_phrases_and_the_rest_when_final(client):
    sid = (await open_session(client)).json()["session_id"]
    r = await client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": "Hello there my good"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert wav_frames(r.content) == 0  # no phrase complete yet: a valid, empty WAV
    r = await client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": " friend. How are"})
    one = wav_frames(r.content)
    assert 1 <= one <= 5
    r = await client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": " you?", "is_final": True})
    two = wav_frames(r.content)
    assert 1 <= two <= 5
    state = (await client.get(f"/v1/streaming-session/{sid}")).json()
    assert state["segments"] == 2 and state["audio_ms"] == (one + two) * 80 and state["pending_text"] == ""
    sessions = client._transport.app.state.sessions  # type: ignore[attr-defined]
    turns = sessions.get(sid).conversation.turns
    assert [t.text for t in turns] == ["Hello there my good friend.", "How are you?"]


async def test_final_with_nothing_buffered_is_an_empty_wav(client):
    sid = (await open_session(client)).json()["session_id"]
    r = await client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": "", "is_final": True})
    assert r.status_code == 200 and wav_frames(r.content) == 0


async def test_unknown_and_closed_sessions_are_404(client):
    r = await client.post("/v1/stream-text", json={"session_id": "sess_nope", "text_chunk": "Hi."})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    sid = (await open_session(client)).json()["session_id"]
    r = await client.delete(f"/v1/streaming-session/{sid}")
    assert r.status_code == 200 and r.json()["session_id"] == sid
    for req in (client.delete(f"/v1/streaming-session/{sid}"), client.get(f"/v1/streaming-session/{sid}"),
                client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": "Hi.", "is_final": True})):
        r = await req
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"


async def test_session_cap_answers_429_in_openai_shape(settings_factory, engine):
    app = build_app(settings_factory(session_max=2), engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            first = (await open_session(c)).json()["session_id"]
            assert (await open_session(c)).status_code == 200
            r = await open_session(c)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
            assert "CSM_SESSION_MAX" in error["message"]
            await c.delete(f"/v1/streaming-session/{first}")
            assert (await open_session(c)).status_code == 200


async def test_voice_id_instead_of_a_clip(client):
    r = await client.post("/v1/streaming-session", data=session_fields(voice_id="alloy"))
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    r = await client.post("/v1/stream-text", json={"session_id": sid, "text_chunk": "A stock voice.", "is_final": True})
    assert wav_frames(r.content) >= 1
    r = await client.post("/v1/streaming-session", data=session_fields(voice_id="no-such-voice"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"


@pytest.mark.parametrize(
    ("fields", "audio", "status", "param"),
    [
        ({}, None, 400, "audio_file"),  # neither a clip nor a voice id
        ({"speaker_id": "5000"}, reference(), 400, "speaker_id"),
        ({"output_format": "aac"}, reference(), 422, "output_format"),
        ({"temperature": "9"}, reference(), 422, "temperature"),
        ({}, b"this is not audio at all", 415, "file"),
    ],
)
async def test_bad_session_requests(client, fields, audio, status, param):
    files = {"audio_file": ("ref.wav", audio, "audio/wav")} if audio is not None else None
    r = await client.post("/v1/streaming-session", files=files, data=session_fields(**fields))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
