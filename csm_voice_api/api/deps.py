"""Small FastAPI dependencies: the shared objects the app's lifespan put on app.state, and auth."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from csm_voice_api.config import Limits, Settings
from csm_voice_api.errors import EngineDead

if TYPE_CHECKING:
    from csm_voice_api.api.audio_files import OutputStore
    from csm_voice_api.engine.engine import AsyncEngine


def get_engine(conn: HTTPConnection) -> AsyncEngine:
    """The one engine; refuses new work once it has died (the route then answers 503)."""
    engine: AsyncEngine = conn.app.state.engine
    if not engine.healthy:
        raise EngineDead("the engine loop failed")
    return engine


def get_settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


def get_limits(conn: HTTPConnection) -> Limits:
    return conn.app.state.limits


def get_outputs(conn: HTTPConnection) -> OutputStore:
    return conn.app.state.outputs


def require_api_key(conn: HTTPConnection) -> None:
    """Bearer auth for /v1 routes, only when CSM_API_KEYS is set. WebSockets may pass ?api_key=."""
    keys: list[str] = conn.app.state.settings.api_keys
    if not keys:
        return
    auth = conn.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else conn.query_params.get("api_key", "")
    if not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
        raise HTTPException(
            status_code=401,
            detail="Missing or invalid API key. Send 'Authorization: Bearer <key>' with a key from CSM_API_KEYS.",
            headers={"WWW-Authenticate": "Bearer"},
        )
