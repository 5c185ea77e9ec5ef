"""POST /v1/scene: a multi-speaker dialogue rendered turn by turn in one Conversation, saved as a file.

Each context entry (a speaker's reference clip and its transcript) becomes a segment of the
conversation's prompt, in order, so every speaker is conditioned on its own clip; then each scene
turn is spoken as the next turn of that one conversation. Clips come as https URLs (fetched by
net/fetch.py: public addresses only, size and time capped) or as data: base64 URIs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from csm_voice_api.api.audio_out import response_watermark, watermarked
from csm_voice_api.api.compat import SamplingFields, sampling_for
from csm_voice_api.api.deps import get_engine, get_outputs, get_settings
from csm_voice_api.api.speech_job import split_text, turn_cap_ms
from csm_voice_api.api.voices import checked_text
from csm_voice_api.audio.encode import wav_bytes
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import FRAME_MS, FRAME_SAMPLES, Conversation, Sampling, Segment, VoicePrompt
from csm_voice_api.errors import CsmError, InvalidInput
from csm_voice_api.jobs.net import address_policy
from csm_voice_api.sessions.manager import model_speaker

if TYPE_CHECKING:
    from csm_voice_api.api.audio_files import OutputStore
    from csm_voice_api.audio.watermark import StreamWatermarker
    from csm_voice_api.engine.engine import AsyncEngine

router = APIRouter()

MAX_CONTEXT = 16
Progress = Callable[[float, str], None]


class SceneTurn(BaseModel):
    text: str
    speaker_id: int = 0  # 0-9, or 999 (model speaker 0)


class SceneContext(BaseModel):
    prompt: str = ""  # transcript of the clip
    audio_url: str | None = Field(None, max_length=64 * 1024 * 1024)  # https://... or data:...;base64,...
    speaker_id: int = 0


class SceneRequest(SamplingFields):
    scene: list[SceneTurn] = Field(min_length=1)
    context: list[SceneContext] = Field(default_factory=list, max_length=MAX_CONTEXT)


@router.post("/v1/scene")
async def create_scene(
    body: SceneRequest,
    request: Request,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    outputs: OutputStore = Depends(get_outputs),
) -> dict:
    result = await render_scene(engine, body, settings, outputs, watermark=response_watermark())
    return with_absolute_url(result, str(request.base_url))


def with_absolute_url(result: dict, base_url: str) -> dict:
    """`result` with its audio url made absolute against the server's base URL."""
    audio = result.get("audio")
    if not isinstance(audio, dict) or not str(audio.get("url", "")).startswith("/"):
        return result
    return {**result, "audio": {**audio, "url": base_url.rstrip("/") + audio["url"]}}


async def render_scene(
    engine: AsyncEngine,
    body: SceneRequest,
    settings: Settings,
    outputs: OutputStore,
    *,
    watermark: StreamWatermarker | None,
    progress: Progress | None = None,
) -> dict:
    """Render the scene, store it as WAV; the response body (audio url relative to the server)."""
    limits = settings.limits()
    if len(body.scene) > settings.scene_max_turns:
        raise InvalidInput(f"A scene may have at most {settings.scene_max_turns} turns (CSM_SCENE_MAX_TURNS).",
                           param="scene")  # fmt: skip
    turns = [(model_speaker_at(t.speaker_id, f"scene[{i}].speaker_id"),
              checked_text(t.text, limits, f"scene[{i}].text")) for i, t in enumerate(body.scene)]  # fmt: skip
    sampling = sampling_for(body, settings, limits)
    segments = await context_segments(engine, body.context, settings, limits)
    conv = Conversation(VoicePrompt(segments=segments, speaker=turns[0][0]))
    frames: list[int] = [0] * len(turns)
    report = progress or (lambda _f, _m: None)

    async def pcm() -> AsyncIterator[np.ndarray]:
        budget_ms = sampling.max_audio_ms
        for i, (speaker, text) in enumerate(turns):
            report(i / len(turns), f"turn {i + 1}/{len(turns)} (speaker {speaker})")
            for j, phrase in enumerate(split_text(text)):
                if budget_ms < FRAME_MS:
                    return
                turn_sampling = _turn_sampling(sampling, budget_ms, phrase, i, j)
                async for chunk in _speak(engine, conv, phrase, speaker, turn_sampling):
                    frames[i] += chunk.frames
                    budget_ms -= chunk.frames * FRAME_MS
                    yield chunk.pcm

    try:
        async with aclosing(watermarked(pcm(), watermark)) as pieces:
            parts = [p async for p in pieces]
    finally:
        engine.release(conv)
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    data = await asyncio.to_thread(wav_bytes, audio)
    name = await asyncio.to_thread(outputs.save, data, "wav")
    report(1.0, f"rendered {sum(frames)} frames")
    return {
        "audio": {"url": f"/v1/audio/{name}", "content_type": "audio/wav", "file_name": name, "file_size": len(data)},
        "duration_ms": sum(frames) * FRAME_MS,
        "turns": [{"speaker_id": t.speaker_id, "frames": n} for t, n in zip(body.scene, frames, strict=True)],
    }


def _turn_sampling(sampling: Sampling, budget_ms: int, phrase: str, turn: int, phrase_no: int) -> Sampling:
    # A distinct, reproducible seed per phrase; each phrase is capped so a babbling one cannot eat the budget.
    seed = None if sampling.seed is None else sampling.seed + 1000 * turn + phrase_no
    return replace(sampling, max_audio_ms=min(budget_ms, turn_cap_ms(phrase)), seed=seed)


async def _speak(engine: AsyncEngine, conv: Conversation, text: str, speaker: int, sampling: Sampling
                 ) -> AsyncIterator:  # fmt: skip
    gen = engine.generate(conv, text, speaker=speaker, sampling=sampling, chunk_frames=8)
    async with aclosing(gen) as chunks:
        async for chunk in chunks:
            if chunk.frames:
                yield chunk


def model_speaker_at(speaker_id: int, param: str) -> int:
    try:
        return model_speaker(speaker_id)
    except CsmError as e:
        e.param = param
        raise


async def context_segments(engine: AsyncEngine, context: list[SceneContext], settings: Settings, limits: Limits
                           ) -> tuple[Segment, ...]:  # fmt: skip
    """The context clips as prompt segments, in order; each clip keeps at most an equal share
    of the model's prompt budget (its beginning), so every speaker keeps a reference."""
    if not context:
        return ()
    share = engine.max_prompt_frames() * FRAME_SAMPLES // len(context)
    segments = []
    for i, c in enumerate(context):
        speaker = model_speaker_at(c.speaker_id, f"context[{i}].speaker_id")
        codes = None
        if c.audio_url:
            pcm = (await load_clip(c.audio_url, settings, limits, f"context[{i}].audio_url"))[:share]
            codes = await engine.encode(np.ascontiguousarray(pcm, dtype=np.float32))
        segments.append(Segment(speaker, c.prompt.strip(), codes))
    return tuple(segments)


async def load_clip(url: str, settings: Settings, limits: Limits, param: str) -> np.ndarray:
    """A reference clip from a data: URI or an http(s) URL, decoded to 24 kHz mono."""
    from csm_voice_api.audio.decode import decode_base64_audio, decode_upload
    from csm_voice_api.net.fetch import fetch

    try:
        if url.startswith("data:"):
            return await asyncio.to_thread(decode_base64_audio, url, max_seconds=limits.max_reference_seconds)
        got = await fetch(url, max_bytes=min(settings.fetch_max_bytes, limits.max_upload_bytes),
                          timeout_s=settings.fetch_timeout_s, is_allowed=address_policy(settings.fetch_allow_networks),
                          param=param)  # fmt: skip
        return await asyncio.to_thread(decode_upload, got.content, max_seconds=limits.max_reference_seconds)
    except CsmError as e:
        e.param = param
        raise
