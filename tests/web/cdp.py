"""A minimal Chrome DevTools Protocol driver for the web-UI test: Debian's chromium, spoken to over
`websockets` (already a dependency), so the test needs no npm, no browser download, no new package.

Only what the test uses: navigate, evaluate, wait, type, keys, real mouse clicks, file upload, screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*",
)  # fmt: skip
# Generous: a hang guard for a slow shared CI machine, not a performance assertion.
WAIT_S = float(os.environ.get("CSM_WEB_WAIT_S", 120))


def find_chromium() -> str | None:
    """CSM_CHROMIUM, else the first chromium-like binary on PATH."""
    if explicit := os.environ.get("CSM_CHROMIUM"):
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Page:
    """One tab, attached with a flat session over the browser's single WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = 0
        self._pending: dict[int, asyncio.Future[dict]] = {}
        self.session: str | None = None
        self.js_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif msg.get("method") == "Runtime.exceptionThrown":
                details = msg["params"]["exceptionDetails"]
                self.js_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                self.js_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))

    async def send(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self._ids += 1
        msg: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if not browser:
            msg["sessionId"] = self.session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        await self._ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, WAIT_S)
        if "error" in reply:
            raise RuntimeError(f"CDP {method} failed: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited); a JS exception fails the test with its text."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(f"JS error in {expression!r}: {details.get('exception', {}).get('description')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        # Objects (e.g. DOM nodes) come back as {} by value, which Python reads as false.
        truthy = f"(v => (v && typeof v === 'object') ? true : v)({expression})"
        deadline = time.monotonic() + WAIT_S
        while not (value := await self.evaluate(truthy)):
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}: {expression}\n{await self.diagnostics()}")
            await asyncio.sleep(0.1)
        return value

    async def diagnostics(self) -> str:
        """What a failing wait should show: visible alerts and statuses, and JS errors so far."""
        shown = await self.evaluate("""[...document.querySelectorAll('[role=alert], [role=status]')]
            .filter(e => e.offsetParent && e.textContent.trim()).map(e => `#${e.id}: ${e.textContent.trim()}`)""")
        return f"page says: {shown}; JS errors: {self.js_errors}"

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", "page load")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre: fails if the element is hidden or covered."""
        box = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            const x = r.left + r.width / 2, y = r.top + r.height / 2;
            return {{x, y, hit: el.contains(document.elementFromPoint(x, y)), w: r.width}};
        }})()""")
        assert box is not None, f"no element matches {selector}"
        assert box["w"] > 0 and box["hit"], f"{selector} is not visible and clickable: {box}"
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent",
                            {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1})

    async def type(self, selector: str, text: str) -> None:
        """Replace the field's text as a user would: focus, select all, type (fires `input`)."""
        await self.evaluate(f"(el => {{ el.focus(); el.select(); }})(document.querySelector({json.dumps(selector)}))")
        await self.send("Input.insertText", {"text": text})

    async def press(self, key: str) -> None:
        """A key press on the focused element (named keys: ArrowLeft, ArrowRight, Home, End, Enter)."""
        codes = {"ArrowLeft": 37, "ArrowRight": 39, "Home": 36, "End": 35, "Enter": 13}
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent",
                            {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": codes[key]})

    async def upload(self, selector: str, path: Path) -> None:
        root = await self.send("DOM.getDocument", {"depth": 0})
        node = await self.send("DOM.querySelector", {"nodeId": root["root"]["nodeId"], "selector": selector})
        await self.send("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(path)]})

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))

    async def fetch_bytes(self, url_expression: str) -> bytes:
        """Bytes behind a URL as the page sees them (e.g. an <audio>'s blob: source)."""
        b64 = await self.evaluate(f"""fetch({url_expression}).then(r => r.arrayBuffer()).then(buf => {{
            const bytes = new Uint8Array(buf); let s = '';
            for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
            return btoa(s);
        }})""")
        return base64.b64decode(b64)


@asynccontextmanager
async def open_page(chromium: str, profile: Path, width: int = 1024, height: int = 900) -> AsyncIterator[Page]:
    """Start a fresh headless chromium on `profile` and yield one attached tab; kills it after."""
    profile.mkdir(parents=True, exist_ok=True)
    port_file = profile / "DevToolsActivePort"
    proc = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode} before DevTools came up"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
            page = Page(ws)
            target = await page.send("Target.createTarget", {"url": "about:blank"}, browser=True)
            attached = await page.send(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, browser=True
            )
            page.session = attached["sessionId"]
            for domain in ("Page", "Runtime", "DOM"):
                await page.send(f"{domain}.enable")
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            try:
                yield page
            finally:
                page._reader.cancel()
                with suppress(asyncio.CancelledError):
                    await page._reader
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    # The whole process group we started: chromium's zygote and renderers go with it.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)
            return
