"""Start-up warm-up: one short utterance through the whole output path before /ready says ready.

The first use of each piece of the output path costs more than the ones after it: the first
frames of the codec and of an encoder, each watermark worker's silentcipher state (on CUDA its
stream and library handles), a built-in voice's reference. The router's lifespan, the last to run,
starts the warm-up in the background: /health answers meanwhile, /ready answers 503 (warming_up)
until it is over. A failed warm-up is logged and the server serves anyway (CSM_WARMUP=false skips
it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, replace

import numpy as np
from fastapi import APIRouter, FastAPI

from csm_voice_api.api.audio_out import ResponseWatermark
from csm_voice_api.api.playout import RECENT
from csm_voice_api.api.speech_job import SpeechJob
from csm_voice_api.api.voice_resolver import VoiceContext, resolve_named_voice
from csm_voice_api.config import Settings
from csm_voice_api.engine.types import SAMPLE_RATE

log = logging.getLogger(__name__)

WARMUP_VOICE = "alloy"  # the voice most clients name first: its reference is made now
WARMUP_TEXT = "Hello, and welcome."
WARMUP_MS = 640  # a few chunks: every step runs more than once
WARMUP_FORMAT = "mp3"  # through PyAV, the encoder with the most to load


@dataclass
class Warmup:
    """Where the warm-up stands (app.state.warmup; None when CSM_WARMUP=false)."""

    done: bool = False
    seconds: float | None = None
    error: str | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if not settings.warmup:
        app.state.warmup = None
        yield
        return
    state = app.state.warmup = Warmup()
    task = asyncio.create_task(_run(app, state), name="warmup")
    try:
        yield
    finally:
        task.cancel()
        with suppress(BaseException):
            await task


# No routes: the lifespan is the point (/ready reads app.state.warmup).
router = APIRouter(lifespan=lifespan)


async def _run(app: FastAPI, state: Warmup) -> None:
    started = time.perf_counter()
    try:
        await warm_up(app)
    except Exception as e:  # noqa: BLE001 - the warm-up only saves first requests time
        state.error = f"{type(e).__name__}: {e}"
        log.warning("warm-up failed after %.2f s, serving anyway: %s", time.perf_counter() - started, state.error)
    else:
        log.info("warm-up done in %.2f s (engine, codec, watermark, %s encoder)", time.perf_counter() - started,
                 WARMUP_FORMAT)
    finally:
        state.seconds = time.perf_counter() - started
        state.done = True


async def warm_up(app: FastAPI) -> None:
    """Speaks WARMUP_TEXT as WARMUP_VOICE into a discarded WARMUP_FORMAT stream, watermarked like
    any response, after marking one piece (the watermark networks' first call is the slow one)."""
    settings: Settings = app.state.settings
    engine = app.state.engine
    watermark: ResponseWatermark | None = getattr(app.state, "watermark", None)
    if watermark is not None and watermark.workers is not None:
        piece = _noise(watermark.chunk_s)
        await watermark.workers.run(lambda: watermark.apply(piece))
    ctx = VoiceContext(engine, app.state.limits, getattr(app.state, "voices", None))
    voice = await resolve_named_voice(WARMUP_VOICE, ctx)
    sampling = replace(settings.sampling(), max_audio_ms=WARMUP_MS, seed=0)
    job = SpeechJob(engine, voice, [WARMUP_TEXT], sampling=sampling, fmt=WARMUP_FORMAT,
                    chunk_frames=settings.chunk_frames, route="warmup",
                    watermark=None if watermark is None else watermark.stream())  # fmt: skip
    try:
        async with aclosing(job.run()) as chunks:
            async for _ in chunks:
                pass
    finally:
        # Its gaps are first-use costs nobody heard: they must not hold back the first requests.
        RECENT.clear()


def _noise(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.05 * rng.standard_normal(max(1, round(seconds * SAMPLE_RATE)))).astype(np.float32)
