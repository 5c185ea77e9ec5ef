"""An LLM's streamed answer, spoken while it is being written.

    python examples/openai_streaming_example.py --reference me.wav --context-text "..." \
        --llm-url http://localhost:11434/v1 --llm-model llama3.2 --prompt "Tell me about otters."

The chat completion is streamed with the `openai` client from any OpenAI-compatible LLM server;
each text delta goes straight to this server's WS /v1/ws/stream-text, and the audio is written
to --output. Without --llm-url a canned answer is streamed instead, so the example runs alone.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from streaming_example import DEFAULT_TEXT, arguments, fake_llm, open_session, playable, speak_stream


async def llm_tokens(base_url: str, api_key: str, model: str, prompt: str) -> AsyncIterator[str]:
    llm = AsyncOpenAI(base_url=base_url, api_key=api_key)
    stream = await llm.chat.completions.create(
        model=model, stream=True,
        messages=[{"role": "system", "content": "Answer briefly, in plain spoken sentences."},
                  {"role": "user", "content": prompt}],
    )
    async for event in stream:
        if event.choices and event.choices[0].delta.content:
            yield event.choices[0].delta.content


def main() -> int:
    p = arguments(__doc__)
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible chat server (e.g. http://localhost:11434/v1)")
    p.add_argument("--llm-api-key", default="not-needed")
    p.add_argument("--llm-model", default="gpt-4o-mini")
    p.add_argument("--prompt", default="Explain in three sentences why otters hold hands.")
    args = p.parse_args()
    if args.reference is None and args.voice_id is None:
        args.voice_id = "alloy"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    tokens = (llm_tokens(args.llm_url, args.llm_api_key, args.llm_model, args.prompt)
              if args.llm_url else fake_llm(DEFAULT_TEXT, 0.05))
    session_id = open_session(url, args.reference, args.context_text, args.voice_id, args.format, headers)
    try:
        audio = asyncio.run(speak_stream(url, session_id, tokens, headers))
    finally:
        httpx.delete(f"{url}/v1/streaming-session/{session_id}", headers=headers)
    output = args.output or Path(f"llm_speech.{'wav' if args.format == 'pcm' else args.format}")
    output.write_bytes(playable(audio, args.format))
    print(f"wrote {output} ({len(audio)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
