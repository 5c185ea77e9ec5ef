"""Small FastAPI dependencies: the shared objects the app's lifespan put on app.state.

Authentication is not a dependency: api/security.py checks every request before routing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
