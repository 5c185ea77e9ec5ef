"""Clone a voice with plain HTTP: POST /v1/voice-clone, then download the file it made.

    python examples/direct_api_example.py --reference me.wav --context-text "What I say in me.wav" \
        --text "Hello, this is my cloned voice." --output out.wav

Also shows a session spoken through POST /v1/stream-text (one WAV per chunk of text).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--api-key", default=None, help="bearer key, when the server sets CSM_API_KEYS")
    p.add_argument("--reference", type=Path, required=True, help="reference clip (wav, mp3, flac, ogg, m4a)")
    p.add_argument("--context-text", default="", help="transcript of the reference clip")
    p.add_argument("--text", default="Hello! This is a cloned voice speaking.")
    p.add_argument("--format", choices=["wav", "mp3"], default="wav")
    p.add_argument("--max-audio-ms", type=int, default=15_000)
    p.add_argument("--output", type=Path, default=Path("voice_clone.wav"))
    p.add_argument("--session-output", type=Path, default=None,
                   help="also speak --text through a session with /v1/stream-text, into this WAV prefix")
    args = p.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        ref = args.reference.read_bytes()
        r = client.post(
            "/v1/voice-clone",
            files={"audio_file": (args.reference.name, ref)},
            data={"text": args.text, "context_text": args.context_text, "output_format": args.format,
                  "max_audio_length_ms": str(args.max_audio_ms)},
        )
        if r.status_code != 200:
            print(f"voice-clone failed ({r.status_code}): {r.text}", file=sys.stderr)
            return 1
        result = r.json()
        audio = client.get(result["audio_url"])
        audio.raise_for_status()
        args.output.write_bytes(audio.content)
        print(f"wrote {args.output} ({result['duration_seconds']:.2f} s) from {result['audio_url']}")

        if args.session_output is not None:
            speak_session(client, ref, args)
    return 0


def speak_session(client: httpx.Client, ref: bytes, args: argparse.Namespace) -> None:
    """Open a session, send the text in two chunks, write each chunk's WAV, close the session."""
    r = client.post("/v1/streaming-session", files={"audio_file": (args.reference.name, ref)},
                    data={"context_text": args.context_text})
    r.raise_for_status()
    session_id = r.json()["session_id"]
    try:
        half = len(args.text) // 2
        for i, (chunk, final) in enumerate(((args.text[:half], False), (args.text[half:], True))):
            r = client.post("/v1/stream-text", json={"session_id": session_id, "text_chunk": chunk, "is_final": final})
            r.raise_for_status()
            out = args.session_output.with_name(f"{args.session_output.stem}_{i}.wav")
            out.write_bytes(r.content)
            print(f"wrote {out} ({(len(r.content) - 44) / 48_000:.2f} s)")
    finally:
        client.delete(f"/v1/streaming-session/{session_id}")


if __name__ == "__main__":
    sys.exit(main())
