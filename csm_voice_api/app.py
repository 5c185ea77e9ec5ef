"""build_app: the one place that constructs the engine and wires shared objects onto app.state."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from csm_voice_api.api import errors, forms, metrics, security
from csm_voice_api.api.admission import (
    DEFAULT_GPU_STALL_LIMIT_MS,
    DEFAULT_GPU_STEP_LIMIT_MS,
    Admission,
    AdmissionMiddleware,
    RealtimeLimit,
)
from csm_voice_api.api.audio_files import OutputStore
from csm_voice_api.api.audio_out import WatermarkScope
from csm_voice_api.api.voices import open_voice_service
from csm_voice_api.config import Settings

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

log = logging.getLogger(__name__)

# ROUTERS: each entry is a module exposing `router`. Adding a feature's routes is one line here.
# Order matters where paths overlap: /v1/audio/voices must come before /v1/audio/{filename}.
PUBLIC_ROUTERS = (
    "csm_voice_api.api.health",  # /health /ready /metrics (no auth)
    "csm_voice_api.api.web",  # /voice-cloning web UI, static (its /v1 calls carry the key)
)
# Every path needs a key when CSM_API_KEYS is set, except security.PUBLIC_PATHS (health, the model
# and voice lists, docs, the web UI page); auth runs in SecurityMiddleware, before routing.
API_ROUTERS = (
    "csm_voice_api.api.security",  # /v1/ws-ticket
    "csm_voice_api.api.speech",  # /v1/audio/speech, /v1/models, /v1/audio/voices ...
    "csm_voice_api.api.sessions",  # /v1/streaming-session, /v1/stream-text (+ app.state.sessions)
    "csm_voice_api.api.ws",  # WS /v1/ws/stream-text/{session_id}
    "csm_voice_api.api.watermark",  # /v1/watermark/verify (+ app.state.watermark, loaded at startup)
    "csm_voice_api.api.clone",  # /v1/voice-clone
    "csm_voice_api.api.voices",  # /v1/voice-cloning/*, POST /v1/audio/voices
    "csm_voice_api.api.conversation",  # /api/v1/audio/conversation
    "csm_voice_api.api.compat",  # /generate_audio, /generate (other CSM servers' routes)
    "csm_voice_api.api.scenes",  # /v1/scene (multi-speaker dialogue into a stored file)
    "csm_voice_api.api.queue",  # /v1/queue/{route}/... (durable jobs; worker started by its lifespan)
    "csm_voice_api.api.youtube",  # /v1/audio/speech/voice-cloning/youtube (yt-dlp, optional)
    "csm_voice_api.api.audio_files",  # /v1/audio/{filename}: keep last (catch-all under /v1/audio)
    "csm_voice_api.api.warmup",  # no routes; its lifespan runs after every other: keep it after them
)
# ---------------------------------------------------------------------------------------------


def build_app(
    settings: Settings | None = None,
    engine: AsyncEngine | None = None,
    *,
    on_engine: Callable[[AsyncEngine], None] | None = None,
) -> FastAPI:
    """The ASGI app. Loads and owns an engine from `settings` unless one (already started) is given.

    `on_engine` is called once the engine is up (the CLI prints its demo-model banner there).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        eng = engine if engine is not None else await _start_engine(settings)
        app.state.engine = eng
        app.state.outputs = OutputStore(settings.outputs_dir, settings.retention())
        metrics.bind_engine(eng)
        metrics.bind_app_state(app.state.admission, lambda: getattr(app.state, "sessions", None))
        if on_engine is not None:
            on_engine(eng)
        # Sessions and the voice store are wired here too (app.state.sessions / app.state.voices).
        # Opening the voice store recovers it (reads its files): off the event loop.
        app.state.voices = await asyncio.to_thread(open_voice_service, settings, eng)
        try:
            yield
        finally:
            app.state.voices.close()
            metrics.bind_engine(None)
            metrics.bind_app_state(None, None)
            if owned:
                await eng.shutdown()

    app = FastAPI(title="csm-voice-api", version=_version(), lifespan=lifespan)
    app.state.settings = settings
    app.state.limits = settings.limits()
    app.state.security = security.build_policy(settings)
    app.state.admission = Admission(lambda: settings.max_inflight or _slots(app), settings.send_timeout_s,
                                    RealtimeLimit(lambda: _engine_stats(app), lambda: _step_limit_ms(app, settings),
                                                  lambda: _stall_limit_ms(app, settings)))
    errors.install(app)
    for name in (*PUBLIC_ROUTERS, *API_ROUTERS):
        app.include_router(importlib.import_module(name).router)
    # Outermost last: CORS (answers preflights) -> auth/rate limits -> admission -> body limit -> form limits -> routes.
    app.add_middleware(WatermarkScope)  # the app's watermark is every request's default
    app.add_middleware(forms.FormLimit)  # multipart limits (Starlette's defaults: 1000 files and fields)
    app.add_middleware(errors.BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission)
    app.add_middleware(security.SecurityMiddleware, policy=app.state.security)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Audio-Frames", "X-Stop-Reason"],
        )
    return app


def _slots(app: FastAPI) -> int:
    return int(_engine_stats(app).get("slots", 1))


def _engine_stats(app: FastAPI) -> dict:
    engine = getattr(app.state, "engine", None)
    return engine.stats() if engine is not None else {}


def _step_limit_ms(app: FastAPI, settings: Settings) -> float:
    return _on_gpu_default(app, settings.realtime_step_ms, DEFAULT_GPU_STEP_LIMIT_MS)


def _stall_limit_ms(app: FastAPI, settings: Settings) -> float:
    return _on_gpu_default(app, settings.realtime_stall_ms, DEFAULT_GPU_STALL_LIMIT_MS)


def _on_gpu_default(app: FastAPI, value: float | None, gpu_default: float) -> float:
    """A real-time limit: as set, else `gpu_default` when the engine runs on a GPU and off (0) on CPU."""
    if value is not None:
        return value
    engine = getattr(app.state, "engine", None)
    on_gpu = engine is not None and getattr(engine.device, "type", "cpu") == "cuda"
    return gpu_default if on_gpu else 0.0


async def _start_engine(settings: Settings) -> AsyncEngine:
    from csm_voice_api.engine.engine import AsyncEngine

    # Loading reads gigabytes and builds the model: keep the event loop free meanwhile.
    eng = await asyncio.to_thread(AsyncEngine.load, settings.engine_config())
    await eng.start()
    log.info("engine ready: model=%s device=%s demo=%s", eng.model_name, eng.device, eng.is_demo)
    return eng


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("csm-voice-api")
    except PackageNotFoundError:
        return "0.0.0"
