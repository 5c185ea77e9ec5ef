"""Live things for tests: the demo engine, a uvicorn server in a thread, the CLI server in a subprocess
(127.0.0.1 only, free ports)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


@contextmanager
def demo_engine(max_batch: int = 4) -> Iterator[object]:
    """The demo model's AsyncEngine on the CPU, started; shut down on exit."""
    import asyncio

    from csm_voice_api.engine.engine import AsyncEngine, EngineConfig

    eng = AsyncEngine.load(EngineConfig(model="demo", device="cpu", max_batch=max_batch))
    asyncio.run(eng.start())
    try:
        yield eng
    finally:
        asyncio.run(eng.shutdown())


@contextmanager
def uvicorn_thread(app: object, *, sndbuf: int | None = None, **config: object) -> Iterator[str]:
    """Yields the base URL. `sndbuf` shrinks the listening socket's send buffer (accepted sockets
    inherit it), so a client that stops reading stalls the server after a few kilobytes."""
    import uvicorn

    sock = socket.socket()
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cli_server(data_dir: Path, log_level: str = "warning", **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m csm_voice_api serve` on the demo model in a subprocess, yielded once /ready
    answers 200 (for tests that kill or signal the process). `env` adds CSM_* settings."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CSM_DATA_DIR": str(data_dir), "CSM_WATERMARK": "false",
                "CSM_WARMUP": "false", **env}  # fmt: skip
    cmd = [sys.executable, "-m", "csm_voice_api", "serve", "--model", "demo", "--device", "cpu",
           "--port", str(port), "--log-level", log_level]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=data_dir, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
