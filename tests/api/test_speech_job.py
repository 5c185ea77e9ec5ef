"""A long input is spoken as consecutive turns of ONE conversation, within one budget."""

from __future__ import annotations

from contextlib import aclosing

import numpy as np

from csm_voice_api.api import speech_job
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.engine.types import Sampling, VoicePrompt


def test_split_text_keeps_every_word_in_order():
    text = " ".join(f"Sentence number {i} is here, and it goes on for a little while." for i in range(12))
    phrases = split_text(text)
    assert len(phrases) > 1
    assert all(len(p) <= speech_job.PHRASE_MAX_CHARS for p in phrases)
    assert " ".join(phrases).split() == text.split()
    assert split_text("Hi.") == ["Hi."]


async def test_phrases_become_turns_of_one_conversation(engine, monkeypatch):
    # Cap each turn at 0.4 s + 0 per char so the random demo model (which rarely stops by
    # itself) still leaves budget for every phrase.
    monkeypatch.setattr(speech_job, "TURN_BASE_MS", 400)
    monkeypatch.setattr(speech_job, "TURN_MS_PER_CHAR", 0)
    job = SpeechJob(engine, VoicePrompt(segments=(), speaker=2), ["One.", "Two.", "Three."],
                    sampling=Sampling(seed=1, max_audio_ms=10_000), fmt="pcm")  # fmt: skip
    async with aclosing(job.run()) as chunks:
        data = b"".join([c async for c in chunks])
    turns = job.conversation.turns
    assert [t.text for t in turns] == ["One.", "Two.", "Three."]
    assert all(t.speaker == 2 for t in turns)
    assert 1 <= job.frames <= 15
    assert len(np.frombuffer(data, "<i2")) == job.frames * 1920
    assert job.frames == sum(t.codes.shape[-1] for t in turns)


async def test_the_request_budget_spans_all_turns(engine):
    job = SpeechJob(engine, VoicePrompt(segments=(), speaker=0), ["One.", "Two.", "Three."],
                    sampling=Sampling(seed=2, max_audio_ms=400), fmt="pcm")  # fmt: skip
    async with aclosing(job.run()) as chunks:
        data = b"".join([c async for c in chunks])
    assert 1 <= job.frames <= 5
    assert len(data) == job.frames * 1920 * 2
