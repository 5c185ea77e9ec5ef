"""Voice library routes on the demo engine: /v1/voice-cloning/*, POST/DELETE /v1/audio/voices, stored
and built-in voices wherever a voice is named, and every refusal in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from csm_voice_api.app import build_app

from .test_sessions_support import FRAME, reference

SAY = {"max_audio_length_ms": 400, "seed": 3, "temperature": 0.7}


def wav_frames(body: bytes) -> int:
    """Frames (of 1920 samples) in a whole WAV file; checks it is mono 16-bit 24 kHz."""
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        samples = w.getnframes()
    assert samples % FRAME == 0 and len(body) == 44 + 2 * samples
    return samples // FRAME


@dataclass
class Api:
    app: object
    c: httpx.AsyncClient

    @property
    def store(self):
        return self.app.state.voices.store


@pytest.fixture
async def api(settings, engine) -> AsyncIterator[Api]:
    app = build_app(settings, engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            yield Api(app, c)


async def clone(c: httpx.AsyncClient, name: str, audio: bytes | None = None, **fields: str) -> httpx.Response:
    files = {"audio_file": ("ref.wav", reference() if audio is None else audio, "audio/wav")}
    return await c.post("/v1/voice-cloning/clone", data={"name": name, **fields}, files=files)


def error_of(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    return err


async def test_clone_list_generate_preview_delete_round_trip(api: Api, decode_audio):
    r = await clone(api.c, "Bob", transcript="A short reference.", description="test voice")
    assert r.status_code == 200, r.text
    voice = r.json()
    assert voice["voice_id"] == voice["id"] and voice["id"].startswith("voice_")
    assert (voice["name"], voice["transcript"], voice["description"]) == ("Bob", "A short reference.", "test voice")
    assert voice["duration_seconds"] == 0.5 and not voice["transcript_missing"] and voice["warnings"] == []

    listed = (await api.c.get("/v1/voice-cloning/voices")).json()
    assert [v["id"] for v in listed["voices"]] == [voice["id"]]

    r = await api.c.post("/v1/voice-cloning/generate", json={"voice_id": voice["id"], "text": "Hello there.", **SAY})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    frames = int(r.headers["x-audio-frames"])
    audio = decode_audio(r.content, "wav")
    assert (audio.rate, audio.channels) == (24_000, 1) and len(audio.pcm) == frames * FRAME > 0
    by_name = await api.c.post("/v1/voice-cloning/generate", json={"voice_id": "bob", "text": "Hello there.", **SAY})
    assert by_name.content == r.content  # same voice, same seed

    r = await api.c.post(f"/v1/voice-cloning/voices/{voice['id']}/preview", json=SAY)
    assert r.status_code == 200 and wav_frames(r.content) == int(r.headers["x-audio-frames"]) >= 1

    r = await api.c.delete(f"/v1/voice-cloning/voices/{voice['id']}")
    assert r.json() == {"object": "voice.deleted", "id": voice["id"], "voice_id": voice["id"], "deleted": True}
    assert (await api.c.get("/v1/voice-cloning/voices")).json()["voices"] == []
    assert api.store.list() == [] and not any(api.store.files_dir.iterdir())
    r = await api.c.post("/v1/voice-cloning/generate", json={"voice_id": voice["id"], "text": "Hi.", **SAY})
    error_of(r, 404, "voice_id")
    error_of(await api.c.delete(f"/v1/voice-cloning/voices/{voice['id']}"), 404, "voice_id")
    error_of(await api.c.post(f"/v1/voice-cloning/voices/{voice['id']}/preview", json=SAY), 404, "voice_id")


async def test_preview_without_a_body_uses_the_default_text(api: Api, settings_factory):
    voice = (await clone(api.c, "Quiet", transcript="Words.")).json()
    api.app.state.limits = settings_factory(max_output_ms=240).limits()  # keep the default preview short
    r = await api.c.post(f"/v1/voice-cloning/voices/{voice['id']}/preview")
    assert r.status_code == 200, r.text
    assert 1 <= wav_frames(r.content) <= 3


async def test_a_clip_without_transcript_works_and_says_so(api: Api):
    voice = (await clone(api.c, "Mute")).json()
    assert voice["transcript_missing"] and voice["transcript"] == ""
    assert any("transcript" in w for w in voice["warnings"])
    r = await api.c.post("/v1/voice-cloning/generate", json={"voice_id": "Mute", "text": "Still speaks.", **SAY})
    assert r.status_code == 200 and wav_frames(r.content) >= 1


async def test_a_long_clip_is_trimmed_to_the_prompt_budget(api: Api, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_prompt_frames", lambda: 4)
    voice = (await clone(api.c, "Long", reference(seconds=1.0), transcript="Words.")).json()
    assert voice["duration_seconds"] == pytest.approx(4 * FRAME / 24_000)
    assert any("trimmed" in w for w in voice["warnings"])
    (stored,) = api.store.list()
    assert api.store.load_codes(stored).shape[1] == 4


@pytest.mark.parametrize(
    ("name", "audio", "status", "param", "code"),
    [
        ("taken", None, 400, "name", "invalid_value"),  # a duplicate, case-insensitively
        ("alloy", None, 400, "name", "invalid_value"),  # a built-in voice's name
        ("Custom", None, 400, "name", "invalid_value"),
        ("   ", None, 400, "name", "invalid_value"),
        ("x" * 65, None, 400, "name", "invalid_value"),
        ("ok", b"RIFF-but-not-really-a-wave-file", 415, "audio_file", "unsupported_media"),
        ("ok", b"plain text, no audio at all", 415, "audio_file", "unsupported_media"),
        ("ok", b"", 400, "audio_file", "invalid_value"),
    ],
)
async def test_bad_clones(api: Api, name, audio, status, param, code):
    assert (await clone(api.c, "Taken")).status_code == 200
    err = error_of(await clone(api.c, name, audio), status, param)
    assert err["code"] == code
    assert [v.name for v in api.store.list()] == ["Taken"]


async def test_clone_refuses_clips_over_the_reference_and_upload_limits(settings_factory, engine):
    app = build_app(settings_factory(max_reference_seconds=1.0, max_upload_bytes=40_000), engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            error_of(await clone(c, "long", reference(seconds=1.2)), 413, "audio_file")  # 38 KB, 1.2 s
            error_of(await clone(c, "big", reference(seconds=1.5)), 413, "audio_file")  # 48 KB
            files = {"audio_sample": ("ref.wav", reference(seconds=1.2), "audio/wav")}
            error_of(await c.post("/v1/audio/voices", data={"name": "n"}, files=files), 413, "audio_sample")
            assert app.state.voices.store.list() == []


async def test_missing_fields_are_422(api: Api):
    r = await api.c.post("/v1/voice-cloning/clone", data={"name": "x"})
    assert error_of(r, 422, "audio_file")
    r = await api.c.post("/v1/voice-cloning/generate", json={"text": "Hi."})
    assert error_of(r, 422, "voice_id")


async def test_openai_custom_voice_create_use_delete(api: Api):
    files = {"audio_sample": ("ref.wav", reference(), "audio/wav")}
    r = await api.c.post("/v1/audio/voices", data={"name": "Narrator", "consent": "cons_1"}, files=files)
    assert r.status_code == 200, r.text
    voice = r.json()
    assert {"object", "id", "name", "created_at"} <= set(voice) and voice["object"] == "audio.voice"
    assert voice["name"] == "Narrator" and voice["type"] == "audio_sample" and voice["transcript_missing"]
    bodies = [{"voice": "Narrator"}, {"voice": "narrator"}, {"voice": voice["id"]}, {"voice": {"id": voice["id"]}}]
    outs = []
    for b in bodies:
        r = await api.c.post("/v1/audio/speech", json={"input": "Hello.", "response_format": "pcm", "stream": False,
                                                       **SAY, **b})  # fmt: skip
        assert r.status_code == 200, r.text
        outs.append(r.content)
    assert len(set(outs)) == 1 and len(outs[0]) == int(r.headers["x-audio-frames"]) * FRAME * 2 > 0
    r = await api.c.post("/v1/audio/voices", data={"name": "P", "type": "prompt"}, files=files)
    error_of(r, 400, "type")
    r = await api.c.delete(f"/v1/audio/voices/{voice['id']}")
    assert r.json() == {"object": "audio.voice.deleted", "id": voice["id"], "deleted": True}
    r = await api.c.post("/v1/audio/speech", json={"input": "Hello.", "voice": {"id": voice["id"]}})
    error_of(r, 404, "voice")


async def test_voice_list_has_builtins_then_stored_voices(api: Api):
    stored = (await clone(api.c, "Zed", transcript="Hi.")).json()
    # Using a built-in voice stores its reference, which is not listed a second time.
    r = await api.c.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "stream": False, **SAY})
    assert r.status_code == 200
    body = (await api.c.get("/v1/audio/voices")).json()
    assert body["object"] == "list" and body["data"] == body["voices"]
    ids = [v["id"] for v in body["voices"]]
    assert ids[:6] == ["alloy", "echo", "fable", "onyx", "nova", "shimmer"] and ids.count("alloy") == 1
    assert ids[-1] == stored["id"] and body["voices"][-1]["name"] == "Zed" and len(ids) == 14
    assert [v["id"] for v in (await api.c.get("/v1/voice-cloning/voices")).json()["voices"]] == [stored["id"]]


async def test_builtin_voice_is_one_stored_reference_and_repeats_with_a_seed(api: Api):
    speech = {"input": "The same words.", "voice": "nova", "response_format": "pcm", "stream": False, **SAY}
    first, second = await asyncio.gather(*[api.c.post("/v1/audio/speech", json=speech) for _ in range(2)])
    third = await api.c.post("/v1/audio/speech", json={**speech, "voice": "NOVA"})
    assert first.status_code == second.status_code == third.status_code == 200
    assert first.content == second.content == third.content and len(first.content) > 0
    (ref,) = api.store.list()
    assert ref.name == "nova" and ref.builtin and ref.has_codes
    # Not deletable, by name or by id, and it stays one row.
    error_of(await api.c.delete("/v1/voice-cloning/voices/nova"), 400, "voice_id")
    error_of(await api.c.delete(f"/v1/voice-cloning/voices/{ref.id}"), 400, "voice")
    assert api.store.list() == [ref]


async def test_other_openai_names_stay_bare_speakers(api: Api):
    r = await api.c.post("/v1/audio/speech", json={"input": "Hi.", "voice": "ash", "stream": False, **SAY})
    assert r.status_code == 200 and api.store.list() == []


async def test_unknown_voices_are_404_everywhere(api: Api):
    error_of(await api.c.post("/v1/audio/speech", json={"input": "Hi.", "voice": "nobody"}), 404, "voice")
    error_of(await api.c.post("/v1/audio/speech", json={"input": "Hi.", "voice": {"id": "voice_0000000000000000"}}),
             404, "voice")  # fmt: skip
    error_of(await api.c.post("/v1/voice-cloning/generate", json={"voice_id": "nobody", "text": "Hi."}), 404, "voice_id")
    error_of(await api.c.get("/v1/voice-cloning/voices/nobody"), 404, "voice_id")
    error_of(await api.c.delete("/v1/audio/voices/nobody"), 404, "voice_id")
    r = await api.c.post("/v1/streaming-session", data={"voice_id": "nobody"})
    error_of(r, 404, "voice_id")


@pytest.mark.parametrize(
    ("patch", "status", "param"),
    [
        ({"text": "  "}, 400, "text"),
        ({"text": "a" * 4097}, 413, "text"),
        ({"max_audio_length_ms": 10**7}, 413, "max_audio_length_ms"),
        ({"response_format": "ogg"}, 422, "response_format"),
        ({"temperature": -1}, 422, "temperature"),
    ],
)
async def test_bad_generate_requests(api: Api, patch, status, param):
    await clone(api.c, "Gen", transcript="Hi.")
    r = await api.c.post("/v1/voice-cloning/generate", json={"voice_id": "Gen", "text": "Hi.", **SAY, **patch})
    error_of(r, status, param)


async def test_generate_in_another_format(api: Api, decode_audio, codec_slack):
    await clone(api.c, "Mp3", transcript="Hi.")
    r = await api.c.post("/v1/voice-cloning/generate",
                         json={"voice_id": "Mp3", "text": "Hi.", "response_format": "mp3", **SAY})  # fmt: skip
    assert r.headers["content-type"] == "audio/mpeg"
    audio = decode_audio(r.content, "mp3")
    assert abs(audio.samples_24k - int(r.headers["x-audio-frames"]) * FRAME) <= codec_slack["mp3"]


async def test_a_session_speaks_with_a_stored_voice(api: Api):
    await clone(api.c, "Host", transcript="A short reference.")
    r = await api.c.post("/v1/streaming-session", data={"voice_id": "host", "max_audio_length_ms": "400", "seed": "2"})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    r = await api.c.post("/v1/stream-text", json={"session_id": sid, "text_chunk": "From the library.", "is_final": True})
    assert r.status_code == 200 and r.content[:4] == b"RIFF"
    assert (len(r.content) - 44) // 2 // FRAME >= 1  # a streamed WAV: its header leaves the size open
