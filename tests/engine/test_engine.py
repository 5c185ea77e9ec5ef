"""AsyncEngine on the demo model (CPU): slot isolation, warm == rebuilt prefill, seeds, abort.

Greedy decoding (temperature 0) makes codes a pure function of the prompt, so any leak between
slots, or any difference between a warm slot and a rebuilt one, shows up as different codes.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from csm_voice_api.audio.codec import MimiCodec
from csm_voice_api.engine.demo import build_demo
from csm_voice_api.engine.engine import AsyncEngine, EngineConfig
from csm_voice_api.engine.types import FRAME_SAMPLES, Conversation, Sampling, Segment, VoicePrompt
from csm_voice_api.errors import ContextOverflow

GREEDY = Sampling(temperature=0.0, topk=1, seed=0, max_audio_ms=800)  # 10 frames


@pytest.fixture(scope="module")
async def engine():
    eng = AsyncEngine(build_demo(), MimiCodec.load(None, tiny=True), EngineConfig(device="cpu", max_batch=12))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
async def voice(engine):
    ref = (np.random.RandomState(0).randn(FRAME_SAMPLES * 6) * 0.1).astype(np.float32)
    return VoicePrompt((Segment(0, "a reference clip", await engine.encode(ref)),), speaker=0)


async def speak(engine, conv, text, sampling=GREEDY, **kw):
    chunks = [c async for c in engine.generate(conv, text, sampling=sampling, **kw)]
    return chunks, np.concatenate([c.pcm for c in chunks])


async def test_chunks_cover_frames_and_turn_is_recorded(engine, voice):
    conv = Conversation(voice)
    chunks, pcm = await speak(engine, conv, "Hello there.", chunk_frames=3)
    frames = sum(c.frames for c in chunks)
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    assert len(pcm) == frames * FRAME_SAMPLES
    assert conv.turns[-1].text == "Hello there." and conv.turns[-1].codes.shape == (32, frames)
    assert all(c.frames <= 3 for c in chunks)
    engine.release(conv)


async def test_step_period_is_measured_while_steps_follow_each_other(engine, voice):
    # Admission compares it with real time (80 ms per frame): it must be the time between back
    # to back steps, so at most the whole generation's wall time, never absent after one.
    conv = Conversation(voice)
    started = time.perf_counter()
    chunks, _ = await speak(engine, conv, "Hello there.")
    wall_ms = 1e3 * (time.perf_counter() - started)
    step = engine.stats()["step_ms"]
    assert sum(c.frames for c in chunks) >= 2 and step is not None and 0 < step <= wall_ms
    engine.release(conv)


async def test_slot_isolation_with_joins_and_leaves(engine, voice):
    alone = Conversation(voice)
    await speak(engine, alone, "The quick brown fox.")
    expected = alone.turns[-1].codes
    engine.release(alone)

    target = Conversation(voice)
    others = [Conversation(voice) for _ in range(5)]

    async def late(conv, delay, text, ms):
        await asyncio.sleep(delay)  # joins mid-stream
        await speak(engine, conv, text, Sampling(temperature=0.9, topk=50, seed=7, max_audio_ms=ms))

    await asyncio.gather(
        speak(engine, target, "The quick brown fox."),
        late(others[0], 0.0, "short", 160),  # leaves early
        late(others[1], 0.05, "joins a little later", 800),
        late(others[2], 0.1, "and another one", 400),
        late(others[3], 0.0, "x", 80),
        late(others[4], 0.15, "last to arrive here", 800),
    )
    assert torch.equal(target.turns[-1].codes, expected)
    for c in [target, *others]:
        engine.release(c)


async def test_warm_turn_equals_rebuilt_prefill(engine, voice):
    warm = Conversation(voice)
    await speak(engine, warm, "First turn.")
    await speak(engine, warm, "Second turn, warm.")  # continues in the same slot: no re-prefill
    cold = Conversation(voice, turns=[warm.turns[0]])  # same history, no slot: rebuilt from scratch
    await speak(engine, cold, "Second turn, warm.")
    assert torch.equal(warm.turns[1].codes, cold.turns[1].codes)
    engine.release(warm)
    engine.release(cold)


async def test_cached_voice_kv_equals_computed(engine):
    ref = (np.random.RandomState(5).randn(FRAME_SAMPLES * 4) * 0.1).astype(np.float32)
    fresh_voice = VoicePrompt((Segment(1, "a voice never seen", await engine.encode(ref)),), speaker=1)
    key = fresh_voice.key
    assert key not in engine.voice_kv
    first = Conversation(fresh_voice)
    await speak(engine, first, "Same words.")  # computes the voice KV and caches it
    assert key in engine.voice_kv
    second = Conversation(fresh_voice)
    await speak(engine, second, "Same words.")  # copies the cached KV into its slot
    assert torch.equal(first.turns[-1].codes, second.turns[-1].codes)
    engine.release(first)
    engine.release(second)


async def test_same_seed_same_audio_other_seed_differs(engine, voice):
    def sampled(seed):
        return Sampling(temperature=0.9, topk=50, seed=seed, max_audio_ms=800)

    runs = []
    for seed in (11, 11, 12):
        conv = Conversation(voice)
        runs.append((await speak(engine, conv, "Seeded words.", sampled(seed)))[1])
        engine.release(conv)
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


async def test_abort_frees_slot_and_next_occupant_is_unaffected(engine, voice):
    ref = Conversation(voice)
    await speak(engine, ref, "Next occupant.")
    expected = ref.turns[-1].codes
    engine.release(ref)
    await asyncio.sleep(0.05)
    free_before = engine.stats()["free_slots"]

    victim = Conversation(voice)
    agen = engine.generate(victim, "A long utterance that gets cut off.",
                           sampling=Sampling(temperature=0.9, topk=50, seed=3, max_audio_ms=60_000))
    await agen.__anext__()
    await agen.aclose()  # the consumer goes away: the engine must stop and free the row
    for _ in range(100):
        await asyncio.sleep(0.02)
        if engine.stats()["active"] == 0 and engine.stats()["free_slots"] == free_before:
            break
    assert engine.stats()["active"] == 0
    assert engine.stats()["free_slots"] == free_before
    assert victim.turns == [] and victim.slot is None

    nxt = Conversation(voice)
    await speak(engine, nxt, "Next occupant.")
    assert torch.equal(nxt.turns[-1].codes, expected)
    engine.release(nxt)


async def test_prompt_that_cannot_fit_is_refused(engine, voice):
    conv = Conversation(voice)
    with pytest.raises(ContextOverflow, match="2048-position window"):
        await speak(engine, conv, "Too much audio asked for.", Sampling(max_audio_ms=2048 * 80))
    engine.release(conv)


async def _streamed_equals_offline(engine, voice, atol):
    """Audio handed out frame by frame (Mimi decoded a step behind the codes, on its own CUDA
    stream there) equals an offline decode of the turn's codes, for several rows at once. Twice:
    the second round's requests reuse the first's slots, whose Mimi state must start afresh."""
    for texts in (["One two three.", "Four.", "Five six seven eight."], ["Nine ten.", "Eleven twelve thirteen."]):
        convs = [Conversation(voice) for _ in texts]
        outs = await asyncio.gather(*(speak(engine, c, t, chunk_frames=1) for c, t in zip(convs, texts)))
        for conv, (chunks, pcm) in zip(convs, outs):
            offline = engine.codec.decode(conv.turns[-1].codes)
            assert len(pcm) == len(offline) > 0
            torch.testing.assert_close(torch.from_numpy(pcm), torch.from_numpy(offline), atol=atol, rtol=1e-3)
            engine.release(conv)


async def test_streamed_audio_equals_offline_decode(engine, voice):
    await _streamed_equals_offline(engine, voice, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_streamed_audio_equals_offline_decode_cuda(monkeypatch):
    # Offline and streaming decodes run different conv shapes: compare them without TF32 rounding.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eng = AsyncEngine(build_demo(), MimiCodec.load(None, device="cuda", tiny=True),
                      EngineConfig(device="cuda", max_batch=12))
    await eng.start()
    try:
        ref = (np.random.RandomState(0).randn(FRAME_SAMPLES * 6) * 0.1).astype(np.float32)
        voice = VoicePrompt((Segment(0, "a reference clip", await eng.encode(ref)),), speaker=0)
        await _streamed_equals_offline(eng, voice, atol=1e-4)
    finally:
        await eng.shutdown()
