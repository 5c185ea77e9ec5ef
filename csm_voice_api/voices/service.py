"""VoiceService: the voice library as requests use it (store + engine encoding + a codes cache).

A stored voice keeps its Mimi codes, so its clip is encoded once, when it is created; codes found
missing or made by another codec are encoded again and stored. Codes of recently used voices stay
in memory.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from csm_voice_api.engine.types import FRAME_SAMPLES, SAMPLE_RATE, Segment, VoicePrompt
from csm_voice_api.errors import CsmError, InvalidInput, VoiceNotFound
from csm_voice_api.voices.builtin import BUILTIN_NAMES, BuiltinVoices
from csm_voice_api.voices.store import Voice, VoiceStore

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

CODES_CACHE_SIZE = 64  # voices whose codes stay in memory (a 30 s clip's codes are ~90 KB)


@dataclass(frozen=True)
class NewVoice:
    """A voice just created, with what the caller should be told about its reference."""

    voice: Voice
    warnings: tuple[str, ...] = ()

    @property
    def transcript_missing(self) -> bool:
        return not self.voice.transcript


class VoiceService:
    """Create, find, delete voices and turn any of them (built-in or stored) into a VoicePrompt.

    `reserved_names` are names a stored voice may not take (they already mean something to the
    API, like OpenAI's voice names); the built-in names are always reserved.
    """

    def __init__(self, store: VoiceStore, engine: AsyncEngine, *, builtin_seed: int = 0,
                 builtin_ms: int = 8000, reserved_names: Iterable[str] = ()):  # fmt: skip
        self.store = store
        self.engine = engine
        self.builtins = BuiltinVoices(store, engine, seed=builtin_seed, reference_ms=builtin_ms)
        self.reserved = frozenset(n.lower() for n in (*BUILTIN_NAMES, *reserved_names))
        self._codes: OrderedDict[tuple[str, str | None], torch.Tensor] = OrderedDict()

    @classmethod
    def open(cls, data_dir: Path, engine: AsyncEngine, **kwargs: object) -> VoiceService:
        """Open (and recover) the store under `data_dir`. Blocking: call it from a thread."""
        return cls(VoiceStore(data_dir), engine, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.store.close()

    def max_reference_samples(self) -> int:
        return self.engine.max_prompt_frames() * FRAME_SAMPLES

    # ---- create ------------------------------------------------------------------------------
    async def create_from_file(self, name: str, data: bytes, *, max_seconds: float, transcript: str = "",
                               description: str = "", param: str = "audio_file") -> NewVoice:  # fmt: skip
        """Decode an uploaded clip (any accepted format) and store it as a voice.

        Raises UnsupportedMedia (not audio), InputTooLong (over `max_seconds`), InvalidInput (name).
        """
        from csm_voice_api.audio.decode import decode_upload

        self._check_name(name)
        if not data:
            raise InvalidInput(f"{param} is empty: upload a clip of the voice.", param=param)
        try:
            pcm = await asyncio.to_thread(decode_upload, data, max_seconds=max_seconds)
        except CsmError as e:
            e.param = param  # the decoder speaks of "file": name the field this request used
            raise
        return await self.create(name, pcm, transcript=transcript, description=description)

    async def create(self, name: str, pcm: np.ndarray, *, transcript: str = "", description: str = "") -> NewVoice:
        """Store float32 mono 24 kHz `pcm` as a voice, with its Mimi codes."""
        self._check_name(name)
        warnings = []
        limit = self.max_reference_samples()
        if len(pcm) > limit:
            warnings.append(
                f"The clip was trimmed from {len(pcm) / SAMPLE_RATE:.1f} s to {limit / SAMPLE_RATE:.1f} s to fit "
                "the model's context; a transcript of the whole clip no longer matches its end."
            )
            pcm = pcm[:limit]
        transcript = " ".join(transcript.split())
        if not transcript:
            warnings.append(
                "No transcript was given: the voice works, but cloning is closer with the words spoken in "
                "the clip. Create it again with a transcript for better results."
            )
        codes = await self.engine.encode(np.ascontiguousarray(pcm, dtype=np.float32))
        voice = await asyncio.to_thread(
            self.store.create, name, pcm, transcript=transcript, description=description, codes=codes.numpy()
        )
        self._remember(voice, codes)
        return NewVoice(voice, tuple(warnings))

    def _check_name(self, name: str) -> None:
        if " ".join(name.split()).lower() in self.reserved:
            raise InvalidInput(f"'{name.strip()}' is a built-in voice name; pick another name.", param="name")

    # ---- find / list / delete ----------------------------------------------------------------
    def user_voices(self) -> list[Voice]:
        """Stored voices that users created, oldest first (built-in references are not listed)."""
        return [v for v in self.store.list() if not v.builtin]

    async def find(self, id_or_name: str, *, param: str = "voice") -> Voice:
        """A stored voice by id or (case-insensitive) name; raises VoiceNotFound naming `param`."""
        try:
            return await asyncio.to_thread(self.store.get, id_or_name)
        except VoiceNotFound:
            raise VoiceNotFound(
                f"Unknown voice '{id_or_name}'. Use a built-in voice ({', '.join(BUILTIN_NAMES)}) or the id or "
                "name of a stored voice (GET /v1/audio/voices); create one with POST /v1/audio/voices.",
                param=param,
            ) from None

    async def delete(self, id_or_name: str, *, param: str = "voice") -> Voice:
        """Delete a user's voice; built-in voices are refused (InvalidInput)."""
        if id_or_name in self.builtins:
            raise InvalidInput(f"Voice '{id_or_name}' is built in and cannot be deleted.", param=param)
        voice = await self.find(id_or_name, param=param)
        await asyncio.to_thread(self.store.delete, voice.id)
        self._forget(voice.id)
        return voice

    # ---- prompts -----------------------------------------------------------------------------
    async def prompt(self, id_or_name: str) -> VoicePrompt:
        """The VoicePrompt of a built-in voice name, or of a stored voice's id or name."""
        if id_or_name in self.builtins:
            voice = await self.builtins.voice(id_or_name)
        else:
            voice = await self.find(id_or_name)
        speaker = self.builtins.speaker(voice.name) if voice.builtin and voice.name in self.builtins else 0
        codes = await self._codes_of(voice)
        return VoicePrompt(segments=(Segment(speaker, voice.transcript, codes),), speaker=speaker)

    async def _codes_of(self, voice: Voice) -> torch.Tensor:
        key = (voice.id, voice.codes_sha256)
        if key in self._codes:
            self._codes.move_to_end(key)
            return self._codes[key]
        codes = await asyncio.to_thread(self.store.load_codes, voice)
        K = getattr(self.engine, "num_codebooks", None)
        if codes is not None and (K is None or codes.shape[0] == K):
            tensor = torch.from_numpy(codes)
        else:  # none stored (a recovered store) or from another codec: encode once, keep them
            pcm = await asyncio.to_thread(self.store.load_audio, voice)
            tensor = await self.engine.encode(pcm[: self.max_reference_samples()])
            voice = await asyncio.to_thread(self.store.set_codes, voice.id, tensor.numpy())
        self._remember(voice, tensor)
        return tensor

    def _remember(self, voice: Voice, codes: torch.Tensor) -> None:
        self._forget(voice.id)
        self._codes[(voice.id, voice.codes_sha256)] = codes
        while len(self._codes) > CODES_CACHE_SIZE:
            self._codes.popitem(last=False)

    def _forget(self, voice_id: str) -> None:
        for key in [k for k in self._codes if k[0] == voice_id]:
            del self._codes[key]
