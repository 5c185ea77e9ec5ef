"""POST /api/v1/audio/conversation: speak the next turn of a conversation given its earlier turns.

The context turns (speaker, text, base64 audio) become the VoicePrompt, so the model continues
the conversation in the voices it heard. Context audio past the model's prompt budget is dropped,
oldest turns first; a single turn longer than the budget keeps its beginning.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, Field

from csm_voice_api.api.deps import get_engine, get_limits, get_settings
from csm_voice_api.api.voices import SpeakRequest, checked_text, speak
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import FRAME_SAMPLES, Segment, VoicePrompt
from csm_voice_api.errors import CsmError, InputTooLong
from csm_voice_api.sessions.manager import model_speaker

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

router = APIRouter()

MAX_CONTEXT_TURNS = 32


class ContextTurn(BaseModel):
    speaker: int = 0  # 0-9, or 999 (model speaker 0)
    text: str = ""
    audio: str | None = None  # base64 (or a data: URI) of the turn's audio, any accepted format


class ConversationRequest(SpeakRequest):
    text: str
    speaker_id: int = 0  # who speaks the new turn: 0-9, or 999 (model speaker 0)
    context: list[ContextTurn] = Field(default_factory=list, max_length=MAX_CONTEXT_TURNS)


@router.post("/api/v1/audio/conversation", response_model=None)
async def conversation_turn(
    body: ConversationRequest,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    text = checked_text(body.text, limits, "text")
    speaker = model_speaker(body.speaker_id)
    segments, dropped = await context_segments(engine, body.context, limits)
    response = await speak(engine, VoicePrompt(segments=segments, speaker=speaker), text, body, settings, limits)
    response.headers["X-Context-Turns-Dropped"] = str(dropped)
    return response


async def context_segments(engine: AsyncEngine, turns: list[ContextTurn], limits: Limits
                           ) -> tuple[tuple[Segment, ...], int]:  # fmt: skip
    """The turns as Segments (audio encoded) within the prompt budget, and how many were dropped."""
    speakers = [_speaker(t.speaker, i) for i, t in enumerate(turns)]
    pcms = [None if t.audio is None else await _decode(t.audio, i, limits) for i, t in enumerate(turns)]
    budget = engine.max_prompt_frames() * FRAME_SAMPLES
    start = len(turns)  # turns[start:] are kept
    used = 0
    # Newest turns matter most to what comes next: keep them, drop from the oldest.
    for i in reversed(range(len(turns))):
        n = 0 if pcms[i] is None else len(pcms[i])
        if used + n > budget:
            if i == len(turns) - 1:  # the newest turn alone is too long: keep its beginning
                pcms[i] = pcms[i][:budget]
                start = i
            break
        used += n
        start = i
    segments = []
    for i in range(start, len(turns)):
        codes = None if pcms[i] is None else await engine.encode(np.ascontiguousarray(pcms[i], dtype=np.float32))
        segments.append(Segment(speakers[i], turns[i].text.strip(), codes))
    return tuple(segments), start


def _speaker(speaker: int, i: int) -> int:
    try:
        return model_speaker(speaker)
    except CsmError as e:
        e.param = f"context[{i}].speaker"
        raise


async def _decode(audio: str, i: int, limits: Limits) -> np.ndarray:
    from csm_voice_api.audio.decode import decode_base64_audio

    param = f"context[{i}].audio"
    # base64 is 4/3 of the raw size: refuse before decoding anything.
    if len(audio) * 3 // 4 > limits.max_upload_bytes:
        raise InputTooLong(f"{param} is larger than {limits.max_upload_bytes} bytes (CSM_MAX_UPLOAD_BYTES).",
                           param=param)  # fmt: skip
    try:
        return await asyncio.to_thread(decode_base64_audio, audio, max_seconds=limits.max_reference_seconds)
    except CsmError as e:
        e.param = param
        raise
