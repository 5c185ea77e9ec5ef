"""SessionManager against the demo engine on CPU: open/get/close, cap, TTL expiry and re-warm,
turns that continue a session, and sessions that do not share state."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import aclosing

import anyio
import numpy as np
import pytest
import torch

from csm_voice_api.engine.engine import AsyncEngine
from csm_voice_api.engine.types import FRAME_SAMPLES, Sampling, Segment, VoicePrompt
from csm_voice_api.errors import (
    InvalidInput,
    Overloaded,
    SessionNotFound,
    VoiceNotFound,
)
from csm_voice_api.sessions.manager import (
    SessionConfig,
    SessionManager,
    SessionState,
    clone_prompt,
    model_speaker,
)

from ..audio.media import make_file, tone
from ..live import demo_engine

SAMPLING = Sampling(temperature=0.9, topk=50, seed=5, max_audio_ms=320)  # 4 frames per phrase at most


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    with demo_engine(4) as eng:
        yield eng


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def voice(engine: AsyncEngine, seed: int) -> VoicePrompt:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2048, (engine.num_codebooks, 6), generator=g)
    return VoicePrompt(segments=(Segment(0, f"reference {seed}", codes),), speaker=0)


async def speak(manager: SessionManager, session, text: str) -> np.ndarray:
    pcm = []
    async with aclosing(manager.speak(session, text)) as chunks:
        async for chunk in chunks:
            pcm.append(chunk.pcm)
    return np.concatenate(pcm)


async def until(predicate, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_phrases_continue_the_session_conversation(engine):
    manager = SessionManager(engine)
    session = await manager.open(voice=voice(engine, 1), sampling=SAMPLING)
    assert manager.get(session.id) is session and session.state is SessionState.WARM
    first = await speak(manager, session, "The first phrase.")
    slot, position = session.conversation.slot, session.conversation.position
    second = await speak(manager, session, "The second phrase.")
    turns = session.conversation.turns
    assert [t.text for t in turns] == ["The first phrase.", "The second phrase."]
    assert [t.codes.shape[1] * FRAME_SAMPLES for t in turns] == [len(first), len(second)]
    assert session.frames == (len(first) + len(second)) // FRAME_SAMPLES
    # The second phrase continued in the same warm slot, after the first one's positions.
    assert slot is not None and session.conversation.slot == slot
    assert session.conversation.position > position + second.size // FRAME_SAMPLES
    assert session.state is SessionState.WARM
    manager.close(session.id)


async def test_idle_ttl_releases_the_slot_and_the_session_rewarms(engine):
    clock = Clock()
    manager = SessionManager(engine, SessionConfig(idle_ttl_s=10, close_ttl_s=100), clock=clock)
    session = await manager.open(voice=voice(engine, 2), sampling=SAMPLING)
    await speak(manager, session, "Warm me up.")
    assert session.conversation.slot is not None
    clock.now += 9
    assert manager.expire() == ([], [])
    clock.now += 1
    assert manager.expire() == ([session.id], [])
    assert session.state is SessionState.COLD
    await until(lambda: session.conversation.slot is None)  # the engine freed it
    assert len(session.conversation.turns) == 1  # the context is kept
    pcm = await speak(manager, session, "Back again.")
    assert len(pcm) > 0 and session.state is SessionState.WARM
    assert session.conversation.slot is not None
    assert [t.text for t in session.conversation.turns] == ["Warm me up.", "Back again."]
    manager.close(session.id)


async def test_rewarmed_session_speaks_as_if_it_never_went_cold(engine):
    """Re-warming rebuilds the slot from the voice and past turns: same audio as staying warm."""
    clock = Clock()
    manager = SessionManager(engine, SessionConfig(idle_ttl_s=1), clock=clock)
    warm = await manager.open(voice=voice(engine, 3), sampling=SAMPLING)
    cold = await manager.open(voice=voice(engine, 3), sampling=SAMPLING)
    for s in (warm, cold):
        await speak(manager, s, "One phrase first.")
    manager.touch(warm)
    clock.now += 0.5
    manager.touch(warm)
    clock.now += 0.6
    assert manager.expire()[0] == [cold.id]
    await until(lambda: cold.conversation.slot is None)
    a = await speak(manager, warm, "And then another.")
    b = await speak(manager, cold, "And then another.")
    assert len(a) == len(b)
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-4, rtol=1e-4)
    for s in (warm, cold):
        manager.close(s.id)


async def test_close_ttl_forgets_unattached_sessions_only(engine):
    clock = Clock()
    manager = SessionManager(engine, SessionConfig(idle_ttl_s=5, close_ttl_s=50), clock=clock)
    idle = await manager.open(voice=voice(engine, 4))
    attached = await manager.open(voice=voice(engine, 4))
    attached.attached = 1
    clock.now += 50
    assert manager.expire() == ([attached.id], [idle.id])
    with pytest.raises(SessionNotFound):
        manager.get(idle.id)
    assert idle.state is SessionState.CLOSED and idle.closed.is_set()
    assert manager.get(attached.id).state is SessionState.COLD
    with pytest.raises(SessionNotFound):
        async with aclosing(manager.speak(idle, "Too late.")) as chunks:
            async for _ in chunks:
                pass


async def test_cap_refuses_with_overloaded_until_one_closes(engine):
    manager = SessionManager(engine, SessionConfig(max_sessions=2))
    a = await manager.open(voice=voice(engine, 5))
    await manager.open(voice=voice(engine, 5))
    with pytest.raises(Overloaded) as refused:
        await manager.open(voice=voice(engine, 5))
    assert "2 sessions" in refused.value.message and refused.value.retry_after > 0
    manager.close(a.id)
    await manager.open(voice=voice(engine, 5))
    assert len(manager) == 2
    with pytest.raises(SessionNotFound):
        manager.close(a.id)


async def test_voice_id_goes_through_the_resolver(engine):
    asked: list[str] = []

    async def resolver(voice_id: str) -> VoicePrompt:
        asked.append(voice_id)
        if voice_id != "narrator":
            raise VoiceNotFound(f"no voice {voice_id}")
        return voice(engine, 6)

    manager = SessionManager(engine, voice_resolver=resolver)
    session = await manager.open(voice_id="narrator")
    assert session.conversation.voice.segments[0].text == "reference 6"
    with pytest.raises(VoiceNotFound):
        await manager.open(voice_id="nobody")
    with pytest.raises(InvalidInput):
        await manager.open()  # neither a clip nor a voice id
    with pytest.raises(VoiceNotFound):
        await SessionManager(engine).open(voice_id="narrator")  # no resolver configured
    assert asked == ["narrator", "nobody"] and len(manager) == 1


async def test_sessions_speaking_at_once_keep_their_own_turns_and_audio(engine):
    manager = SessionManager(engine)
    alone = await manager.open(voice=voice(engine, 7), sampling=SAMPLING)
    reference = [await speak(manager, alone, t) for t in ("Mine, only mine.", "Still mine.")]

    a = await manager.open(voice=voice(engine, 7), sampling=SAMPLING)
    b = await manager.open(voice=voice(engine, 8), sampling=SAMPLING)
    got_a, got_b = [], []
    for ta, tb in (("Mine, only mine.", "Yours, not mine."), ("Still mine.", "Still yours.")):
        pa, pb = await asyncio.gather(speak(manager, a, ta), speak(manager, b, tb))
        got_a.append(pa)
        got_b.append(pb)
    assert [t.text for t in a.conversation.turns] == ["Mine, only mine.", "Still mine."]
    assert [t.text for t in b.conversation.turns] == ["Yours, not mine.", "Still yours."]
    for x, y in zip(reference, got_a, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.conversation.slot != b.conversation.slot


async def test_shutdown_closes_everything_and_stops_the_sweeper(engine):
    manager = SessionManager(engine, SessionConfig(sweep_interval_s=0.01))
    await manager.start()
    session = await manager.open(voice=voice(engine, 9))
    await manager.shutdown()
    assert len(manager) == 0 and session.state is SessionState.CLOSED


async def test_clone_prompt_decodes_trims_and_encodes_an_upload(engine):
    clip = make_file("mp3", tone(0.5, 44_100), 44_100)
    prompt = await clone_prompt(engine, clip, "  Hi there.  ", 0, max_seconds=5)
    (seg,) = prompt.segments
    assert seg.text == "Hi there." and seg.speaker == 0 and prompt.speaker == 0
    assert seg.codes.shape[0] == engine.num_codebooks
    assert 5 <= seg.codes.shape[1] <= 8  # 0.5 s at 12.5 frames/s, give or take the codec's edges


def test_speaker_ids_map_999_to_model_speaker_0():
    assert model_speaker(999) == 0
    assert [model_speaker(i) for i in (0, 1, 9)] == [0, 1, 9]
    for bad in (-1, 10, 1000):
        with pytest.raises(InvalidInput):
            model_speaker(bad)
