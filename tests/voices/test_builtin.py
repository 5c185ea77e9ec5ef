"""Built-in voices on a fake engine: clip mapping, one reference per voice, reuse, remaking."""

from __future__ import annotations

import asyncio
import io
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from csm_voice_api.engine.types import FRAME_SAMPLES, AudioChunk, Segment
from csm_voice_api.voices import VoiceStore
from csm_voice_api.voices.builtin import (
    BUILTIN_NAMES,
    DEMO_REFERENCE_MS,
    KNOWN_TRANSCRIPTS,
    REFERENCE_TEXT,
    BuiltinVoices,
    recipes,
)
from csm_voice_api.voices.service import VoiceService

K = 4


class FakeEngine:
    """The engine calls builtin voices make, with counters. Generation is a function of the seed
    and speaker, like the real engine's."""

    def __init__(self, clips: list[Path] | None = None, *, model_name: str = "fake", is_demo: bool = False,
                 prompt_frames: int = 50):  # fmt: skip
        self.prompt_clips = clips or []
        self.model_name = model_name
        self.is_demo = is_demo
        self.num_codebooks = K
        self.prompt_frames = prompt_frames
        self.generated = self.encoded = self.released = 0

    def max_prompt_frames(self) -> int:
        return self.prompt_frames

    async def encode(self, pcm: np.ndarray) -> torch.Tensor:
        self.encoded += 1
        T = math.ceil(len(pcm) / FRAME_SAMPLES)
        return torch.arange(K * T, dtype=torch.int64).reshape(K, T) % 2048

    async def generate(self, conv, text, *, speaker=None, sampling, chunk_frames=2, request_id=None):
        self.generated += 1
        await asyncio.sleep(0.01)  # let concurrent first uses interleave
        frames = sampling.max_frames
        rng = np.random.default_rng([sampling.seed, conv.voice.speaker])
        pcm = rng.uniform(-0.5, 0.5, frames * FRAME_SAMPLES).astype(np.float32)
        codes = torch.from_numpy(rng.integers(0, 2048, (K, frames)))
        yield AudioChunk(pcm, frames)
        conv.turns.append(Segment(conv.voice.speaker, text, codes))
        yield AudioChunk(np.zeros(0, np.float32), 0, done=True, stop_reason="max_length")

    def release(self, conv) -> None:
        self.released += 1


def write_wav(path: Path, seconds: float, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    path.write_bytes(buf.getvalue())
    return path


def test_clips_map_to_voices_in_a_fixed_order(tmp_path: Path):
    clips = [write_wav(tmp_path / f"{n}.wav", 0.1) for n in ("read_speech_b", "conversational_b", "zeta", "conversational_a")]
    (tmp_path / "zeta.txt").write_text("  Words  of zeta.\n")
    got = recipes(clips, seed=1, reference_ms=400)
    assert got == recipes(list(reversed(clips)), seed=1, reference_ms=400)
    # Clips with a transcript first (known ones or a sibling .txt), then the rest, by name.
    assert [got[n].clip.name if got[n].clip else None for n in BUILTIN_NAMES] == [
        "conversational_a.wav", "conversational_b.wav", "zeta.wav", "read_speech_b.wav", None, None,
    ]  # fmt: skip
    assert got["alloy"].transcript == KNOWN_TRANSCRIPTS["conversational_a"]
    assert got["fable"].transcript == "Words of zeta."
    assert got["onyx"].transcript == ""
    assert (got["nova"].speaker, got["shimmer"].speaker) == (4, 5)
    assert got["nova"].transcript == REFERENCE_TEXT


async def test_concurrent_first_uses_make_one_reference(tmp_path: Path):
    engine = FakeEngine()
    with VoiceStore(tmp_path) as store:
        builtins = BuiltinVoices(store, engine, seed=7, reference_ms=400)
        voices = await asyncio.gather(*[builtins.voice("alloy") for _ in range(5)], builtins.voice("ALLOY "))
        assert len({v.id for v in voices}) == 1
        assert engine.generated == 1 and engine.released == 1
        (stored,) = store.list()
        assert stored.builtin and stored.name == "alloy" and stored.transcript == REFERENCE_TEXT
        assert store.load_codes(stored).shape == (K, 5)  # 400 ms: 5 frames, the generated codes themselves
        assert store.load_audio(stored).shape == (5 * FRAME_SAMPLES,)


async def test_reference_is_reused_after_reopening_and_remade_when_its_recipe_changes(tmp_path: Path):
    with VoiceStore(tmp_path) as store:
        first = await BuiltinVoices(store, FakeEngine(), seed=7, reference_ms=400).voice("echo")
    fresh = FakeEngine()
    with VoiceStore(tmp_path) as store:
        again = await BuiltinVoices(store, fresh, seed=7, reference_ms=400).voice("echo")
        assert again == first and fresh.generated == 0
        remade = await BuiltinVoices(store, fresh, seed=8, reference_ms=400).voice("echo")
        assert remade.id != first.id and fresh.generated == 1
        other_model = FakeEngine(model_name="another")
        remade2 = await BuiltinVoices(store, other_model, seed=8, reference_ms=400).voice("echo")
        assert remade2.id != remade.id and other_model.generated == 1
        assert [v.name for v in store.list()] == ["echo"]  # the old references are gone


async def test_a_prompt_clip_is_the_reference(tmp_path: Path):
    clip = write_wav(tmp_path / "conversational_a.wav", 1.0)
    engine = FakeEngine([clip])
    with VoiceStore(tmp_path / "store") as store:
        voice = await BuiltinVoices(store, engine, seed=7, reference_ms=400).voice("alloy")
        assert engine.generated == 0 and engine.encoded == 1
        assert voice.transcript == KNOWN_TRANSCRIPTS["conversational_a"]
        assert store.load_audio(voice).shape == (24_000,)  # resampled to 24 kHz, whole
        assert store.load_codes(voice).shape == (K, math.ceil(24_000 / FRAME_SAMPLES))


async def test_a_long_prompt_clip_is_cut_to_the_prompt_budget(tmp_path: Path):
    clip = write_wav(tmp_path / "conversational_b.wav", 2.0)
    engine = FakeEngine([clip], prompt_frames=10)
    with VoiceStore(tmp_path / "store") as store:
        voice = await BuiltinVoices(store, engine, seed=7, reference_ms=400).voice("alloy")
        assert store.load_audio(voice).shape == (10 * FRAME_SAMPLES,)


def test_demo_model_references_stay_short(tmp_path: Path):
    with VoiceStore(tmp_path) as store:
        demo = BuiltinVoices(store, FakeEngine(is_demo=True), seed=1, reference_ms=8000)
        real = BuiltinVoices(store, FakeEngine(), seed=1, reference_ms=8000)
    assert demo.recipes["alloy"].reference_ms == DEMO_REFERENCE_MS
    assert real.recipes["alloy"].reference_ms == 8000


async def test_service_prompt_speaks_as_the_builtin_speaker_from_stored_codes(tmp_path: Path):
    engine = FakeEngine()
    service = VoiceService(VoiceStore(tmp_path), engine, builtin_seed=3, builtin_ms=400)
    try:
        prompt = await service.prompt("Echo")
        (voice,) = service.store.list()
        assert prompt.speaker == 1 and prompt.segments[0].speaker == 1
        assert prompt.segments[0].text == REFERENCE_TEXT
        assert torch.equal(prompt.segments[0].codes, torch.from_numpy(service.store.load_codes(voice)))
        again = await service.prompt(voice.id)  # by its stored id too
        assert again.key == prompt.key and engine.generated == 1
        assert service.user_voices() == []  # references are not listed as the user's voices
    finally:
        service.close()


@pytest.mark.parametrize("name", ["alloy", "Nova", " shimmer "])
async def test_builtin_names_are_reserved(tmp_path: Path, name: str):
    from csm_voice_api.errors import InvalidInput

    service = VoiceService(VoiceStore(tmp_path), FakeEngine())
    try:
        with pytest.raises(InvalidInput) as e:
            await service.create(name, np.zeros(2400, np.float32), transcript="hi")
        assert e.value.param == "name"
    finally:
        service.close()
