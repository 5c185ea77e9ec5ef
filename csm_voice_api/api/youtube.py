"""POST /v1/audio/speech/voice-cloning/youtube: clone a voice from a stretch of a YouTube video.

yt-dlp is an optional extra (`pip install yt-dlp`), imported on first use; without it the route
answers 501 saying how to install it. The audio is downloaded (bounded in size and time), cut to
[start_time, start_time + duration), peak-normalised and stored in the voice library. The
transcript is optional: without one, faster-whisper transcribes the clip when it is installed
and its model is already on disk; otherwise the voice is stored without a transcript, and the
response says so.
"""

from __future__ import annotations

import asyncio
import importlib.util
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from csm_voice_api.api.deps import get_settings
from csm_voice_api.api.errors import error_response
from csm_voice_api.api.voices import VoiceOut
from csm_voice_api.config import Settings
from csm_voice_api.engine.types import SAMPLE_RATE
from csm_voice_api.errors import InputTooLong, InvalidInput
from csm_voice_api.net.fetch import FetchError

router = APIRouter()

YOUTUBE_HOSTS = frozenset({"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com", "youtu.be"})
INSTALL_HINT = "YouTube cloning needs the optional yt-dlp package: pip install yt-dlp (then restart the server)."
PEAK = 0.9  # normalised clips peak here: loud enough for the codec, with headroom
ASR_MODEL = "base"  # faster-whisper model used when it is already downloaded


class YoutubeCloneRequest(BaseModel):
    youtube_url: str = Field(max_length=2048)
    voice_name: str = Field(min_length=1, max_length=100)
    start_time: float = Field(0.0, ge=0.0, le=6 * 3600)
    duration: float = Field(10.0, gt=0.5)
    description: str = ""
    transcript: str | None = None  # the words spoken in the cut; None tries the ASR hook


class YoutubeVoiceOut(VoiceOut):
    source_url: str
    transcript_source: str  # "request", "asr" or "none"


def _has_yt_dlp() -> bool:
    return importlib.util.find_spec("yt_dlp") is not None


# Listed in the OpenAPI schema only where it can work; without yt-dlp it still answers (501).
@router.post("/v1/audio/speech/voice-cloning/youtube", response_model=None, include_in_schema=_has_yt_dlp())
async def clone_from_youtube(body: YoutubeCloneRequest, conn: HTTPConnection,
                             settings: Settings = Depends(get_settings)) -> YoutubeVoiceOut | JSONResponse:  # fmt: skip
    try:
        importlib.import_module("yt_dlp")  # the optional extra, imported on first use
    except ImportError:
        return error_response(INSTALL_HINT, status=501, code="youtube_unavailable")
    _check_url(body.youtube_url)
    if body.duration > settings.max_reference_seconds:
        raise InputTooLong(f"duration may be at most {settings.max_reference_seconds:g} s (CSM_MAX_REFERENCE_SECONDS).",
                           param="duration")  # fmt: skip
    pcm = await asyncio.wait_for(asyncio.to_thread(download_cut, body, settings), settings.fetch_timeout_s * 6)
    transcript, source = (body.transcript.strip(), "request") if body.transcript else (None, "none")
    if transcript is None:
        transcript = await asyncio.to_thread(transcribe, pcm)
        source = "asr" if transcript else "none"
    new = await conn.app.state.voices.create(body.voice_name, pcm, transcript=transcript or "",
                                             description=body.description)  # fmt: skip
    out = VoiceOut.of(new.voice, new.warnings).model_dump()
    return YoutubeVoiceOut(**out, source_url=body.youtube_url, transcript_source=source)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" or (parts.hostname or "").lower() not in YOUTUBE_HOSTS:
        raise InvalidInput("youtube_url must be an https://www.youtube.com/... or https://youtu.be/... link.",
                           param="youtube_url")  # fmt: skip


def download_cut(body: YoutubeCloneRequest, settings: Settings) -> np.ndarray:
    """The requested stretch of the video's audio: float32 mono 24 kHz, peak-normalised."""
    import yt_dlp

    from csm_voice_api.audio.decode import decode_upload

    with tempfile.TemporaryDirectory(prefix="csm-yt-") as tmp:
        options: dict[str, Any] = {
            "format": "bestaudio[ext=m4a]/bestaudio[ext=webm]/bestaudio",
            "outtmpl": str(Path(tmp) / "audio.%(ext)s"),
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "max_filesize": settings.fetch_max_bytes,
            "socket_timeout": settings.fetch_timeout_s,
        }
        try:
            with yt_dlp.YoutubeDL(options) as ydl:
                ydl.download([body.youtube_url])
        except Exception as e:  # yt-dlp raises its own DownloadError family, and more
            raise FetchError(f"yt-dlp could not fetch the video: {e}", param="youtube_url") from None
        files = sorted(Path(tmp).glob("audio.*"))
        if not files:
            raise FetchError("yt-dlp fetched no audio (over CSM_FETCH_MAX_BYTES?).", param="youtube_url")
        data = files[0].read_bytes()
    end = body.start_time + body.duration
    pcm = decode_upload(data, max_seconds=end, time_limit_s=settings.fetch_timeout_s, trim=True)
    cut = pcm[int(body.start_time * SAMPLE_RATE): int(end * SAMPLE_RATE)]
    if len(cut) < SAMPLE_RATE // 2:
        raise InvalidInput("The video has under half a second of audio after start_time.", param="start_time")
    return normalise(cut)


def normalise(pcm: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(pcm))) if pcm.size else 0.0
    if peak < 1e-4:  # silence stays silence rather than amplified noise
        return pcm.astype(np.float32)
    return (pcm * (PEAK / peak)).astype(np.float32)


def transcribe(pcm: np.ndarray) -> str | None:
    """ASR hook: faster-whisper's transcript when it is installed and its model is on disk, else None."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        return None
    try:
        model = WhisperModel(ASR_MODEL, device="cpu", compute_type="int8", local_files_only=True)
    except Exception:  # the model is not downloaded: never fetch it from a request
        return None
    # faster-whisper takes 16 kHz samples.
    pcm16k = np.interp(np.arange(0, len(pcm), SAMPLE_RATE / 16_000), np.arange(len(pcm)), pcm).astype(np.float32)
    segments, _ = model.transcribe(pcm16k)
    return " ".join(s.text.strip() for s in segments).strip() or None
