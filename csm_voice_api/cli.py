"""Console entry point `csm-voice-api`: serve, say, verify-watermark."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import textwrap
import wave
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from csm_voice_api.config import Settings

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

_WIDTH = 76


def demo_banner(engine: AsyncEngine) -> str:
    """A boxed warning that the demo model is loaded and the audio is noise."""
    reason = engine.demo_reason or f"the model was set to '{engine.model_name}'"
    paragraphs = [  # each one string: wrapping joins a sentence, never breaks it after a comma
        "!!! DEMO MODEL: THE AUDIO THIS SERVER MAKES IS RANDOM NOISE !!!",
        "",
        "No CSM-1B weights were loaded, so a tiny randomly initialised model is answering. Every route "
        "works and every length is real, but nothing is speech.",
        "",
        f"Why: {reason}",
        "",
        "(sesame/csm-1b is a gated Hugging Face repo: it needs an accepted licence, an HF_TOKEN and "
        "network access, or a local copy of the weights.)",
        "",
        "To get the real model:",
        "  1. accept the licence at https://huggingface.co/sesame/csm-1b",
        "  2. export HF_TOKEN=hf_...   (a token of that account), then restart; or",
        "  3. --model /path/to/local/csm-1b   (a directory with the downloaded weights)",
    ]
    wrapped = []
    for text in paragraphs:
        indent = " " * (len(text) - len(text.lstrip(" 0123456789.")))  # list items hang under their text
        wrapped += textwrap.wrap(text, _WIDTH - 4, subsequent_indent=indent) or [""]
    bar = "#" * _WIDTH
    return "\n".join([bar, *(f"# {w:<{_WIDTH - 4}} #" for w in wrapped), bar])


def _announce(engine: AsyncEngine) -> None:
    if engine.is_demo:
        print(demo_banner(engine), file=sys.stderr, flush=True)


def _log_to_stderr(level: str) -> None:
    """Our loggers beside uvicorn's. uvicorn configures only its own, so without this the engine's
    start-up, the warm-up and everything else under INFO were dropped (Python's last-resort
    handler prints WARNING and up only)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-8s %(name)s: %(message)s"))
    logger = logging.getLogger("csm_voice_api")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def _tune_process(settings: Settings) -> None:
    """Process-wide settings of a server process (`serve` only: tests and tools keep Python's).

    The engine thread drops the GIL at every device call and must win it back from the event loop
    and the watermark threads, which can hold it for a switch interval. On an H200 under load 1 ms
    measured no worse than Python's 5 ms anywhere and lower stall p99 at 64-128 clients, although
    the engine thread's host time per step did not move (BENCHMARKS.md, fifth session).
    """
    sys.setswitchinterval(settings.gil_switch_ms / 1000)


def _freeze_heap() -> None:
    """Once the model is up: the start-up heap (torch, transformers, the model) leaves the
    collector's view, so a full collection while serving walks only what serving allocates
    instead of pausing every thread for the millions of start-up objects."""
    import gc

    gc.collect()
    gc.freeze()


def _on_engine(engine: AsyncEngine) -> None:
    _announce(engine)
    _freeze_heap()


def _settings(args: argparse.Namespace) -> Settings:
    # Only flags actually given override the environment / .env.
    flags = ("model", "host", "port", "device", "dtype", "temperature", "top_p", "repetition_penalty")
    given = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from csm_voice_api.app import build_app

    from csm_voice_api.api.admission import GracefulServer

    settings = _settings(args)
    _log_to_stderr(args.log_level)
    _tune_process(settings)
    app = build_app(settings, on_engine=_on_engine)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=args.log_level,
        ws_max_size=settings.ws_max_message_bytes,  # the protocol layer refuses larger frames (1009)
        # Audio does not deflate, and compressing every chunk took the event loop 46% of its time
        # at 128 clients (py-spy, H200): WebSocket clients get plain frames.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=5,  # after our own drain (SIGTERM), what is left gets 5 s
    )  # fmt: skip
    GracefulServer(config, app.state.admission, settings.shutdown_grace_s).run()
    return 0


def _say(args: argparse.Namespace) -> int:
    from csm_voice_api.engine.engine import AsyncEngine

    settings = _settings(args)
    engine = AsyncEngine.load(settings.engine_config())
    _announce(engine)
    pcm, frames = asyncio.run(_speak(engine, settings, args))
    if settings.watermark:  # the same mark the server puts on everything it returns
        from csm_voice_api.api.watermark import watermarker_for

        pcm = watermarker_for(settings, engine).apply(pcm) if pcm.size else pcm
    _write_wav(Path(args.output), pcm)
    print(f"wrote {args.output}: {frames} frames, {len(pcm) / 24000:.2f} s", file=sys.stderr)
    return 0


async def _speak(engine: AsyncEngine, settings: Settings, args: argparse.Namespace) -> tuple[np.ndarray, int]:
    from tqdm import tqdm

    from csm_voice_api.api.speech_job import split_text
    from csm_voice_api.api.voice_resolver import BUILTIN_VOICES
    from csm_voice_api.engine.types import FRAME_MS, Conversation, VoicePrompt

    if args.voice not in BUILTIN_VOICES:
        raise SystemExit(f"unknown voice {args.voice!r}; use one of {', '.join(BUILTIN_VOICES)}")
    conv = Conversation(VoicePrompt(segments=(), speaker=BUILTIN_VOICES.index(args.voice)))
    sampling = replace(settings.sampling(), seed=args.seed, max_audio_ms=args.max_ms)
    parts: list[np.ndarray] = []
    await engine.start()
    try:
        with tqdm(total=sampling.max_frames, unit="frame", desc="generating", file=sys.stderr) as bar:
            for phrase in split_text(args.text):
                left = sampling.max_audio_ms - bar.n * FRAME_MS
                if left < FRAME_MS:
                    break
                turn = replace(sampling, max_audio_ms=left)
                async for chunk in engine.generate(conv, phrase, sampling=turn, chunk_frames=settings.chunk_frames):
                    parts.append(chunk.pcm)
                    bar.update(chunk.frames)
            frames = bar.n
    finally:
        engine.release(conv)
        await engine.shutdown()
    pcm = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return pcm, frames


def _write_wav(path: Path, pcm: np.ndarray) -> None:
    pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes(pcm16.tobytes())


def _verify_watermark(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"no such file: {path}", file=sys.stderr)
        return 2
    try:
        from csm_voice_api.audio.watermark import load_watermarker, search_bounds, verify_file

        settings = Settings()
        device = args.device or ("cuda" if _cuda() else "cpu")
        key = args.key if args.key is not None else settings.watermark_key
        wm = load_watermarker(key, device, demo=args.demo, weights_dir=args.weights or settings.watermark_weights)
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        print(f"cannot verify watermarks here: {e}", file=sys.stderr)
        return 2
    search_s, step = search_bounds(device)  # bounded on CPU, so it ends in about a minute
    if args.phase_search_s is not None:
        search_s = args.phase_search_s
    from csm_voice_api.errors import UnsupportedMedia

    try:
        result = verify_file(path, wm, phase_search_s=search_s, phase_step=args.phase_step or step)
    except UnsupportedMedia as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    report = {"watermarked": result.watermarked, "key_matches": result.key_matches,
              "confidence": result.confidence, "key": wm.key_kind,
              "message": None if result.message is None else list(result.message)}  # fmt: skip
    print(json.dumps(report))
    return 0 if result.key_matches else 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csm-voice-api", description="Real-time voice-cloning speech server on CSM-1B.")
    sub = p.add_subparsers(dest="command", required=True)

    def engine_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help="auto | sesame/csm-1b | <local dir> | demo (env CSM_MODEL)")
        sp.add_argument("--device", help="auto | cuda | cuda:N | cpu (env CSM_DEVICE)")
        sp.add_argument("--dtype", help="auto | bfloat16 | float16 | float32 (env CSM_DTYPE)")

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    engine_flags(serve)
    serve.add_argument("--host", help="bind address (env CSM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env CSM_PORT, default 8000)")
    serve.add_argument("--temperature", type=float, help="default sampling temperature (env CSM_TEMPERATURE, 0.9)")
    serve.add_argument("--top_p", "--top-p", dest="top_p", type=float, help="default top-p (env CSM_TOP_P, 1.0: off)")
    serve.add_argument("--repetition_penalty", "--repetition-penalty", dest="repetition_penalty", type=float,
                       help="default repetition penalty (env CSM_REPETITION_PENALTY, 1.0: off)")  # fmt: skip
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    say = sub.add_parser("say", help="speak TEXT into a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", required=True, help="WAV file to write")
    engine_flags(say)
    say.add_argument("--voice", default="alloy", help="built-in voice name")
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--max-ms", type=int, default=30_000, help="most audio to generate, in ms")
    say.set_defaults(func=_say)

    verify = sub.add_parser("verify-watermark", help="check a file for the CSM watermark (exit 0: the key's)")
    verify.add_argument("file")
    verify.add_argument("--key", help="5 comma-separated bytes (env CSM_WATERMARK_KEY; default the public CSM-1B key)")
    verify.add_argument("--weights", type=Path, help="sony/silentcipher checkpoint folder (env CSM_WATERMARK_WEIGHTS)")
    verify.add_argument("--device", help="cpu | cuda (default cuda when available)")
    verify.add_argument("--demo", action="store_true", help="the demo model's random watermark networks")
    verify.add_argument("--phase-search-s", type=float, help="seconds searched for the phase (0: none)")
    verify.add_argument("--phase-step", type=int, help="phase search step in samples (silentcipher: 10)")
    verify.set_defaults(func=_verify_watermark)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
