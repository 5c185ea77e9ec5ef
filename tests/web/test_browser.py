"""The /voice-cloning page in a real headless chromium against a live server with the demo engine:
clone a voice from a WAV this test writes, list and preview it, generate speech with it and with a
built-in voice, delete it; the audio elements must hold WAV the browser itself decodes.
"""

from __future__ import annotations

import io
import json
import re
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

VOICES = "/v1/voice-cloning/voices"


def write_clip(path: Path, seconds: float = 2.0, rate: int = 24_000) -> Path:
    """A voiced-sounding clip: a gliding harmonic tone with a syllable-like envelope and a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    noise = np.random.default_rng(0).normal(0, 0.02, t.size)
    pcm = np.clip(0.3 * voiced * envelope + noise, -1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    return path


def voices_of(body: dict | list) -> list[dict]:
    return body if isinstance(body, list) else body.get("voices", body.get("data", []))


def wav_info(data: bytes) -> tuple[int, int, int]:
    """(rate, channels, frames) of a WAV; fails the test if the bytes are not one."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", f"not a WAV: {data[:16]!r}"
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


async def open_my_voices(page, item: str) -> None:
    """Switch to My Voices and wait for its refresh to finish, so clicks land on settled buttons."""
    await page.click("#tab-voices")
    await page.wait_for("document.getElementById('voice-list').getAttribute('aria-busy') === 'false'", "the voice list")
    await page.wait_for(f"document.querySelector({json.dumps(item)})", "the voice in My Voices")


async def assert_playable(page, audio: str) -> float:
    """The <audio> matched by `audio` has a blob: WAV the browser loaded; returns its duration (s)."""
    sel = json.dumps(audio)
    await page.wait_for(
        f"(a => a && a.src.startsWith('blob:') && a.readyState >= 1 && a.duration > 0)(document.querySelector({sel}))",
        f"{audio} to load its audio",
    )
    assert await page.evaluate(f"document.querySelector({sel}).error") is None
    data = await page.fetch_bytes(f"document.querySelector({sel}).src")
    rate, channels, frames = wav_info(data)
    assert (rate, channels) == (24_000, 1)
    assert frames > 0
    duration = await page.evaluate(f"document.querySelector({sel}).duration")
    assert duration == pytest.approx(frames / rate, abs=0.03)
    return duration


@pytest.mark.slow
async def test_clone_generate_and_delete_in_chromium(page, live_server, tmp_path, screenshot_dir):
    async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as http:
        await drive(page, http, live_server.url, tmp_path, screenshot_dir)
    assert page.js_errors == []


async def drive(page, http: httpx.AsyncClient, base: str, tmp_path: Path, screenshot_dir: Path) -> None:
    clip = write_clip(tmp_path / "my-clip.wav")
    await page.goto(f"{base}/voice-cloning")
    assert await page.evaluate("document.title") == "Voice cloning · csm-voice-api"
    # Built-in voices come from /v1/audio/voices and fill the generate select on load.
    await page.wait_for("document.querySelectorAll('#gen-voice option').length > 0", "built-in voices")
    # Every visible control is labelled (a <label for> or an aria-label).
    unlabelled = await page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !e.textContent.trim()).map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    # Tabs follow the WAI-ARIA pattern: arrow keys move the selection and the focus.
    await page.evaluate("document.getElementById('tab-clone').focus()")
    await page.press("ArrowLeft")
    selected = "[...document.querySelectorAll('[role=tab]')].filter(t => t.ariaSelected === 'true').map(t => t.id)"
    assert await page.evaluate(selected) == ["tab-generate"]
    assert await page.evaluate("document.activeElement.id") == "tab-generate"
    assert await page.evaluate("document.getElementById('panel-clone').hidden")
    await page.press("Home")
    assert await page.evaluate(selected) == ["tab-clone"]

    # A file that is not audio: the page shows the API's own error message.
    bad = tmp_path / "notes.wav"
    bad.write_bytes(b"these are meeting notes, not audio")
    await page.upload("#clone-file", bad)
    await page.type("#clone-name", "Broken")
    await page.click("#clone-submit")
    shown = await page.wait_for("(e => !e.hidden && e.textContent)(document.getElementById('clone-error'))",
                                "the clone error")
    expected = await http.post("/v1/voice-cloning/clone", data={"name": "Broken", "transcript": "", "description": ""},
                               files={"audio_file": ("notes.wav", bad.read_bytes(), "audio/wav")})
    assert 400 <= expected.status_code < 500
    assert shown == expected.json()["error"]["message"]
    await page.screenshot(screenshot_dir / "clone-error.png")

    # Clone from the generated clip.
    await page.upload("#clone-file", clip)
    await page.type("#clone-name", "Test Narrator")
    await page.type("#clone-transcript", "Hello there, this is a test clip.")
    await page.type("#clone-description", "a generated tone")
    await page.click("#clone-submit")
    await page.wait_for("!document.getElementById('clone-result').hidden", "the created voice")
    assert await page.evaluate("document.getElementById('clone-error').hidden")
    meta = await page.evaluate("document.getElementById('clone-result-meta').innerText")
    assert "Test Narrator" in meta
    listed = (await http.get(VOICES)).json()
    stored = [v for v in voices_of(listed) if v["name"] == "Test Narrator"]
    assert len(stored) == 1
    voice_id = stored[0].get("voice_id", stored[0].get("id"))
    assert voice_id in meta
    await page.screenshot(screenshot_dir / "clone.png")

    # My Voices lists it; Preview plays it.
    item = f"li.voice[data-voice-id={json.dumps(voice_id)}]"
    await open_my_voices(page, item)
    await page.click(f"{item} button[aria-label^='Preview']")
    await assert_playable(page, f"{item} audio")
    await page.screenshot(screenshot_dir / "voices.png")

    # Use -> Generate Speech with that voice selected; temperature slider; generate and play.
    await page.click(f"{item} button[aria-label^='Generate speech']")
    assert not await page.evaluate("document.getElementById('panel-generate').hidden")
    assert await page.evaluate("document.getElementById('gen-voice').value") == voice_id
    await page.evaluate("""(r => { r.value = '0.5'; r.dispatchEvent(new Event('input')); })
                           (document.getElementById('gen-temperature'))""")
    assert await page.evaluate("document.getElementById('gen-temperature-value').value") == "0.50"
    await page.type("#gen-text", "Hi.")
    await page.click("#gen-submit")
    await assert_playable(page, "#gen-audio")
    link = await page.evaluate("(a => ({href: a.href, download: a.download}))(document.getElementById('gen-download'))")
    assert link["href"] == await page.evaluate("document.getElementById('gen-audio').src")
    assert re.fullmatch(r"test-narrator-\d{8}-\d{6}\.wav", link["download"])
    await page.screenshot(screenshot_dir / "generate.png")

    # A built-in voice goes through /v1/audio/speech and replaces the player's source.
    cloned_src = await page.evaluate("document.getElementById('gen-audio').src")
    await page.evaluate("(s => { s.value = 'alloy'; s.dispatchEvent(new Event('change')); })"
                        "(document.getElementById('gen-voice'))")
    await page.click("#gen-submit")
    await page.wait_for(f"document.getElementById('gen-audio').src !== {json.dumps(cloned_src)}", "new audio")
    await assert_playable(page, "#gen-audio")

    # Delete with the inline confirmation: gone from the page, the API and the voice select.
    await open_my_voices(page, item)
    await page.click(f"{item} button[aria-label^='Delete']")
    await page.click(f"{item} button[aria-label^='Confirm deleting']")
    await page.wait_for(f"!document.querySelector({json.dumps(item)})", "the voice to disappear")
    listed = (await http.get(VOICES)).json()
    assert voice_id not in {v.get("voice_id", v.get("id")) for v in voices_of(listed)}
    options = await page.evaluate("[...document.querySelectorAll('#gen-voice option')].map(o => o.value)")
    assert voice_id not in options and "alloy" in options
