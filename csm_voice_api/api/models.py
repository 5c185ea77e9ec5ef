"""Request and response bodies of the OpenAI-compatible speech routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from csm_voice_api.audio.encode import CONTENT_TYPES, FORMATS  # noqa: F401 - re-exported

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
# The encoders own the list of formats and their content types; the API re-exports them.
RESPONSE_FORMATS: tuple[str, ...] = FORMATS


class VoiceRef(BaseModel):
    """OpenAI's custom-voice object form: {"id": "voice_1234"}."""

    id: str = Field(min_length=1)


class SpeechRequest(BaseModel):
    """POST /v1/audio/speech: OpenAI's fields, plus sampling and voice-clone extensions."""

    # Unknown fields are ignored, as OpenAI clients send new ones (e.g. `instructions`) over time.
    model_config = ConfigDict(extra="ignore")

    model: str = "csm-1b"
    # Length limits are checked in the route: empty -> 400, too long -> 413 (configurable).
    input: str
    voice: str | VoiceRef = "alloy"
    instructions: str | None = None  # accepted for compatibility; CSM has no style prompt
    response_format: ResponseFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # Extensions.
    stream: bool = True  # False: the whole file in one body with Content-Length
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    topk: int | None = Field(None, ge=1, le=2051)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_audio_length_ms: int | None = Field(None, ge=80)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    voice_sample: str | None = None  # base64 audio to clone from, with voice="custom"
    voice_sample_text: str | None = None  # transcript of voice_sample

    @property
    def voice_id(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "csm-voice-api"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(BaseModel):
    id: str
    name: str
    object: Literal["voice"] = "voice"


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    voices: list[VoiceCard]
    data: list[VoiceCard]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int  # audio frames (80 ms each)
    total_tokens: int


class AudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the encoded stream


class AudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: Usage
