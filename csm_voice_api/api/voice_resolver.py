"""Turns the `voice` of a speech request into the VoicePrompt the engine speaks with.

`resolve_voice` for speech requests, `resolve_named_voice` for a bare name or id (sessions, the
voice-cloning routes): built-in voices, OpenAI's other names, then the voice library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from csm_voice_api.api.models import SpeechRequest
from csm_voice_api.config import Limits
from csm_voice_api.engine.types import FRAME_SAMPLES, SAMPLE_RATE, Segment, VoicePrompt
from csm_voice_api.errors import CsmError, InputTooLong, InvalidInput, VoiceNotFound

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

# OpenAI's voice names. With the voice library, alloy, echo, fable, onyx, nova and shimmer are
# built-in voices with a fixed reference each (csm_voice_api/voices/builtin.py); the other names,
# and all of them without a library, are distinct bare CSM speaker ids.
BUILTIN_VOICES: tuple[str, ...] = (
    "alloy", "echo", "fable", "onyx", "nova", "shimmer",
    "ash", "ballad", "coral", "sage", "verse", "marin", "cedar",
)  # fmt: skip
CUSTOM = "custom"


@dataclass(frozen=True)
class VoiceContext:
    """What resolving a voice may use: the engine (to encode clips), limits, and later the voice store."""

    engine: AsyncEngine
    limits: Limits
    voices: Any = None  # the voice library (csm_voice_api.voices.service.VoiceService), if any


def builtin_voices(voices: Any = None) -> list[tuple[str, str]]:
    """(id, display name) of every voice a client can name: OpenAI's names, then the voices
    stored in `voices` (a VoiceService) when given."""
    cards = [(v, v.capitalize()) for v in BUILTIN_VOICES]
    if voices is not None:
        cards += [(v.id, v.name) for v in voices.user_voices()]
    return cards


async def resolve_voice(request: SpeechRequest, ctx: VoiceContext) -> VoicePrompt:
    """The prompt for `request.voice`; raises VoiceNotFound / InvalidInput / InputTooLong."""
    voice = request.voice_id
    if voice == CUSTOM:
        return await _clone_prompt(request, ctx)
    if request.voice_sample is not None:
        raise InvalidInput("voice_sample is only used with voice='custom'.", param="voice")
    return await resolve_named_voice(voice, ctx)


async def resolve_named_voice(voice: str, ctx: VoiceContext, *, param: str = "voice") -> VoicePrompt:
    """The prompt for a voice name or stored voice id; raises VoiceNotFound naming `param`."""
    key = voice.strip().lower()
    library = ctx.voices
    if key in BUILTIN_VOICES and (library is None or key not in library.builtins):
        return VoicePrompt(segments=(), speaker=BUILTIN_VOICES.index(key))
    if library is not None:
        try:
            return await library.prompt(voice.strip())
        except VoiceNotFound as e:
            e.param = param
            raise
    raise VoiceNotFound(
        f"Unknown voice '{voice}'. Use one of {', '.join(BUILTIN_VOICES)} (GET /v1/audio/voices), "
        f"or voice='{CUSTOM}' with voice_sample and voice_sample_text.",
        param=param,
    )


async def _clone_prompt(request: SpeechRequest, ctx: VoiceContext) -> VoicePrompt:
    from csm_voice_api.audio.decode import decode_base64_audio

    if not request.voice_sample:
        raise InvalidInput(
            "voice='custom' needs voice_sample: base64 audio of the voice to clone.", param="voice_sample"
        )
    transcript = (request.voice_sample_text or "").strip()
    if not transcript:
        raise InvalidInput(
            "voice='custom' needs voice_sample_text: the words spoken in voice_sample.", param="voice_sample_text"
        )
    # base64 is 4/3 of the raw size: refuse before decoding anything.
    if len(request.voice_sample) * 3 // 4 > ctx.limits.max_upload_bytes:
        raise InputTooLong(
            f"voice_sample is larger than {ctx.limits.max_upload_bytes} bytes (CSM_MAX_UPLOAD_BYTES).",
            param="voice_sample",
        )
    max_s = min(ctx.limits.max_reference_seconds, ctx.engine.max_prompt_frames() * FRAME_SAMPLES / SAMPLE_RATE)
    # Longer clips are refused, not cut: the transcript would no longer match the audio.
    try:
        pcm = decode_base64_audio(request.voice_sample, max_seconds=max_s)
    except CsmError as e:
        e.param = "voice_sample"  # the decoder speaks of "file": name the field this request used
        raise
    codes = await ctx.engine.encode(pcm)
    return VoicePrompt(segments=(Segment(speaker=0, text=transcript, codes=codes),), speaker=0)
