"""Speech through the official `openai` client, pointed at this server.

    python examples/openai_client_example.py --text "Hello there." --voice alloy --output out.mp3
    python examples/openai_client_example.py --reference me.wav --context-text "..." --output clone.wav

With --reference, the clip is sent as voice="custom" plus voice_sample / voice_sample_text
(this server's extension fields, passed through `extra_body`).
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--api-key", default="not-needed", help="bearer key, when the server sets CSM_API_KEYS")
    p.add_argument("--text", default="Hello! This speech comes from the OpenAI Python client.")
    p.add_argument("--voice", default="alloy")
    p.add_argument("--reference", type=Path, default=None, help="clone this clip instead of --voice")
    p.add_argument("--context-text", default="", help="transcript of --reference")
    p.add_argument("--format", choices=["mp3", "opus", "aac", "flac", "wav", "pcm"], default="mp3")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()

    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key)
    extra: dict = {}
    voice = args.voice
    if args.reference is not None:
        voice = "custom"
        extra = {"voice_sample": base64.b64encode(args.reference.read_bytes()).decode(),
                 "voice_sample_text": args.context_text or "."}
    output = args.output or Path(f"speech.{args.format}")
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice=voice, input=args.text, response_format=args.format, extra_body=extra or None,
    ) as response:
        response.stream_to_file(output)
    print(f"wrote {output} ({output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
