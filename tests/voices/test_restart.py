"""The voice library across app restarts over one data_dir: voices persist, speak the same, and are
not encoded or generated again; damaged codes are re-encoded once."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from csm_voice_api.app import build_app
from csm_voice_api.config import Settings
from csm_voice_api.engine.engine import AsyncEngine

from ..live import demo_engine

SPEECH = {"input": "Still here after a restart.", "response_format": "pcm", "stream": False,
          "max_audio_length_ms": 320, "seed": 6}  # fmt: skip


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    with demo_engine(2) as eng:
        yield eng


@pytest.fixture
def counted(engine, monkeypatch) -> dict[str, int]:
    """Counts the engine's encode and generate calls."""
    calls = {"encode": 0, "generate": 0}
    encode, generate = engine.encode, engine.generate

    async def counting_encode(pcm):
        calls["encode"] += 1
        return await encode(pcm)

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "encode", counting_encode)
    monkeypatch.setattr(engine, "generate", counting_generate)
    return calls


def clip(seconds: float = 0.5) -> bytes:
    t = np.arange(int(seconds * 24_000)) / 24_000
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24_000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


async def run_app(data_dir: Path, engine: AsyncEngine, steps) -> object:
    """Build the app over data_dir, run `steps(client, app)`, shut the app down; returns its result."""
    app = build_app(Settings(_env_file=None, model="demo", device="cpu", data_dir=data_dir, warmup=False), engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            return await steps(c, app)


async def speak(c: httpx.AsyncClient, voice) -> bytes:
    r = await c.post("/v1/audio/speech", json={**SPEECH, "voice": voice})
    assert r.status_code == 200, r.text
    assert len(r.content) > 0
    return r.content


async def test_voices_survive_a_restart_and_are_not_remade(tmp_path: Path, engine, counted):
    async def first(c, app):
        files = {"audio_file": ("ref.wav", clip(), "audio/wav")}
        r = await c.post("/v1/voice-cloning/clone", data={"name": "Keeper", "transcript": "A clip."}, files=files)
        assert r.status_code == 200, r.text
        return r.json()["id"], await speak(c, "Keeper"), await speak(c, "shimmer"), app.state.voices.store.list()

    voice_id, keeper, shimmer, rows = await run_app(tmp_path, engine, first)
    assert counted["encode"] == 1  # the clone; the built-in reference keeps its generated codes
    counted.update(encode=0, generate=0)

    async def second(c, app):
        listed = (await c.get("/v1/voice-cloning/voices")).json()["voices"]
        assert [(v["id"], v["name"], v["transcript"]) for v in listed] == [(voice_id, "Keeper", "A clip.")]
        return await speak(c, {"id": voice_id}), await speak(c, "shimmer"), app.state.voices.store.list()

    keeper2, shimmer2, rows2 = await run_app(tmp_path, engine, second)
    assert (keeper2, shimmer2) == (keeper, shimmer)
    assert rows2 == rows and [v.name for v in rows2] == ["Keeper", "shimmer"]
    # Stored codes were used: nothing encoded, and only the two requests generated.
    assert counted == {"encode": 0, "generate": 2}


async def test_missing_codes_are_encoded_once_and_stored_again(tmp_path: Path, engine, counted):
    async def create(c, app):
        files = {"audio_file": ("ref.wav", clip(), "audio/wav")}
        r = await c.post("/v1/voice-cloning/clone", data={"name": "Fragile", "transcript": "A clip."}, files=files)
        return await speak(c, r.json()["id"]), app.state.voices.store.list()[0]

    before, voice = await run_app(tmp_path, engine, create)
    (tmp_path / "voices" / "files" / voice.codes_file).unlink()  # lost, as after a bad disk

    async def use(c, app):
        stored = app.state.voices.store
        assert stored.last_recovery.cleared_codes == [voice.id] and not stored.list()[0].has_codes
        return await speak(c, "Fragile"), await speak(c, "Fragile"), stored.list()[0]

    counted.update(encode=0)
    first, second, repaired = await run_app(tmp_path, engine, use)
    assert first == second == before and counted["encode"] == 1
    assert repaired.codes_sha256 == voice.codes_sha256  # the same clip encodes to the same codes
