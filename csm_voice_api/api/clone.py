"""POST /v1/voice-clone: speak text in the voice of an uploaded clip, as a stored file or a stream."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from csm_voice_api.api import metrics
from csm_voice_api.api.audio_files import OutputStore
from csm_voice_api.api.deps import get_engine, get_limits, get_outputs, get_settings
from csm_voice_api.api.models import CONTENT_TYPES
from csm_voice_api.api.sessions import reference_prompt
from csm_voice_api.api.streaming import respond_stream
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import Sampling
from csm_voice_api.errors import InputTooLong, InvalidInput
from csm_voice_api.sessions.manager import DEFAULT_SPEAKER_ID

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

router = APIRouter()


class CloneResult(BaseModel):
    audio_url: str  # fetch it with GET; it is kept for CSM_OUTPUT_RETENTION_SECONDS
    duration_seconds: float
    frames: int
    stop_reason: str | None


@router.post("/v1/voice-clone", response_model=None)
async def voice_clone(
    text: str = Form(...),
    audio_file: UploadFile = File(...),
    context_text: str = Form(""),
    speaker_id: int = Form(DEFAULT_SPEAKER_ID, description="999 (default): the cloned voice, model speaker 0; or 0-9"),
    max_audio_length_ms: int = Form(15_000, ge=80),
    temperature: float = Form(0.6, ge=0.0, le=5.0),
    topk: int = Form(20, ge=1, le=2051),
    output_format: Literal["wav", "mp3"] = Form("wav"),
    stream: bool = Form(False),
    seed: int | None = Form(None, ge=0, le=2**31),  # extension: reproducible audio
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
    outputs: OutputStore = Depends(get_outputs),
) -> Response | CloneResult:
    text = text.strip()
    if not text:
        raise InvalidInput("text is empty: send the text to speak.", param="text")
    if len(text) > limits.max_text_chars:
        raise InputTooLong(f"text is {len(text)} characters; the limit is {limits.max_text_chars}.", param="text")
    if max_audio_length_ms > limits.max_output_ms:
        raise InputTooLong(f"max_audio_length_ms may be at most {limits.max_output_ms}.", param="max_audio_length_ms")
    voice = await reference_prompt(engine, limits, audio_file, context_text, speaker_id)
    sampling = Sampling(temperature=temperature, topk=topk, seed=seed, max_audio_ms=max_audio_length_ms)
    job = SpeechJob(engine, voice, split_text(text), sampling=sampling, fmt=output_format,
                    chunk_frames=settings.chunk_frames)
    metrics.REQUESTS.labels(route="voice_clone").inc()
    if stream:
        return await respond_stream(job.run(), CONTENT_TYPES[output_format])
    async with aclosing(job.run()) as chunks:
        data = b"".join([b async for b in chunks])
    name = await asyncio.to_thread(outputs.save, data, output_format)
    return CloneResult(audio_url=f"/v1/audio/{name}", duration_seconds=round(job.frames * 0.08, 3),
                       frames=job.frames, stop_reason=job.stop_reason)
