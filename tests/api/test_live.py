"""Against a real uvicorn on 127.0.0.1: the official openai client, chunked streaming, disconnects."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest

FRAME = 1920


@pytest.fixture(scope="module")
def oai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "opus"])
def test_openai_client_streams_speech(oai, decode_audio, codec_slack, fmt):
    with oai.audio.speech.with_streaming_response.create(
        model="csm-1b",
        voice="alloy",
        input="Hello there.",
        response_format=fmt,
        extra_body={"max_audio_length_ms": 800, "seed": 3, "temperature": 0.8, "topk": 40},
    ) as response:
        assert response.headers["content-type"] == {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg"}[fmt]
        data = b"".join(response.iter_bytes())
    audio = decode_audio(data, fmt)
    assert audio.channels == 1
    # Streamed: the frame count is not in a header, but the same seed gives the same audio.
    whole = httpx.post(
        str(oai.base_url) + "audio/speech",
        json={"input": "Hello there.", "voice": "alloy", "response_format": "pcm", "stream": False,
              "max_audio_length_ms": 800, "seed": 3, "temperature": 0.8, "topk": 40},  # fmt: skip
        timeout=120,
    )
    frames = int(whole.headers["x-audio-frames"])
    assert frames >= 1
    assert abs(audio.samples_24k - frames * FRAME) <= codec_slack[fmt]


def test_openai_client_sse(oai):
    with oai.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input="Hi.", response_format="pcm", stream_format="sse",
        extra_body={"max_audio_length_ms": 480},
    ) as response:  # fmt: skip
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == events[-1]["usage"]["output_tokens"] * FRAME * 2


def test_openai_client_errors_are_typed(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.audio.speech.create(model="csm-1b", voice="alloy", input="")
    assert e.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oai.audio.speech.create(model="csm-1b", voice="nobody", input="Hi.")


def test_audio_arrives_in_pieces(live_server):
    body = {"input": "Hello there.", "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 1600}
    with httpx.stream("POST", live_server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        assert r.headers.get("transfer-encoding") == "chunked"
        chunks = [c for c in r.iter_raw() if c]
    assert len(chunks) >= 2  # 2 frames per engine chunk: 1.6 s of audio cannot come as one piece
    assert sum(map(len, chunks)) % (2 * FRAME) == 0


def test_client_disconnect_aborts_generation(live_server, engine):
    app = live_server.app
    body = {"input": "Hello there.", "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 60_000}
    frames_before = engine.stats()["frames_total"]
    with httpx.stream("POST", live_server.url + "/v1/audio/speech", json=body, timeout=120) as r:
        first = next(r.iter_raw())
        assert first
    # The client is gone: the engine row must be freed long before 60 s of audio (750 frames).
    deadline = time.monotonic() + 60
    while engine.stats()["active"] or engine.stats()["free_slots"] != engine.stats()["slots"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)
    assert engine.stats()["frames_total"] - frames_before < 300
    assert app.state.engine is engine
