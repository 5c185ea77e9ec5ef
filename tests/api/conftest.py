"""Fixtures for the API tests: one demo engine for the whole session, a fresh app per test.

The demo model is tiny and random (its audio is noise) but every path is real: the engine
thread, streaming codec, encoders and HTTP. The engine does not bind to an event loop, so one
engine serves every test's loop and the live uvicorn server's loop alike.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from csm_voice_api.app import build_app
from csm_voice_api.config import Settings
from csm_voice_api.engine.engine import AsyncEngine

from ..live import demo_engine, uvicorn_thread


@pytest.fixture(scope="session")
def engine() -> Iterator[AsyncEngine]:
    with demo_engine(4) as eng:
        yield eng


def make_settings(data_dir: Path, **overrides) -> Settings:
    # _env_file=None: a developer's .env must not change what the tests check. No start-up
    # warm-up unless a test asks (test_warmup.py): it would run beside the test's own requests.
    overrides = {"warmup": False, **overrides}
    return Settings(_env_file=None, model="demo", device="cpu", data_dir=data_dir, **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(settings, engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            yield c


@dataclass
class Decoded:
    pcm: np.ndarray  # float32 mono
    rate: int
    channels: int

    @property
    def samples_24k(self) -> float:
        return len(self.pcm) * 24_000 / self.rate


def decode(data: bytes, fmt: str) -> Decoded:
    """Decode a whole response body with PyAV (raw `pcm` is s16le mono at 24 kHz, no container)."""
    if fmt == "pcm":
        return Decoded(np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24_000, 1)
    with av.open(io.BytesIO(data), format={"opus": "ogg", "aac": "aac"}.get(fmt, fmt)) as c:
        stream = c.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        parts = [f.to_ndarray().reshape(channels, -1)[0].astype(np.float32) for f in c.decode(stream)]
    return Decoded(np.concatenate(parts) if parts else np.zeros(0, np.float32), rate, channels)


# Samples a codec may add or drop at the ends (encoder delay, last-frame padding): mp3 and aac
# work in 1152/1024-sample frames plus their priming; opus trims exactly via pre-skip and granule.
CODEC_SLACK = {"pcm": 0, "wav": 0, "flac": 0, "mp3": 2 * 1152 + 529, "aac": 2 * 1024 + 1024, "opus": 960}


@dataclass
class LiveServer:
    url: str
    app: object


@pytest.fixture(scope="module")
def live_server(engine: AsyncEngine, tmp_path_factory) -> Iterator[LiveServer]:
    """uvicorn on 127.0.0.1 on a free port, in a thread, sharing the session engine."""
    app = build_app(make_settings(tmp_path_factory.mktemp("live")), engine)
    with uvicorn_thread(app) as url:
        yield LiveServer(url, app)


@pytest.fixture
def decode_audio():
    return decode


@pytest.fixture
def codec_slack() -> dict[str, int]:
    return CODEC_SLACK


@pytest.fixture
def settings_factory(tmp_path: Path):
    return lambda **overrides: make_settings(tmp_path, **overrides)
