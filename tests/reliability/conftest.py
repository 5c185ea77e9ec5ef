"""Reliability fixtures: one demo engine, and uvicorn servers on 127.0.0.1 with chosen settings.

Every wait in this suite is a bounded poll (`eventually`); nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from csm_voice_api.app import build_app
from csm_voice_api.config import Settings
from csm_voice_api.engine.engine import AsyncEngine

from ..live import demo_engine, uvicorn_thread

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-other-fedcba9876543210"


@pytest.fixture(scope="session")
def engine() -> Iterator[AsyncEngine]:
    with demo_engine(4) as eng:
        yield eng


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    # _env_file=None: a developer's .env must not change what the tests check. No watermark by
    # default: it is tested on its own, and here it would only slow generation on CPU. No start-up
    # warm-up either (tests/api/test_warmup.py): it would run beside the test's own requests.
    overrides = {"watermark": False, "warmup": False, **overrides}
    return Settings(_env_file=None, model="demo", device="cpu", data_dir=data_dir, **overrides)


@dataclass
class Live:
    url: str
    app: object

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]

    @property
    def admission(self):
        return self.app.state.admission  # type: ignore[attr-defined]

    def open_session(self, headers: dict[str, str] | None = None, **form: str) -> str:
        form = {"voice_id": "alloy", "output_format": "pcm", **form}
        r = httpx.post(self.url + "/v1/streaming-session", data=form, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["session_id"]


@contextmanager
def serve(engine: AsyncEngine | None, data_dir: Path, *, sndbuf: int | None = None,
          ws_max_size: int = 16 * 1024 * 1024, **settings: object) -> Iterator[Live]:
    """uvicorn on 127.0.0.1 (a free port) in a thread; `sndbuf` as in tests/live.py."""
    app = build_app(make_settings(data_dir, **settings), engine)
    with uvicorn_thread(app, sndbuf=sndbuf, ws_max_size=ws_max_size) as url:
        yield Live(url, app)


@pytest.fixture
def live_factory(engine: AsyncEngine, tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """live_factory(**settings) -> a running server; all are stopped after the test."""
    stack: list = []

    def start(**settings: object) -> Live:
        cm = serve(engine, tmp_path / f"srv{len(stack)}", **settings)
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


async def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `check` until true; fail after `timeout` seconds (a bound, not a measurement)."""
    try:
        with anyio.fail_after(timeout):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not reached within {timeout} s") from None


def engine_idle(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s["active"] == 0 and s["queued"] == 0


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
