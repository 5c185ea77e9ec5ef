"""Issue 6's surfaces through a live uvicorn server on 127.0.0.1 (the ASGI tests cover the details)."""

from __future__ import annotations

import base64
import sys

import httpx

from csm_voice_api.engine.types import FRAME_SAMPLES

from .test_scenes import DATA_URI, SCENE
from .test_youtube import URL, fake_yt_dlp


def test_scene_over_http_is_the_sum_of_its_turns(live_server, decode_audio):
    body = {"scene": SCENE, "context": [{"prompt": "A clip.", "audio_url": DATA_URI, "speaker_id": 0}],
            "max_audio_length_ms": 1600, "seed": 3}
    r = httpx.post(live_server.url + "/v1/scene", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    frames = sum(t["frames"] for t in out["turns"])
    audio = httpx.get(out["audio"]["url"], timeout=60)  # an absolute URL on this server
    assert audio.status_code == 200 and len(audio.content) == out["audio"]["file_size"]
    assert len(decode_audio(audio.content, "wav").pcm) == frames * FRAME_SAMPLES


def test_generate_audio_and_generate_over_http(live_server, decode_audio):
    r = httpx.post(live_server.url + "/generate_audio", json={"text": "Hi there.", "max_audio_length_ms": 400},
                   timeout=120)
    assert r.status_code == 200 and r.json()["format"] == "wav"
    assert len(decode_audio(base64.b64decode(r.json()["audio_data"]), "wav").pcm) % FRAME_SAMPLES == 0
    with httpx.stream("POST", live_server.url + "/generate", timeout=120,
                      json={"text": "Hi.", "speaker": 1, "streaming": True, "max_audio_length_ms": 400}) as s:
        assert s.status_code == 200
        data = b"".join(s.iter_bytes())
    assert data[:4] == b"RIFF" and len(decode_audio(data, "wav").pcm) % FRAME_SAMPLES == 0


def test_youtube_clone_over_http(live_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", fake_yt_dlp(4.0, []))  # the server thread imports it lazily
    body = {"youtube_url": URL, "voice_name": "yt-live", "start_time": 1.0, "duration": 1.5}
    r = httpx.post(live_server.url + "/v1/audio/speech/voice-cloning/youtube", json=body, timeout=120)
    assert r.status_code == 200, r.text
    listed = httpx.get(live_server.url + "/v1/voice-cloning/voices", timeout=30).json()
    assert any(v["name"] == "yt-live" for v in listed["voices"])
