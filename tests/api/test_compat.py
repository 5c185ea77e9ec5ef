"""POST /generate_audio and POST /generate on the demo engine (ASGI and a live server)."""

from __future__ import annotations

import base64
import io
import wave

import httpx
import pytest

from csm_voice_api.api.compat import GenerateRequest, sampling_for
from csm_voice_api.app import build_app
from csm_voice_api.engine.types import FRAME_SAMPLES, Sampling

SHORT = {"max_audio_length_ms": 400, "seed": 3}


def wav_samples(data: bytes) -> tuple[int, int]:
    """(declared frames, sample rate) of a complete WAV."""
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return w.getnframes(), w.getframerate()


async def test_generate_audio_returns_base64_wav(client: httpx.AsyncClient):
    r = await client.post("/generate_audio", json={"text": "Hello there.", "speaker": 1, **SHORT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["format"] == "wav" and body["encoding"] == "base64"
    data = base64.b64decode(body["audio_data"])
    frames, rate = wav_samples(data)
    assert rate == 24_000
    assert frames == (len(data) - 44) // 2
    assert 0 < frames <= 5 * FRAME_SAMPLES and frames % FRAME_SAMPLES == 0


async def test_generate_whole_wav_matches_frames_header(client: httpx.AsyncClient):
    r = await client.post("/generate", json={"text": "Hi.", "speaker": 0, "streaming": False, **SHORT})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    frames, _ = wav_samples(r.content)
    assert frames == int(r.headers["X-Audio-Frames"]) * FRAME_SAMPLES


async def test_generate_streaming_is_one_header_then_samples(client: httpx.AsyncClient):
    body = {"text": "Hi.", "speaker": 1, "streaming": True, "temperature": 0.7, "top_p": 0.9,
            "repetition_penalty": 1.0, **SHORT}
    streamed = (await client.post("/generate", json=body)).content
    whole = (await client.post("/generate", json={**body, "streaming": False})).content
    assert streamed[:4] == b"RIFF" and streamed[4:8] == b"\xff\xff\xff\xff"  # length unknown up front
    assert streamed.count(b"RIFF") == 1
    # Same seed, same audio: only the header's sizes differ.
    assert streamed[44:] == whole[44:] and len(whole) > 44


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": "Hi.", "speaker": 2}, 422),  # /generate has speakers 0 and 1
        ({"text": "   ", "speaker": 0}, 400),
        ({"text": "Hi.", "top_p": 0}, 422),
        ({"text": "Hi.", "repetition_penalty": 0.5}, 422),
        ({"text": "Hi.", "max_audio_length_ms": 10_000_000}, 413),
    ],
)
async def test_generate_rejects_bad_input(client: httpx.AsyncClient, body: dict, status: int):
    r = await client.post("/generate", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_sampling_defaults_come_from_server_flags(settings_factory):
    settings = settings_factory(temperature=0.5, top_p=0.8, repetition_penalty=1.3)
    s = sampling_for(GenerateRequest(text="x"), settings, settings.limits())
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.5, 0.8, 1.3)
    own = sampling_for(GenerateRequest(text="x", temperature=0.1, top_p=0.5, repetition_penalty=1.1),
                       settings, settings.limits())  # fmt: skip
    assert (own.temperature, own.top_p, own.repetition_penalty) == (0.1, 0.5, 1.1)


class SamplingSpy:
    """The real engine, recording the Sampling of each generate call."""

    def __init__(self, engine):
        self._engine = engine
        self.samplings: list[Sampling] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, conv, text, *, sampling, **kw):
        self.samplings.append(sampling)
        return self._engine.generate(conv, text, sampling=sampling, **kw)


async def test_request_and_server_sampling_reach_the_engine(settings_factory, engine):
    spy = SamplingSpy(engine)
    app = build_app(settings_factory(top_p=0.7, repetition_penalty=1.2), spy)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            assert (await c.post("/generate", json={"text": "Hi.", **SHORT})).status_code == 200
            body = {"text": "Hi.", "top_p": 0.9, "repetition_penalty": 1.5, "temperature": 0.3, **SHORT}
            assert (await c.post("/generate", json=body)).status_code == 200
            r = await c.post("/generate_audio", json={"text": "Hi.", "temperature": 0.2, **SHORT})
            assert r.status_code == 200
    got = [(s.top_p, s.repetition_penalty, s.temperature) for s in spy.samplings]
    assert got == [(0.7, 1.2, 0.9), (0.9, 1.5, 0.3), (0.7, 1.2, 0.2)]


async def test_generate_streams_on_a_live_server(live_server):
    body = {"text": "Hello.", "speaker": 0, "streaming": True, **SHORT}
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", live_server.url + "/generate", json=body) as r:
            assert r.status_code == 200
            assert r.headers.get("content-length") is None  # chunked
            data = b"".join([b async for b in r.aiter_bytes()])
    assert data[:4] == b"RIFF" and (len(data) - 44) % (2 * FRAME_SAMPLES) == 0 and len(data) > 44


def test_serve_flags_set_sampling_defaults(monkeypatch):
    from csm_voice_api.cli import _parser, _settings

    monkeypatch.chdir("/")  # no .env from the working directory
    args = _parser().parse_args(["serve", "--temperature", "0.5", "--top_p", "0.8", "--repetition_penalty", "1.2"])
    s = _settings(args)
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.5, 0.8, 1.2)
    assert _settings(_parser().parse_args(["serve"])).top_p == 1.0
