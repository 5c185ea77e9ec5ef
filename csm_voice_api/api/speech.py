"""OpenAI-compatible speech: POST /v1/audio/speech and the listing routes clients probe first."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from csm_voice_api.api import metrics
from csm_voice_api.api.streaming import respond_stream
from csm_voice_api.api.deps import get_engine, get_limits, get_settings
from csm_voice_api.api.errors import error_body, status_of
from csm_voice_api.api.models import (
    CONTENT_TYPES,
    RESPONSE_FORMATS,
    AudioDelta,
    AudioDone,
    ModelCard,
    ModelList,
    SpeechRequest,
    Usage,
    VoiceCard,
    VoiceList,
)
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.api.voice_resolver import VoiceContext, builtin_voices, resolve_voice
from csm_voice_api.config import Limits, Settings
from csm_voice_api.audio.encode import wav_header
from csm_voice_api.engine.types import SAMPLE_RATE, Sampling
from csm_voice_api.errors import CsmError, EngineDead, InputTooLong, InvalidInput

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

log = logging.getLogger(__name__)
router = APIRouter()

# Names clients may send as `model`: all mean the one loaded model.
MODEL_ALIASES = ("csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@router.post("/v1/audio/speech", response_model=None)
async def create_speech(
    body: SpeechRequest,
    request: Request,
    engine: AsyncEngine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    started = time.perf_counter()
    text = _checked_input(body.input, limits)
    voice = await resolve_voice(body, VoiceContext(engine, limits, getattr(request.app.state, "voices", None)))
    job = SpeechJob(
        engine,
        voice,
        split_text(text),
        sampling=_sampling(body, settings, limits),
        fmt=body.response_format,
        speed=body.speed,
        chunk_frames=settings.chunk_frames,
        started=started,
    )
    metrics.REQUESTS.labels(route="speech").inc()
    if body.stream_format == "sse":
        return await respond_stream(_sse(job), "text/event-stream")
    if not body.stream:
        async with aclosing(job.run()) as chunks:
            data = b"".join([b async for b in chunks])
        if body.response_format == "wav":  # the whole length is known now: exact header sizes
            data = wav_header(SAMPLE_RATE, (len(data) - 44) // 2) + data[44:]
        headers = {"X-Audio-Frames": str(job.frames), "X-Stop-Reason": job.stop_reason or ""}
        return Response(data, media_type=CONTENT_TYPES[body.response_format], headers=headers)
    return await respond_stream(job.run(), CONTENT_TYPES[body.response_format])


def _checked_input(text: str, limits: Limits) -> str:
    if not text.strip():
        raise InvalidInput("input is empty: send the text to speak.", param="input")
    if len(text) > limits.max_text_chars:
        raise InputTooLong(
            f"input is {len(text)} characters; the limit is {limits.max_text_chars}. Split it into several requests.",
            param="input",
        )
    return text.strip()


def _sampling(body: SpeechRequest, settings: Settings, limits: Limits) -> Sampling:
    max_ms = limits.max_output_ms if body.max_audio_length_ms is None else body.max_audio_length_ms
    if max_ms > limits.max_output_ms:
        raise InputTooLong(
            f"max_audio_length_ms may be at most {limits.max_output_ms} (CSM_MAX_OUTPUT_MS).",
            param="max_audio_length_ms",
        )
    return Sampling(
        temperature=settings.temperature if body.temperature is None else body.temperature,
        topk=settings.topk if body.topk is None else body.topk,
        top_p=settings.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        max_audio_ms=max_ms,
        repetition_penalty=settings.repetition_penalty,  # a server default (serve --repetition_penalty)
    )


async def _sse(job: SpeechJob) -> AsyncIterator[bytes]:
    sent = False
    try:
        async with aclosing(job.run()) as chunks:
            async for b in chunks:
                sent = True
                yield _event(AudioDelta(audio=base64.b64encode(b).decode()).model_dump())
    except (CsmError, EngineDead) as e:
        # Headers are gone once the first event is out: report the failure in-band.
        if not sent:
            raise
        status = status_of(e) if isinstance(e, CsmError) else 503
        yield _event({"type": "error", **error_body(str(e), status=status, code=getattr(e, "code", "engine_dead"))})
        return
    usage = Usage(input_tokens=job.input_tokens, output_tokens=job.frames, total_tokens=job.input_tokens + job.frames)
    yield _event(AudioDone(usage=usage).model_dump())


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@router.get("/v1/models")
async def list_models(engine: AsyncEngine = Depends(get_engine)) -> ModelList:
    ids = [engine.model_name, *(a for a in MODEL_ALIASES if a != engine.model_name)]
    return ModelList(data=[ModelCard(id=i) for i in ids])


@router.get("/v1/audio/models")
async def list_audio_models(engine: AsyncEngine = Depends(get_engine)) -> dict:
    ids = [engine.model_name, *(a for a in MODEL_ALIASES if a != engine.model_name)]
    return {"models": [{"id": i, "name": i} for i in ids]}


@router.get("/v1/audio/voices")
async def list_voices(request: Request) -> VoiceList:
    cards = [VoiceCard(id=i, name=n) for i, n in builtin_voices(getattr(request.app.state, "voices", None))]
    return VoiceList(voices=cards, data=cards)


@router.get("/v1/audio/speech/response-formats")
async def list_response_formats() -> dict:
    return {"response_formats": list(RESPONSE_FORMATS), "content_types": CONTENT_TYPES, "default": "mp3"}
