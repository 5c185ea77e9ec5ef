"""What callers hand the engine and get back. Plain data: no torch state that outlives a call."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # one CSM/Mimi frame = 80 ms at 24 kHz
FRAME_MS = 80


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.9  # <= 0: greedy
    topk: int = 50
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    max_audio_ms: int = 90_000
    repetition_penalty: float = 1.0  # >= 1; penalises codes a row used in its last 16 frames

    def __post_init__(self) -> None:
        # Checked here so every caller gets the same message; routes validate earlier with param names.
        if not (self.topk >= 1 and 0 < self.top_p <= 1 and self.repetition_penalty >= 1 and self.max_audio_ms > 0):
            from ..errors import InvalidInput

            raise InvalidInput(f"invalid sampling parameters {self!r}: need topk >= 1, 0 < top_p <= 1, "
                               "repetition_penalty >= 1 and max_audio_ms > 0")

    @property
    def max_frames(self) -> int:
        return max(1, self.max_audio_ms // FRAME_MS)


@dataclass(frozen=True, eq=False)
class Segment:
    """One turn of context: what a speaker said, and the Mimi codes of how it sounded."""

    speaker: int
    text: str
    codes: torch.Tensor | None = None  # [K, T] int64 on the CPU, or None for a text-only turn

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.speaker}\x00{self.text}\x00".encode())
        if self.codes is not None:
            h.update(self.codes.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class VoicePrompt:
    """The reference a voice is cloned from: one or more segments, usually one clip + transcript."""

    segments: tuple[Segment, ...]
    speaker: int = 0

    @property
    def key(self) -> str:
        """Identity of the prompt's KV state (the warm voice cache is keyed by it)."""
        h = hashlib.sha256()
        for s in self.segments:
            h.update(s.digest().encode())
        return h.hexdigest()


@dataclass
class AudioChunk:
    pcm: np.ndarray  # float32 mono at 24 kHz, frames * 1920 samples
    frames: int
    done: bool = False  # last chunk of this utterance
    stop_reason: str | None = None  # on the last chunk: "eos", "max_length", "aborted"


@dataclass(eq=False)
class Conversation:
    """A voice plus the turns spoken so far; the engine keeps its KV warm in a slot when it can.

    Owned by its caller (a session, or one request); the engine only reads `voice`/`turns`
    and appends each finished turn. `slot` is engine bookkeeping, never touched outside it.
    """

    voice: VoicePrompt
    turns: list[Segment] = field(default_factory=list)
    slot: int | None = None
    position: int = 0  # cache positions filled in `slot`
