"""Real-time speech from streamed text over WebSocket: audio flows while the text still arrives.

    python examples/streaming_example.py --reference me.wav --context-text "What I say in me.wav" \
        --output streamed.wav

Opens a session (POST /v1/streaming-session) with the reference clip, then, on
WS /v1/ws/stream-text/{session_id}, one task sends text token by token (as an LLM would) while
another receives audio frames and events at the same time. Writes a playable file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

DEFAULT_TEXT = (
    "Hi! I'm streaming this answer to you one token at a time. "
    "You should hear the first sentence while the rest is still being written, "
    "because each phrase is spoken as soon as it is complete."
)


def open_session(url: str, reference: Path | None, context_text: str, voice_id: str | None, fmt: str,
                 headers: dict[str, str]) -> str:
    files = {"audio_file": (reference.name, reference.read_bytes())} if reference else None
    data = {"context_text": context_text, "output_format": fmt}
    if voice_id:
        data["voice_id"] = voice_id
    r = httpx.post(f"{url}/v1/streaming-session", files=files, data=data, headers=headers, timeout=120)
    if r.status_code != 200:
        raise SystemExit(f"could not open a session ({r.status_code}): {r.text}")
    return r.json()["session_id"]


async def fake_llm(text: str, delay_s: float) -> AsyncIterator[str]:
    for token in re.findall(r"\S+\s*", text):
        await asyncio.sleep(delay_s)
        yield token


async def speak_stream(url: str, session_id: str, tokens: AsyncIterator[str], headers: dict[str, str]) -> bytes:
    """Send `tokens` to the session and return the whole audio stream, printing events as they come."""
    ws_url = "ws" + url[len("http"):] + f"/v1/ws/stream-text/{session_id}"
    audio = bytearray()
    start = time.perf_counter()

    async with connect(ws_url, additional_headers=headers) as ws:

        async def send() -> None:
            async for token in tokens:
                await ws.send(json.dumps({"text_chunk": token, "is_final": False}))
            await ws.send(json.dumps({"text_chunk": "", "is_final": True}))

        async def receive() -> None:
            async for message in ws:
                if isinstance(message, bytes):
                    if not audio:
                        print(f"[{time.perf_counter() - start:6.2f}s] first audio")
                    audio.extend(message)
                    continue
                event = json.loads(message)
                print(f"[{time.perf_counter() - start:6.2f}s] {event}")
                if event["type"] == "done":
                    return

        sender = asyncio.create_task(send())
        try:
            await receive()
        finally:
            sender.cancel()
    return bytes(audio)


def playable(audio: bytes, fmt: str) -> bytes:
    """A streamed WAV's header says "length unknown"; patch in the real sizes. Raw pcm gets a header."""
    if fmt == "pcm":
        audio = _wav_header(len(audio)) + audio
    elif fmt == "wav" and len(audio) >= 44:
        audio = _wav_header(len(audio) - 44) + audio[44:]
    return audio


def _wav_header(data_bytes: int, rate: int = 24_000) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def arguments(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--api-key", default=None, help="bearer key, when the server sets CSM_API_KEYS")
    p.add_argument("--reference", type=Path, default=None, help="reference clip to clone")
    p.add_argument("--context-text", default="", help="transcript of the reference clip")
    p.add_argument("--voice-id", default=None, help="a stored or built-in voice instead of --reference")
    p.add_argument("--format", choices=["wav", "pcm", "mp3", "opus"], default="wav")
    p.add_argument("--output", type=Path, default=None)
    return p


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--token-delay", type=float, default=0.05, help="seconds between tokens")
    args = p.parse_args()
    if args.reference is None and args.voice_id is None:
        args.voice_id = "alloy"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    session_id = open_session(url, args.reference, args.context_text, args.voice_id, args.format, headers)
    try:
        audio = asyncio.run(speak_stream(url, session_id, fake_llm(args.text, args.token_delay), headers))
    finally:
        httpx.delete(f"{url}/v1/streaming-session/{session_id}", headers=headers)
    output = args.output or Path(f"streamed.{'wav' if args.format == 'pcm' else args.format}")
    output.write_bytes(playable(audio, args.format))
    print(f"wrote {output} ({len(audio)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
