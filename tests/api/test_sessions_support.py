"""Helpers shared by the session, WebSocket and voice-clone tests (no tests of its own).

Sessions open with a short per-phrase cap (max_audio_length_ms) so the tiny random model, which
rarely emits its end frame, stops after a few frames.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
import av
import httpx
import numpy as np

from csm_voice_api.app import build_app
from csm_voice_api.engine.engine import AsyncEngine

from ..audio.media import make_file, tone
from ..live import uvicorn_thread
from .conftest import make_settings

FRAME = 1920
PHRASE_MS = 400  # 5 frames per phrase at most


def reference(kind: str = "wav", seconds: float = 0.5, rate: int = 16_000, freq: float = 440.0) -> bytes:
    """A short reference clip file of `kind` (see tests/audio/media.py FILE_KINDS)."""
    return make_file(kind, tone(seconds, rate, freq=freq), rate)


def session_fields(**overrides: object) -> dict[str, str]:
    fields = {"context_text": "A short reference.", "max_audio_length_ms": str(PHRASE_MS), "seed": "11"}
    fields.update({k: str(v) for k, v in overrides.items()})
    return fields


@dataclass
class Live:
    url: str
    app: object

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http") :]

    def open_session(self, audio: bytes | None = None, **fields: object) -> str:
        files = {"audio_file": ("ref.wav", audio if audio is not None else reference(), "audio/wav")}
        r = httpx.post(f"{self.url}/v1/streaming-session", files=files, data=session_fields(**fields), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["session_id"]


@contextmanager
def serve(engine: AsyncEngine, tmp_path, **settings: object) -> Iterator[Live]:
    """uvicorn on 127.0.0.1 (a free port) in a thread, with these settings, sharing `engine`."""
    app = build_app(make_settings(tmp_path, **settings), engine)
    with uvicorn_thread(app) as url:
        yield Live(url, app)


@dataclass
class Received:
    audio: bytearray = field(default_factory=bytearray)
    events: list[dict] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def frames(self) -> int:
        return sum(e["frames"] for e in self.of("segment.done"))


async def receive_until(ws, received: Received, kind: str = "done", timeout: float = 120) -> Received:
    """Read frames (binary audio, JSON events) into `received` until an event of `kind` arrives."""
    with anyio.fail_after(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                received.audio += msg
                continue
            event = json.loads(msg)
            received.events.append(event)
            if event["type"] == kind:
                return received


def wav_samples(data: bytes) -> np.ndarray:
    """Decode a (streamed) WAV with PyAV: one container, mono 24 kHz, all its samples."""
    with av.open(io.BytesIO(bytes(data)), format="wav") as c:
        stream = c.streams.audio[0]
        assert (stream.codec_context.sample_rate, stream.codec_context.channels) == (24_000, 1)
        parts = [f.to_ndarray().reshape(-1) for f in c.decode(stream)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)
