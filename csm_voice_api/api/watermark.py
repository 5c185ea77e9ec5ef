"""The SilentCipher watermark's wiring: loaded at startup, checked by POST /v1/watermark/verify.

The router's lifespan (after the app's, so the engine is up) puts the watermark every response
gets on app.state.watermark (None only with CSM_WATERMARK=false), with the worker threads that
apply it, and the watermarker verify uses on app.state.watermark_verifier (loaded on first use
when watermarking is off).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, FastAPI, File, UploadFile
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from csm_voice_api.api import metrics
from csm_voice_api.api.audio_out import ResponseWatermark, WatermarkWorkers, set_app_watermark
from csm_voice_api.api.deps import get_limits
from csm_voice_api.config import Limits, Settings
from csm_voice_api.errors import InputTooLong, InvalidInput

if TYPE_CHECKING:
    from csm_voice_api.audio.watermark import Watermarker


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.watermark = None
    app.state.watermark_verifier = None
    app.state.watermark_loading = asyncio.Lock()
    workers = encoder = None
    if settings.watermark:
        from csm_voice_api.audio.watermark_batch import BatchEncoder

        wm = await _load(app)
        workers = WatermarkWorkers(settings.watermark_workers)
        encoder = BatchEncoder(wm)
        app.state.watermark = ResponseWatermark(wm, settings.watermark_stream_chunk_s(), workers,
                                                settings.watermark_stream_growth, encoder)
        app.state.watermark_verifier = wm
    set_app_watermark(app.state.watermark)
    metrics.bind_watermark(encoder)
    try:
        yield
    finally:
        set_app_watermark(None)
        metrics.bind_watermark(None)
        if workers is not None:
            workers.shutdown()
        if encoder is not None:
            await asyncio.to_thread(encoder.close)


router = APIRouter(lifespan=lifespan)


class WatermarkVerification(BaseModel):
    watermarked: bool  # the key's watermark, or a confident message of another key
    key_matches: bool  # the decoded message is this server's key: proof of origin
    confidence: float | None  # agreement of the message's repetitions, 0..1; None: nothing decoded
    key: Literal["public", "private"]  # which key this server checks for


@router.post("/v1/watermark/verify")
async def verify_watermark(
    conn: HTTPConnection,
    audio_file: UploadFile = File(..., description="audio to check (wav, mp3, flac, ogg/opus, ...)"),
    limits: Limits = Depends(get_limits),
) -> WatermarkVerification:
    from csm_voice_api.audio.watermark import search_bounds, verify_file

    data = await audio_file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise InputTooLong(f"audio_file is larger than {limits.max_upload_bytes} bytes.", param="audio_file")
    if not data:
        raise InvalidInput("audio_file is empty: upload the audio to check.", param="audio_file")
    wm = await verifier(conn.app)
    search_s, step = search_bounds(wm.model.device)
    result = await asyncio.to_thread(verify_file, io.BytesIO(data), wm, phase_search_s=search_s, phase_step=step)
    return WatermarkVerification(watermarked=result.watermarked, key_matches=result.key_matches,
                                 confidence=result.confidence, key=wm.key_kind)  # fmt: skip


async def verifier(app: FastAPI) -> Watermarker:
    """The watermarker verify uses: the applied one, else one loaded now (CSM_WATERMARK=false)."""
    async with app.state.watermark_loading:
        if app.state.watermark_verifier is None:
            app.state.watermark_verifier = await _load(app)
    return app.state.watermark_verifier


async def _load(app: FastAPI) -> Watermarker:
    # Building or reading the networks takes a while: off the event loop.
    return await asyncio.to_thread(watermarker_for, app.state.settings, app.state.engine)


def watermarker_for(settings: Settings, engine) -> Watermarker:
    """The watermarker the server (and `csm-voice-api say`) marks this engine's audio with."""
    from csm_voice_api.audio.watermark import load_watermarker
    from csm_voice_api.engine.demo import RANDOM_FULL

    # The full-size random model (benchmarks) gets full-size random watermark networks: its cost is real.
    demo = "full-random" if engine.model_name == RANDOM_FULL else engine.is_demo
    return load_watermarker(settings.watermark_key, str(engine.device), demo=demo,
                            weights_dir=settings.watermark_weights)
