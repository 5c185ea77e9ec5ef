"""Session routes: POST/GET/DELETE /v1/streaming-session and POST /v1/stream-text.

The router's lifespan puts the one SessionManager on app.state.sessions (after the app's own
lifespan has started the engine) and closes every session at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict
from starlette.requests import HTTPConnection

from csm_voice_api.api import metrics
from csm_voice_api.api.streaming import respond_stream
from csm_voice_api.api.audio_out import response_watermark, watermarked
from csm_voice_api.api.deps import get_engine, get_limits, get_settings
from csm_voice_api.api.speech_job import turn_cap_ms
from csm_voice_api.api.voice_resolver import VoiceContext, resolve_named_voice
from csm_voice_api.audio.encode import WavEncoder
from csm_voice_api.config import Limits, Settings
from csm_voice_api.engine.types import Sampling, VoicePrompt
from csm_voice_api.errors import InputTooLong, InvalidInput
from csm_voice_api.sessions.manager import (
    DEFAULT_SPEAKER_ID,
    Session,
    SessionManager,
    VoiceResolver,
    clone_prompt,
    model_speaker,
)

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if getattr(app.state, "sessions", None) is not None:  # wired elsewhere already
        yield
        return
    settings: Settings = app.state.settings
    manager = SessionManager(app.state.engine, settings.session_config(), voice_resolver=app_voice_resolver(app))
    app.state.sessions = manager
    await manager.start()
    try:
        yield
    finally:
        await manager.shutdown()
        app.state.sessions = None


router = APIRouter(lifespan=lifespan)


def get_sessions(conn: HTTPConnection) -> SessionManager:
    return conn.app.state.sessions


def app_voice_resolver(app: FastAPI) -> VoiceResolver:
    """voice_id -> prompt: OpenAI's built-in voice names, then the voice library when present."""

    async def resolve(voice_id: str) -> VoicePrompt:
        ctx = VoiceContext(app.state.engine, app.state.limits, getattr(app.state, "voices", None))
        return await resolve_named_voice(voice_id, ctx, param="voice_id")

    return resolve


async def reference_prompt(
    engine: AsyncEngine, limits: Limits, upload: UploadFile, context_text: str, speaker_id: int
) -> VoicePrompt:
    """The VoicePrompt of an uploaded reference clip (any common audio format)."""
    speaker = model_speaker(speaker_id)
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise InputTooLong(
            f"audio_file is larger than {limits.max_upload_bytes} bytes (CSM_MAX_UPLOAD_BYTES).", param="audio_file"
        )
    if not data:
        raise InvalidInput("audio_file is empty: upload a reference clip of the voice.", param="audio_file")
    return await clone_prompt(engine, data, context_text, speaker, max_seconds=limits.max_reference_seconds)


class SessionOpened(BaseModel):
    session_id: str
    message: str


@router.post("/v1/streaming-session")
async def open_session(
    audio_file: UploadFile | None = File(None),
    voice_id: str | None = Form(None),
    context_text: str = Form(""),
    speaker_id: int = Form(DEFAULT_SPEAKER_ID, description="999 (default): the cloned voice, model speaker 0; or 0-9"),
    temperature: float = Form(0.6, ge=0.0, le=5.0),
    topk: int = Form(20, ge=1, le=2051),
    output_format: Literal["wav", "pcm", "mp3", "opus"] = Form("wav"),
    max_audio_length_ms: int | None = Form(None, ge=80),  # per phrase; extension
    seed: int | None = Form(None, ge=0, le=2**31),  # extension: phrase i uses seed + i
    engine: AsyncEngine = Depends(get_engine),
    limits: Limits = Depends(get_limits),
    sessions: SessionManager = Depends(get_sessions),
) -> SessionOpened:
    phrase_ms = sessions.config.phrase_max_ms if max_audio_length_ms is None else max_audio_length_ms
    if phrase_ms > limits.max_output_ms:
        raise InputTooLong(f"max_audio_length_ms may be at most {limits.max_output_ms}.", param="max_audio_length_ms")
    sampling = Sampling(temperature=temperature, topk=topk, seed=seed, max_audio_ms=phrase_ms)
    voice = None
    if audio_file is not None and audio_file.filename:
        voice = await reference_prompt(engine, limits, audio_file, context_text, speaker_id)
    session = await sessions.open(voice=voice, voice_id=voice_id, sampling=sampling, output_format=output_format)
    return SessionOpened(
        session_id=session.id,
        message=f"Session opened. Stream text to /v1/ws/stream-text/{session.id} "
        f"(audio as {output_format}) or POST /v1/stream-text.",
    )


@router.get("/v1/streaming-session/{session_id}")
async def describe_session(session_id: str, sessions: SessionManager = Depends(get_sessions)) -> dict:
    return sessions.get(session_id).describe()


@router.delete("/v1/streaming-session/{session_id}")
async def close_session(session_id: str, sessions: SessionManager = Depends(get_sessions)) -> SessionOpened:
    sessions.close(session_id)
    return SessionOpened(session_id=session_id, message="Session closed.")


class StreamTextRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_id: str
    text_chunk: str = ""
    is_final: bool = False


@router.post("/v1/stream-text", response_model=None)
async def stream_text(
    body: StreamTextRequest,
    sessions: SessionManager = Depends(get_sessions),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
) -> Response:
    if len(body.text_chunk) > limits.max_text_chars:
        raise InputTooLong(f"text_chunk is over {limits.max_text_chars} characters.", param="text_chunk")
    session = sessions.get(body.session_id)
    if session.websocket:
        raise InvalidInput("This session is in use by a WebSocket; send its text there.", param="session_id")
    chunks = _speak_chunk(sessions, session, body, settings.chunk_frames)
    return await respond_stream(chunks, "audio/wav")


async def _speak_chunk(
    sessions: SessionManager, session: Session, body: StreamTextRequest, chunk_frames: int
) -> AsyncIterator[bytes]:
    """WAV of the phrases `body` completes (all that is left when final), spoken in order."""
    encoder = metrics.TimedEncoder(WavEncoder())
    async with session.lock:
        session.attached += 1
        try:
            phrases = session.segmenter.push(body.text_chunk, final=body.is_final)
            pcms = _phrases_pcm(sessions, session, phrases, chunk_frames)
            async with aclosing(watermarked(pcms, response_watermark())) as audio:
                async for pcm in audio:
                    yield encoder.write(pcm)
            yield encoder.flush()  # the header alone when no phrase was complete: an empty WAV
        finally:
            session.attached -= 1
            sessions.touch(session)


async def _phrases_pcm(
    sessions: SessionManager, session: Session, phrases: list[str], chunk_frames: int
) -> AsyncIterator[np.ndarray]:
    for phrase in phrases:
        session.next_segment()
        gen = sessions.speak(session, phrase, chunk_frames=chunk_frames, max_audio_ms=turn_cap_ms(phrase))
        async with aclosing(metrics.engine_timed(gen)) as audio:
            async for chunk in audio:
                if chunk.frames:
                    yield chunk.pcm


