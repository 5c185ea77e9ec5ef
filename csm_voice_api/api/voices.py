"""Voice library routes: /v1/voice-cloning/* (clone, list, generate, preview, delete) and
OpenAI's custom voices (POST /v1/audio/voices). GET /v1/audio/voices lives in speech.py.

Every stored voice is also usable by id or name wherever a voice is named (speech, sessions).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Body, Depends, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection

from csm_voice_api.api.deps import get_engine, get_limits, get_settings
from csm_voice_api.api.models import CONTENT_TYPES, ResponseFormat
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.api.voice_resolver import BUILTIN_VOICES, CUSTOM, VoiceContext, resolve_named_voice
from csm_voice_api.audio.encode import wav_header
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import SAMPLE_RATE, Sampling, VoicePrompt
from csm_voice_api.errors import InputTooLong, InvalidInput

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine
    from csm_voice_api.voices.service import NewVoice, VoiceService
    from csm_voice_api.voices.store import Voice

router = APIRouter()

PREVIEW_TEXT = "Hello! This is a short preview of my voice. I hope you like how it sounds."


def open_voice_service(settings: Settings, engine: AsyncEngine) -> VoiceService:
    """The app's voice library over settings.voices_dir (blocking: opening recovers the store)."""
    from csm_voice_api.voices.service import VoiceService

    return VoiceService.open(settings.voices_dir, engine, builtin_seed=settings.builtin_voice_seed,
                             builtin_ms=settings.builtin_voice_ms, reserved_names=(*BUILTIN_VOICES, CUSTOM))  # fmt: skip


def get_voices(conn: HTTPConnection) -> VoiceService:
    return conn.app.state.voices


# ---- bodies ------------------------------------------------------------------------------------
class VoiceOut(BaseModel):
    object: Literal["voice"] = "voice"
    id: str
    voice_id: str  # the same as id, under the name voice-cloning clients read
    name: str
    description: str
    transcript: str
    created_at: int
    duration_seconds: float
    builtin: bool
    transcript_missing: bool  # no transcript was given: the voice works, cloning is looser
    warnings: list[str] = Field(default_factory=list)  # on creation: trimmed clip, missing transcript

    @classmethod
    def of(cls, voice: Voice, warnings: tuple[str, ...] = ()) -> VoiceOut:
        return cls(id=voice.id, voice_id=voice.id, name=voice.name, description=voice.description,
                   transcript=voice.transcript, created_at=voice.created_at,
                   duration_seconds=round(voice.duration_s, 3), builtin=voice.builtin,
                   transcript_missing=not voice.transcript, warnings=list(warnings))  # fmt: skip


class VoiceListOut(BaseModel):
    object: Literal["list"] = "list"
    voices: list[VoiceOut]


class VoiceDeleted(BaseModel):
    object: Literal["voice.deleted"] = "voice.deleted"
    id: str
    voice_id: str
    deleted: bool = True


class OpenAIVoice(BaseModel):
    """OpenAI's custom voice object, plus what we could tell about its reference."""

    object: Literal["audio.voice"] = "audio.voice"
    id: str
    name: str
    created_at: int
    type: Literal["audio_sample"] = "audio_sample"
    transcript_missing: bool
    warnings: list[str] = Field(default_factory=list)


class SpeakRequest(BaseModel):
    """What to say and how; the fields every voice-cloning audio route takes."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0.0, le=5.0)
    topk: int | None = Field(None, ge=1, le=2051)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_audio_length_ms: int | None = Field(None, ge=80)
    response_format: ResponseFormat = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)


class GenerateRequest(SpeakRequest):
    voice_id: str = Field(min_length=1)  # a stored voice's id or name, or a built-in voice
    text: str


class PreviewRequest(SpeakRequest):
    text: str = PREVIEW_TEXT


# ---- routes ------------------------------------------------------------------------------------
@router.post("/v1/voice-cloning/clone")
async def clone_voice(
    name: str = Form(...),
    audio_file: UploadFile = File(...),
    transcript: str = Form(""),
    description: str = Form(""),
    voices: VoiceService = Depends(get_voices),
    limits: Limits = Depends(get_limits),
) -> VoiceOut:
    new = await _create(voices, limits, name, audio_file, "audio_file", transcript, description)
    return VoiceOut.of(new.voice, new.warnings)


@router.get("/v1/voice-cloning/voices")
async def list_cloned_voices(voices: VoiceService = Depends(get_voices)) -> VoiceListOut:
    stored = await asyncio.to_thread(voices.user_voices)
    return VoiceListOut(voices=[VoiceOut.of(v) for v in stored])


@router.get("/v1/voice-cloning/voices/{voice_id}")
async def get_cloned_voice(voice_id: str, voices: VoiceService = Depends(get_voices)) -> VoiceOut:
    return VoiceOut.of(await voices.find(voice_id, param="voice_id"))


@router.delete("/v1/voice-cloning/voices/{voice_id}")
async def delete_cloned_voice(voice_id: str, voices: VoiceService = Depends(get_voices)) -> VoiceDeleted:
    voice = await voices.delete(voice_id, param="voice_id")
    return VoiceDeleted(id=voice.id, voice_id=voice.id)


@router.post("/v1/voice-cloning/generate", response_model=None)
async def generate_with_voice(
    body: GenerateRequest,
    conn: HTTPConnection,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    text = checked_text(body.text, limits, "text")
    voice = await resolve_named_voice(body.voice_id, VoiceContext(engine, limits, conn.app.state.voices),
                                      param="voice_id")  # fmt: skip
    return await speak(engine, voice, text, body, settings, limits)


@router.post("/v1/voice-cloning/voices/{voice_id}/preview", response_model=None)
async def preview_voice(
    voice_id: str,
    conn: HTTPConnection,
    body: PreviewRequest | None = Body(None),
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    body = body or PreviewRequest()
    text = checked_text(body.text, limits, "text")
    voice = await resolve_named_voice(voice_id, VoiceContext(engine, limits, conn.app.state.voices),
                                      param="voice_id")  # fmt: skip
    return await speak(engine, voice, text, body, settings, limits)


@router.post("/v1/audio/voices")
async def create_openai_voice(
    name: str = Form(...),
    audio_sample: UploadFile = File(...),
    transcript: str = Form(""),  # extension: the words spoken in audio_sample
    consent: str | None = Form(None),  # OpenAI's consent recording id: accepted, not checked
    type: str = Form("audio_sample"),
    voices: VoiceService = Depends(get_voices),
    limits: Limits = Depends(get_limits),
) -> OpenAIVoice:
    if type != "audio_sample":
        raise InvalidInput("Only type='audio_sample' voices can be created here (CSM clones from audio).",
                           param="type")  # fmt: skip
    new = await _create(voices, limits, name, audio_sample, "audio_sample", transcript, "")
    v = new.voice
    return OpenAIVoice(id=v.id, name=v.name, created_at=v.created_at, transcript_missing=new.transcript_missing,
                       warnings=list(new.warnings))  # fmt: skip


class OpenAIVoiceDeleted(BaseModel):
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    id: str
    deleted: bool = True


@router.delete("/v1/audio/voices/{voice_id}")
async def delete_openai_voice(voice_id: str, voices: VoiceService = Depends(get_voices)) -> OpenAIVoiceDeleted:
    voice = await voices.delete(voice_id, param="voice_id")
    return OpenAIVoiceDeleted(id=voice.id)


# ---- helpers -----------------------------------------------------------------------------------
async def _create(voices: VoiceService, limits: Limits, name: str, upload: UploadFile, param: str,
                  transcript: str, description: str) -> NewVoice:  # fmt: skip
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise InputTooLong(f"{param} is larger than {limits.max_upload_bytes} bytes (CSM_MAX_UPLOAD_BYTES).",
                           param=param)  # fmt: skip
    return await voices.create_from_file(name, data, max_seconds=limits.max_reference_seconds,
                                         transcript=transcript, description=description, param=param)  # fmt: skip


def checked_text(text: str, limits: Limits, param: str) -> str:
    """`text` stripped; InvalidInput when empty, InputTooLong past CSM_MAX_TEXT_CHARS."""
    text = text.strip()
    if not text:
        raise InvalidInput(f"{param} is empty: send the text to speak.", param=param)
    if len(text) > limits.max_text_chars:
        raise InputTooLong(f"{param} is {len(text)} characters; the limit is {limits.max_text_chars}.", param=param)
    return text


async def speak(engine: AsyncEngine, voice: VoicePrompt, text: str, body: SpeakRequest, settings: Settings,
                limits: Limits) -> Response:  # fmt: skip
    """The whole audio file of `text` spoken with `voice`, in body.response_format."""
    max_ms = limits.max_output_ms if body.max_audio_length_ms is None else body.max_audio_length_ms
    if max_ms > limits.max_output_ms:
        raise InputTooLong(f"max_audio_length_ms may be at most {limits.max_output_ms} (CSM_MAX_OUTPUT_MS).",
                           param="max_audio_length_ms")  # fmt: skip
    sampling = Sampling(
        temperature=settings.temperature if body.temperature is None else body.temperature,
        topk=settings.topk if body.topk is None else body.topk,
        seed=body.seed,
        max_audio_ms=max_ms,
    )
    job = SpeechJob(engine, voice, split_text(text), sampling=sampling, fmt=body.response_format, speed=body.speed,
                    chunk_frames=settings.chunk_frames)  # fmt: skip
    async with aclosing(job.run()) as chunks:
        data = b"".join([b async for b in chunks])
    if body.response_format == "wav":  # the whole length is known now: exact header sizes
        data = wav_header(SAMPLE_RATE, (len(data) - 44) // 2) + data[44:]
    headers = {
        "X-Audio-Frames": str(job.frames),
        "X-Stop-Reason": job.stop_reason or "",
    }
    return Response(data, media_type=CONTENT_TYPES[body.response_format], headers=headers)
