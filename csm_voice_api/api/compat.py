"""Routes other CSM servers expose, so their clients work unchanged.

POST /generate_audio: JSON in, base64 WAV in JSON out.
POST /generate: speaker 0|1, WAV bytes, or one streaming WAV (a single header of unknown length).
Both speak with the model's plain speaker voices (no reference clip), as those servers do.
"""

from __future__ import annotations

import base64
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from csm_voice_api.api.deps import get_engine, get_limits, get_settings
from csm_voice_api.api.streaming import respond_stream
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.api.voices import checked_text
from csm_voice_api.audio.encode import wav_header
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import SAMPLE_RATE, Sampling, VoicePrompt
from csm_voice_api.errors import InputTooLong

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

router = APIRouter()


class SamplingFields(BaseModel):
    """Sampling knobs a request may set; each one left out takes the server's default."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    topk: int | None = Field(None, ge=1, le=2051)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_audio_length_ms: int | None = Field(None, ge=80)


class GenerateAudioRequest(SamplingFields):
    text: str
    speaker: int = Field(0, ge=0, le=9)


class GenerateRequest(SamplingFields):
    text: str
    speaker: int = Field(0, ge=0, le=1)
    streaming: bool = False


def sampling_for(body: SamplingFields, settings: Settings, limits: Limits) -> Sampling:
    """The request's Sampling: its own values where given, the server's defaults elsewhere."""
    max_ms = limits.max_output_ms if body.max_audio_length_ms is None else body.max_audio_length_ms
    if max_ms > limits.max_output_ms:
        raise InputTooLong(f"max_audio_length_ms may be at most {limits.max_output_ms} (CSM_MAX_OUTPUT_MS).",
                           param="max_audio_length_ms")  # fmt: skip
    return Sampling(
        temperature=settings.temperature if body.temperature is None else body.temperature,
        topk=settings.topk if body.topk is None else body.topk,
        top_p=settings.top_p if body.top_p is None else body.top_p,
        repetition_penalty=settings.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        max_audio_ms=max_ms,
    )


def _job(engine: AsyncEngine, text: str, speaker: int, body: SamplingFields, settings: Settings, limits: Limits
         ) -> SpeechJob:  # fmt: skip
    return SpeechJob(
        engine,
        VoicePrompt(segments=(), speaker=speaker),
        split_text(checked_text(text, limits, "text")),
        sampling=sampling_for(body, settings, limits),
        fmt="wav",
        chunk_frames=settings.chunk_frames,
    )


async def whole_wav(job: SpeechJob) -> bytes:
    """The job's audio as one WAV file with exact sizes."""
    async with aclosing(job.run()) as chunks:
        data = b"".join([b async for b in chunks])
    return wav_header(SAMPLE_RATE, (len(data) - 44) // 2) + data[44:]


@router.post("/generate_audio")
async def generate_audio(
    body: GenerateAudioRequest,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> dict:
    job = _job(engine, body.text, body.speaker, body, settings, limits)
    data = await whole_wav(job)
    return {"audio_data": base64.b64encode(data).decode(), "format": "wav", "encoding": "base64"}


@router.post("/generate", response_model=None)
async def generate(
    body: GenerateRequest,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    job = _job(engine, body.text, body.speaker, body, settings, limits)
    if body.streaming:
        return await respond_stream(job.run(), "audio/wav")
    data = await whole_wav(job)
    headers = {"X-Audio-Frames": str(job.frames), "X-Stop-Reason": job.stop_reason or ""}
    return Response(data, media_type="audio/wav", headers=headers)
