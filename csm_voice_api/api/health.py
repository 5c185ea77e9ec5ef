"""Liveness, readiness and Prometheus metrics. Never behind auth: orchestrators probe these."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State

from csm_voice_api.api import metrics
from csm_voice_api.api.errors import error_response

router = APIRouter()


# /health round-trips a no-op through the engine thread: a loop that is wedged (not just dead)
# fails liveness too. Generous, since one step of a big batch may be in progress.
PING_TIMEOUT_S = 5.0


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None:
        return error_response("The engine is still loading.", status=503, code="loading")
    alive = engine.healthy and await _ping(engine)
    admission = getattr(state, "admission", None)
    body = {
        "status": "ok" if alive else "dead",
        "model": engine.model_name,
        "is_demo": engine.is_demo,
        "demo_reason": engine.demo_reason,
        "device": str(engine.device),
        "watermark": _watermark(state),
        "stats": engine.stats(),
        "admission": admission.stats() if admission is not None else None,
    }
    return JSONResponse(body, status_code=200 if alive else 503)


async def _ping(engine) -> bool:  # noqa: ANN001 - AsyncEngine; api/ stays torch-free at import
    ping = getattr(engine, "ping", None)
    if ping is None:
        return True
    try:
        await asyncio.wait_for(ping(), PING_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any failure to answer is a failed liveness probe
        return False
    return True


def _watermark(state: State) -> dict:
    # enabled: asked for by settings (CSM_WATERMARK); applied: every response is being marked.
    applied = getattr(state, "watermark", None)
    return {
        "enabled": state.settings.watermark,
        "applied": applied is not None,
        "key": None if applied is None else applied.watermarker.key_kind,  # "public" | "private"
    }


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    admission = getattr(request.app.state, "admission", None)
    if admission is not None and admission.draining:
        return error_response("Not ready: the server is shutting down.", status=503, code="shutting_down")
    if engine is None or not engine.healthy:
        return error_response("Not ready: the engine is loading or has stopped.", status=503, code="not_ready")
    warmup = getattr(request.app.state, "warmup", None)
    if warmup is not None and not warmup.done:
        return error_response("Not ready: warming up (one short generation through the output path).",
                              status=503, code="warming_up")
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
