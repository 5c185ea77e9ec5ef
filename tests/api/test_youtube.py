"""YouTube cloning: 501 without yt-dlp; with a stand-in yt-dlp (no network), the cut is stored as a voice."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import httpx
import numpy as np
import pytest

from csm_voice_api.api.youtube import normalise
from csm_voice_api.audio.encode import wav_bytes

URL = "https://www.youtube.com/watch?v=abcdefghijk"


def fake_yt_dlp(seconds: float, calls: list) -> types.ModuleType:
    """A yt_dlp whose download writes a local WAV where the real one would write the audio."""

    class YoutubeDL:
        def __init__(self, options: dict):
            self.options = options

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def download(self, urls: list[str]) -> None:
            calls.append((urls, self.options))
            t = np.arange(int(seconds * 24_000)) / 24_000
            Path(self.options["outtmpl"] % {"ext": "wav"}).write_bytes(wav_bytes(0.2 * np.sin(2 * np.pi * 220 * t)))

    return types.SimpleNamespace(YoutubeDL=YoutubeDL)  # type: ignore[return-value]


async def test_without_yt_dlp_the_route_says_how_to_install(client: httpx.AsyncClient, monkeypatch):
    monkeypatch.setitem(sys.modules, "yt_dlp", None)  # import fails as if not installed
    r = await client.post("/v1/audio/speech/voice-cloning/youtube", json={"youtube_url": URL, "voice_name": "yt"})
    assert r.status_code == 501
    err = r.json()["error"]
    assert "pip install yt-dlp" in err["message"] and err["code"] == "youtube_unavailable"


async def test_cut_is_stored_as_a_voice(client: httpx.AsyncClient, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "yt_dlp", fake_yt_dlp(4.0, calls))
    body = {"youtube_url": URL, "voice_name": "from-yt", "start_time": 1.0, "duration": 1.5, "description": "d"}
    r = await client.post("/v1/audio/speech/voice-cloning/youtube", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert calls[0][0] == [URL] and calls[0][1]["noplaylist"] is True
    assert out["duration_seconds"] == 1.5 and out["name"] == "from-yt" and out["description"] == "d"
    assert out["transcript_source"] == "none" and out["transcript_missing"] is True  # no faster-whisper here
    stored = await client.get(f"/v1/voice-cloning/voices/{out['id']}")
    assert stored.status_code == 200 and stored.json()["duration_seconds"] == 1.5
    with_text = await client.post("/v1/audio/speech/voice-cloning/youtube",
                                  json={**body, "voice_name": "yt2", "transcript": "Hello there."})  # fmt: skip
    assert with_text.json()["transcript"] == "Hello there." and with_text.json()["transcript_source"] == "request"


@pytest.mark.parametrize(
    ("extra", "status"),
    [({"youtube_url": "https://example.com/watch?v=x"}, 400), ({"youtube_url": "http://youtu.be/x"}, 400),
     ({"duration": 600}, 413), ({"start_time": 10.0}, 400)],  # the stand-in video is 4 s long
)
async def test_bad_requests(client: httpx.AsyncClient, monkeypatch, extra: dict, status: int):
    monkeypatch.setitem(sys.modules, "yt_dlp", fake_yt_dlp(4.0, []))
    body = {"youtube_url": URL, "voice_name": "v", **extra}
    r = await client.post("/v1/audio/speech/voice-cloning/youtube", json=body)
    assert r.status_code == status, r.text


def test_normalise_peaks_at_a_fixed_level_and_keeps_silence():
    assert np.max(np.abs(normalise(np.array([0.1, -0.05], np.float32)))) == pytest.approx(0.9)
    assert not normalise(np.zeros(10, np.float32)).any()
