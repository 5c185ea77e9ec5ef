"""Clients as they really call us: the official openai client against uvicorn on 127.0.0.1 (custom
voices), and Open WebUI's sequence of calls with API keys configured."""

from __future__ import annotations

import httpx
import openai
import pytest

from csm_voice_api.app import build_app

from .test_sessions_support import FRAME, reference

SAY = {"max_audio_length_ms": 400, "seed": 4, "stream": False}


@pytest.fixture(scope="module")
def oai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_custom_voice_by_name_id_and_object(oai, live_server, decode_audio):
    voice = oai.audio.voices.create(name="Live Voice", audio_sample=("ref.wav", reference(), "audio/wav"),
                                    consent="cons_test")  # fmt: skip
    assert voice.object == "audio.voice" and voice.id.startswith("voice_") and voice.name == "Live Voice"
    outs = []
    for v in ("Live Voice", voice.id, {"id": voice.id}):
        r = oai.audio.speech.with_raw_response.create(model="tts-1", voice=v, input="From the voice library.",
                                                      response_format="wav", extra_body=SAY)  # fmt: skip
        outs.append(r.content)
        frames = int(r.headers["x-audio-frames"])
    assert outs[0] == outs[1] == outs[2]
    audio = decode_audio(outs[0], "wav")
    assert (audio.rate, audio.channels) == (24_000, 1) and len(audio.pcm) == frames * FRAME > 0

    listed = httpx.get(live_server.url + "/v1/audio/voices", timeout=30).json()["voices"]
    assert {"id": voice.id, "name": "Live Voice", "object": "voice"} in listed

    assert oai.audio.voices.delete(voice.id).deleted
    with pytest.raises(openai.NotFoundError) as e:
        oai.audio.speech.create(model="tts-1", voice={"id": voice.id}, input="Gone.", extra_body=SAY)
    assert e.value.body["param"] == "voice"  # type: ignore[index]


def test_openai_client_duplicate_voice_name_is_a_bad_request(oai):
    sample = ("ref.wav", reference(), "audio/wav")
    first = oai.audio.voices.create(name="Twice", audio_sample=sample, consent="cons_test")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            oai.audio.voices.create(name="twice", audio_sample=sample, consent="cons_test")
        assert e.value.body["param"] == "name"  # type: ignore[index]
    finally:
        oai.audio.voices.delete(first.id)


async def test_open_webui_calls_with_api_keys_configured(settings_factory, engine, decode_audio):
    app = build_app(settings_factory(api_keys="sk-owui"), engine)
    auth = {"Authorization": "Bearer sk-owui"}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/v1") as c:
            files = {"audio_sample": ("ref.wav", reference(), "audio/wav")}
            # Creating voices is not public, only listing them.
            assert (await c.post("/audio/voices", data={"name": "Mine"}, files=files)).status_code == 401
            assert (await c.post("/audio/voices", data={"name": "Mine"}, files=files, headers=auth)).status_code == 200
            # Open WebUI fetches the model and voice lists with no Authorization header...
            models = (await c.get("/audio/models")).json()["models"]
            assert "tts-1" in {m["id"] for m in models}
            assert "tts-1" in {m["id"] for m in (await c.get("/models")).json()["data"]}
            voices = {v["id"]: v["name"] for v in (await c.get("/audio/voices")).json()["voices"]}
            assert voices["alloy"] == "Alloy" and "Mine" in voices.values()
            # ...then speaks with the key it was given, in its default format (mp3).
            speech = {"model": "tts-1", "input": "Hello from Open WebUI.", "voice": "Mine", **SAY}
            assert (await c.post("/audio/speech", json=speech)).status_code == 401
            r = await c.post("/audio/speech", json=speech, headers=auth)
            assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
            assert decode_audio(r.content, "mp3").samples_24k > 0
