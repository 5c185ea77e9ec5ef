"""Liveness, readiness and Prometheus metrics. Never behind auth: orchestrators probe these."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csm_voice_api.api import metrics
from csm_voice_api.api.errors import error_response

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    engine = getattr(state, "engine", None)
    if engine is None:
        return error_response("The engine is still loading.", status=503, code="loading")
    body = {
        "status": "ok" if engine.healthy else "dead",
        "model": engine.model_name,
        "is_demo": engine.is_demo,
        "demo_reason": engine.demo_reason,
        "device": str(engine.device),
        # Requested by settings vs actually applied (the watermarker is wired onto app.state later).
        "watermark": {
            "enabled": state.settings.watermark,
            "applied": getattr(state, "watermarker", None) is not None,
        },
        "stats": engine.stats(),
    }
    return JSONResponse(body, status_code=200 if engine.healthy else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.healthy:
        return error_response("Not ready: the engine is loading or has stopped.", status=503, code="not_ready")
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
