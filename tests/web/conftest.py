"""Fixtures for the web-UI test: a live server with the demo engine and a headless chromium tab.

The engine fixture and settings helper come from tests/api/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from csm_voice_api.app import build_app

from ..api import conftest as _api
from ..live import uvicorn_thread
from . import cdp

engine = _api.engine


@pytest.fixture(scope="module")
def live_server(engine, tmp_path_factory) -> Iterator[object]:
    """uvicorn on 127.0.0.1 with the demo engine, output capped short: the demo model is noise that
    runs to its length cap, so every clip the page asks for (preview, generate, the built-in
    voice's seeded reference) is kept to a few frames to stay quick on a CPU."""
    settings = _api.make_settings(tmp_path_factory.mktemp("web"), max_output_ms=800, builtin_voice_ms=400)
    app = build_app(settings, engine)
    with uvicorn_thread(app) as url:
        yield _api.LiveServer(url, app)


@pytest.fixture
def chromium() -> str:
    path = cdp.find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, but CI must run the web-UI test: see .ci/run system_packages")
        pytest.skip("chromium is not installed (apt-get install chromium, or set CSM_CHROMIUM)")
    return path


@pytest.fixture
async def page(chromium: str, tmp_path: Path) -> AsyncIterator[object]:
    async with cdp.open_page(chromium, tmp_path / "chromium-profile") as p:
        yield p


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: CSM_WEB_SCREENSHOTS to keep them for a look, else the test's tmp dir."""
    path = Path(os.environ.get("CSM_WEB_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path
