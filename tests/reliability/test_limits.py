"""Every input limit is explicit and enforced on a live server: 413/400/422, no temp files left."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import wave
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import engine_idle, eventually


def wav_bytes(seconds: float, rate: int = 24_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch) -> Path:
    """Where Starlette's SpooledTemporaryFile rolls uploads over 1 MB (this process only)."""
    d = tmp_path / "spool"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def open_files_in(d: Path) -> list[str]:
    # Anonymous (O_TMPFILE) temp files have no directory entry; an open one still shows as a link.
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [x for x in links if x.startswith(str(d))]


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_body_over_the_limit_is_413_with_or_without_length(live_factory):
    live = live_factory(max_body_bytes=64 * 1024)
    body = b"{" + b" " * (200 * 1024) + b"}"
    r = httpx.post(live.url + "/v1/audio/speech", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and error_code(r) == "body_too_large"

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(50):
            yield b" " * 8192

    r = httpx.post(live.url + "/v1/audio/speech", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_multipart_parts_fields_and_files_are_capped_without_leaking_temp_files(live_factory, spool_dir):
    live = live_factory()
    big = b"\0" * (1536 * 1024)  # over the 1 MB spool: these land in temp files
    url = live.url + "/v1/voice-clone"
    files = [("audio_file", (f"a{i}.wav", big, "audio/wav")) for i in range(3)]
    r = httpx.post(url, data={"text": "Hi."}, files=files, timeout=60)
    assert r.status_code == 400 and "files" in r.json()["error"]["message"].lower()
    many = {f"f{i}": "x" for i in range(40)}
    r = httpx.post(url, data=many, files=[("audio_file", ("a.wav", big, "audio/wav"))], timeout=60)
    assert r.status_code == 400 and "fields" in r.json()["error"]["message"].lower()
    r = httpx.post(url, data={"text": "x" * (100 * 1024)}, files=[("audio_file", ("a.wav", big, "audio/wav"))],
                   timeout=60)
    assert r.status_code == 400
    assert open_files_in(spool_dir) == []


def test_upload_and_decoded_reference_limits(live_factory, spool_dir, engine):
    live = live_factory(max_upload_bytes=1024 * 1024, max_reference_seconds=1.0)
    url = live.url + "/v1/voice-clone"
    r = httpx.post(url, data={"text": "Hi."}, files={"audio_file": ("a.wav", wav_bytes(30), "audio/wav")},
                   timeout=60)  # 1.4 MB
    assert r.status_code == 413 and r.json()["error"]["param"] == "audio_file"
    # Under the byte cap but over the duration cap once decoded: refused, not cut.
    r = httpx.post(url, data={"text": "Hi."}, files={"audio_file": ("a.wav", wav_bytes(3), "audio/wav")},
                   timeout=60)
    assert r.status_code == 413
    r = httpx.post(url, data={"text": "Hi."}, files={"audio_file": ("a.wav", b"not audio" * 100, "audio/wav")},
                   timeout=60)
    assert r.status_code == 415
    assert open_files_in(spool_dir) == []
    assert engine_idle(engine)


def test_json_limits(live_factory):
    live = live_factory(max_upload_bytes=4096, max_text_chars=50, max_output_ms=2000)
    url = live.url + "/v1/audio/speech"
    sample = base64.b64encode(b"\0" * 8192).decode()
    r = httpx.post(url, json={"input": "Hi.", "voice": "custom", "voice_sample": sample, "voice_sample_text": "x"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "voice_sample"
    r = httpx.post(url, json={"input": "x" * 51, "voice": "alloy"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input"
    r = httpx.post(url, json={"input": "Hi.", "voice": "alloy", "max_audio_length_ms": 2080})
    assert r.status_code == 413 and r.json()["error"]["param"] == "max_audio_length_ms"
    r = httpx.post(url, json={"input": "Hi.", "voice": "alloy", "speed": 100})
    assert r.status_code == 422


@pytest.mark.parametrize("where", ["app", "protocol"])
async def test_websocket_messages_over_the_limit_close_1009(live_factory, engine, where):
    if where == "app":  # our check, whatever the server in front
        live = live_factory(ws_max_message_bytes=2048)
    else:  # uvicorn's own frame limit (the CLI sets it from the same setting)
        live = live_factory(ws_max_size=2048)
    sid = live.open_session()
    async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}") as ws:
        await ws.send(json.dumps({"text_chunk": "x" * 4000}))
        with pytest.raises(ConnectionClosed) as e:
            with anyio.fail_after(30):
                while True:
                    await ws.recv()
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009
    session = live.app.state.sessions.get(sid)
    await eventually(lambda: session.attached == 0, what="socket released its session")
    assert session.segments == 0 and engine_idle(engine)


def test_wav_with_an_unknown_codec_tag_is_415_not_500(live_factory):
    # Found by the decoder fuzz test: FFmpeg opens such a stream without a codec context.
    live = live_factory()
    data = bytearray(wav_bytes(0.5))
    data[20:22] = (0x1234).to_bytes(2, "little")  # WAVE format tag: no such codec
    r = httpx.post(live.url + "/v1/voice-clone", data={"text": "Hi."},
                   files={"audio_file": ("a.wav", bytes(data), "audio/wav")}, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media"
