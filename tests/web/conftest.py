"""Fixtures for the web-UI test: a live server with the demo engine and a headless chromium tab.

The engine fixture and settings helper come from tests/api/conftest.py, loaded by path because the
suite runs with --import-mode=importlib (test directories are not importable packages).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from csm_voice_api.app import build_app

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_api = _load("csm_tests_api_conftest", HERE.parent / "api" / "conftest.py")
cdp = _load("csm_tests_web_cdp", HERE / "cdp.py")

engine = _api.engine


@pytest.fixture(scope="module")
def live_server(engine, tmp_path_factory) -> Iterator[object]:
    """uvicorn on 127.0.0.1 with the demo engine, output capped short: the demo model is noise that
    runs to its length cap, so every clip the page asks for (preview, generate, the built-in
    voice's seeded reference) is kept to a few frames to stay quick on a CPU."""
    import uvicorn

    settings = _api.make_settings(tmp_path_factory.mktemp("web"), max_output_ms=800, builtin_voice_ms=400)
    app = build_app(settings, engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield _api.LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app)
    server.should_exit = True
    thread.join(30)
    sock.close()


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
