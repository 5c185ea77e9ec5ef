"""POST /v1/voice-clone (multipart) and the GET /v1/audio/{name} round trip."""

from __future__ import annotations

import pytest

from .test_sessions_support import FRAME, reference

FIELDS = {"text": "Hello from a cloned voice.", "context_text": "A reference.", "max_audio_length_ms": "480",
          "seed": "3"}


async def clone(client, audio: bytes, name: str = "ref.wav", **fields):
    files = {"audio_file": (name, audio, "application/octet-stream")}
    return await client.post("/v1/voice-clone", files=files, data={**FIELDS, **fields})


@pytest.mark.parametrize(("upload", "fmt"), [("wav", "wav"), ("mp3", "wav"), ("wav", "mp3"), ("mp3", "mp3")])
async def test_clone_stores_a_file_that_downloads_and_decodes(client, decode_audio, codec_slack, upload, fmt):
    r = await clone(client, reference(upload), name=f"ref.{upload}", output_format=fmt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["audio_url"].startswith("/v1/audio/") and body["audio_url"].endswith(f".{fmt}")
    assert 1 <= body["frames"] <= 6 and body["duration_seconds"] == pytest.approx(body["frames"] * 0.08)
    got = await client.get(body["audio_url"])
    assert got.status_code == 200
    assert got.headers["content-type"] == {"wav": "audio/wav", "mp3": "audio/mpeg"}[fmt]
    audio = decode_audio(got.content, fmt)
    assert audio.rate == 24_000 and audio.channels == 1
    assert abs(audio.samples_24k - body["frames"] * FRAME) <= codec_slack[fmt]


async def test_streamed_clone_equals_the_stored_file(client):
    stored = (await clone(client, reference())).json()
    whole = (await client.get(stored["audio_url"])).content
    r = await clone(client, reference(), stream="true")
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    # Same seed, same voice: the same samples (a streamed WAV's header leaves the sizes unknown).
    assert r.content[44:] == whole[44:] and len(r.content) == 44 + stored["frames"] * FRAME * 2


async def test_different_reference_clips_give_different_voices(client):
    a = (await clone(client, reference(freq=200.0))).json()
    b = (await clone(client, reference(freq=2000.0))).json()
    wa = (await client.get(a["audio_url"])).content
    wb = (await client.get(b["audio_url"])).content
    assert wa[44:] != wb[44:]


@pytest.mark.parametrize(
    ("fields", "audio", "status", "param"),
    [
        ({"text": "   "}, reference(), 400, "text"),
        ({"output_format": "opus"}, reference(), 422, "output_format"),
        ({"max_audio_length_ms": "10"}, reference(), 422, "max_audio_length_ms"),
        ({"max_audio_length_ms": "999999"}, reference(), 413, "max_audio_length_ms"),
        ({}, b"RIFF-but-not-really-a-wave-file", 415, "file"),
        ({}, b"", 400, "audio_file"),
    ],
)
async def test_bad_clone_requests(client, fields, audio, status, param):
    r = await clone(client, audio, **fields)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_missing_audio_file_is_422(client):
    r = await client.post("/v1/voice-clone", data=FIELDS)
    assert r.status_code == 422 and r.json()["error"]["param"] == "audio_file"


async def test_unknown_audio_file_is_404(client):
    r = await client.get("/v1/audio/" + "0" * 32 + ".wav")
    assert r.status_code == 404
