"""Real-time sessions: one cloned voice, one warm engine conversation, text streamed in over time.

A session is opened from a reference clip (or a stored voice), then speaks phrase after phrase as
consecutive turns of its engine `Conversation`: each phrase continues after the previous phrases'
text and audio, which the engine keeps warm in a slot. Idle sessions give their slot back after
`idle_ttl_s` (the context stays, so the next phrase re-warms it) and are forgotten after
`close_ttl_s`. The manager caps how many sessions exist at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from csm_voice_api.engine.types import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioChunk,
    Conversation,
    Sampling,
    Segment,
    VoicePrompt,
)
from csm_voice_api.errors import InvalidInput, Overloaded, SessionNotFound, VoiceNotFound
from csm_voice_api.sessions.segmenter import PhraseSegmenter

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

log = logging.getLogger(__name__)

# The clients of this API send speaker_id=999 by default ("the cloned voice"). CSM knows speaker
# ids as a small integer written into the text ("[0]Hello"), and it was trained on ids 0 and 1;
# so 999 means model speaker 0, the speaker the reference clip is attributed to.
DEFAULT_SPEAKER_ID = 999
MAX_MODEL_SPEAKER = 9

VoiceResolver = Callable[[str], Awaitable[VoicePrompt]]
SESSION_FORMATS = ("wav", "pcm", "mp3", "opus")


def model_speaker(speaker_id: int) -> int:
    """The model's speaker id for a client's `speaker_id` (999, the clients' default, is 0)."""
    if speaker_id == DEFAULT_SPEAKER_ID:
        return 0
    if 0 <= speaker_id <= MAX_MODEL_SPEAKER:
        return speaker_id
    raise InvalidInput(
        f"speaker_id must be {DEFAULT_SPEAKER_ID} (the cloned voice) or 0-{MAX_MODEL_SPEAKER}.", param="speaker_id"
    )


async def clone_prompt(
    engine: AsyncEngine, audio: bytes, context_text: str, speaker: int, *, max_seconds: float
) -> VoicePrompt:
    """A VoicePrompt from an uploaded clip in any common format and its transcript.

    Clips over `max_seconds` are refused (InputTooLong); clips longer than the engine's prompt
    budget are cut to it, so one long reference cannot fill the model's window.
    """
    from csm_voice_api.audio.decode import decode_upload

    pcm = await asyncio.to_thread(decode_upload, audio, max_seconds=max_seconds)
    pcm = pcm[: engine.max_prompt_frames() * FRAME_SAMPLES]
    codes = await engine.encode(np.ascontiguousarray(pcm, dtype=np.float32))
    return VoicePrompt(segments=(Segment(speaker, context_text.strip(), codes),), speaker=speaker)


def voice_store_resolver(store: Any, engine: AsyncEngine) -> VoiceResolver:
    """A resolver over the voice library (csm_voice_api.voices.VoiceStore): stored codes when it
    has them, else its clip encoded now."""

    async def resolve(voice_id: str) -> VoicePrompt:
        voice = await asyncio.to_thread(store.get, voice_id)
        codes = await asyncio.to_thread(store.load_codes, voice)
        if codes is None:
            pcm = await asyncio.to_thread(store.load_audio, voice)
            tensor = await engine.encode(pcm[: engine.max_prompt_frames() * FRAME_SAMPLES])
        else:
            tensor = torch.from_numpy(np.asarray(codes, dtype=np.int64))
        return VoicePrompt(segments=(Segment(0, voice.transcript, tensor),), speaker=0)

    return resolve


class SessionState(enum.Enum):
    WARM = "warm"  # idle; its conversation may hold a warm engine slot
    SPEAKING = "speaking"  # a phrase is being generated
    COLD = "cold"  # idle past the TTL: slot released, context kept; the next phrase re-warms it
    CLOSED = "closed"  # closed or expired for good; every use raises SessionNotFound


@dataclass(frozen=True)
class SessionConfig:
    max_sessions: int = 32
    idle_ttl_s: float = 60.0  # idle seconds before the warm slot is released
    close_ttl_s: float = 1800.0  # idle seconds (no connection attached) before the session is closed
    sweep_interval_s: float = 1.0
    phrase_max_ms: int = 20_000  # longest audio one phrase may produce
    min_chars: int = 20  # phrase segmentation, see PhraseSegmenter
    max_chars: int = 250
    idle_flush_s: float | None = 1.0


class Session:
    """One session's state. Owned by its SessionManager; at most one text stream speaks at a time."""

    def __init__(self, id: str, voice: VoicePrompt, sampling: Sampling, output_format: str,
                 segmenter: PhraseSegmenter, now: float):
        self.id = id
        self.conversation = Conversation(voice)
        self.sampling = sampling
        self.output_format = output_format
        self.segmenter = segmenter
        self.state = SessionState.WARM
        self.created_at = now
        self.last_active = now
        self.segments = 0  # phrases started so far: the index of the next segment
        self.frames = 0  # audio frames generated so far
        self.attached = 0  # live connections (a WebSocket, a stream-text request)
        self.websocket = False  # a WebSocket owns the text stream now
        self.lock = asyncio.Lock()  # serialises text streams, so phrases stay in order
        self.closed = asyncio.Event()

    @property
    def speaker(self) -> int:
        return self.conversation.voice.speaker

    def next_segment(self) -> int:
        """Index of a phrase about to be spoken (numbered from 0 over the session's life)."""
        self.segments += 1
        return self.segments - 1

    def check_open(self) -> None:
        if self.state is SessionState.CLOSED:
            raise SessionNotFound(f"Session '{self.id}' is closed; open a new one.", param="session_id")

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "state": self.state.value,
            "output_format": self.output_format,
            "segments": self.segments,
            "audio_ms": self.frames * FRAME_SAMPLES * 1000 // SAMPLE_RATE,
            "pending_text": self.segmenter.pending,
        }


class SessionManager:
    """Opens, finds, expires and closes sessions; `speak` runs one phrase of a session."""

    def __init__(self, engine: AsyncEngine, config: SessionConfig = SessionConfig(), *,
                 voice_resolver: VoiceResolver | None = None, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.config = config
        self.voice_resolver = voice_resolver
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._opening = 0  # sessions being opened (clip being encoded): counted against the cap
        self._sweeper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for sid in list(self._sessions):
            self.close(sid)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one bad session
                log.exception("session expiry failed")

    # ---- open / get / close ------------------------------------------------------------------
    async def open(self, *, voice: VoicePrompt | None = None, voice_id: str | None = None,
                   sampling: Sampling = Sampling(), output_format: str = "wav") -> Session:
        """A new session speaking with `voice`, or with the stored voice `voice_id`.

        Raises Overloaded when `max_sessions` are open, VoiceNotFound for an unknown voice id.
        """
        if output_format not in SESSION_FORMATS:
            raise InvalidInput(f"output_format must be one of {', '.join(SESSION_FORMATS)}.", param="output_format")
        self._check_capacity()
        self._opening += 1
        try:
            if voice is None:
                voice = await self._resolve(voice_id)
        finally:
            self._opening -= 1
        self._check_capacity()
        c = self.config
        segmenter = PhraseSegmenter(c.min_chars, c.max_chars, c.idle_flush_s)
        session = Session(f"sess_{secrets.token_hex(12)}", voice, sampling, output_format, segmenter, self.clock())
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.state is SessionState.CLOSED:
            raise SessionNotFound(
                f"No session '{session_id}': it was closed, expired, or never opened. "
                "Open one with POST /v1/streaming-session.",
                param="session_id",
            )
        return session

    def close(self, session_id: str) -> Session:
        """Close a session: its slot is freed now and any connection attached to it ends."""
        session = self.get(session_id)
        del self._sessions[session_id]
        session.state = SessionState.CLOSED
        session.segmenter.clear()
        session.closed.set()
        self.engine.release(session.conversation)
        return session

    def list(self) -> list[Session]:
        return list(self._sessions.values())

    async def _resolve(self, voice_id: str | None) -> VoicePrompt:
        if not voice_id:
            raise InvalidInput("Send audio_file (a reference clip) or voice_id.", param="audio_file")
        if self.voice_resolver is None:
            raise VoiceNotFound(f"Unknown voice '{voice_id}': no voice library is configured.", param="voice_id")
        return await self.voice_resolver(voice_id)

    def _check_capacity(self) -> None:
        if len(self._sessions) + self._opening >= self.config.max_sessions:
            raise Overloaded(
                f"{self.config.max_sessions} sessions are open (CSM_SESSION_MAX). Close one with "
                "DELETE /v1/streaming-session/{id}, or retry once idle sessions expire.",
                retry_after=min(self.config.close_ttl_s, 30.0),
            )

    # ---- expiry ------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> tuple[list[str], list[str]]:
        """Release idle sessions' slots past `idle_ttl_s`; close unattached ones past `close_ttl_s`.

        Returns (ids cooled, ids closed).
        """
        now = self.clock() if now is None else now
        cooled, closed = [], []
        for s in list(self._sessions.values()):
            if s.state is SessionState.SPEAKING:
                continue
            idle = now - s.last_active
            if s.attached == 0 and idle >= self.config.close_ttl_s:
                self.close(s.id)
                closed.append(s.id)
            elif s.state is SessionState.WARM and idle >= self.config.idle_ttl_s:
                self.engine.release(s.conversation)
                s.state = SessionState.COLD
                cooled.append(s.id)
        return cooled, closed

    # ---- speaking ----------------------------------------------------------------------------
    async def speak(self, session: Session, phrase: str, *, chunk_frames: int = 2, max_audio_ms: int | None = None,
                    request_id: str | None = None) -> AsyncIterator[AudioChunk]:
        """Speak `phrase` as the session's next turn; yields the engine's chunks.

        `max_audio_ms` lowers the session's per-phrase cap for this phrase. Closing the iterator
        early aborts the GPU work. With a seed in the session's sampling, the turn after n spoken
        turns uses seed + n, so a session's audio does not depend on what else runs.
        """
        session.check_open()
        sampling = session.sampling
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + len(session.conversation.turns))
        if max_audio_ms is not None:
            sampling = replace(sampling, max_audio_ms=max(80, min(sampling.max_audio_ms, max_audio_ms)))
        session.state = SessionState.SPEAKING
        try:
            gen = self.engine.generate(session.conversation, phrase, sampling=sampling,
                                       chunk_frames=chunk_frames, request_id=request_id)
            async with aclosing(gen) as chunks:
                async for chunk in chunks:
                    session.frames += chunk.frames
                    yield chunk
        finally:
            session.last_active = self.clock()
            if session.state is SessionState.SPEAKING:
                session.state = SessionState.WARM
            elif session.state is SessionState.CLOSED:
                # Closed mid-phrase: the engine ignored close()'s release while the row was busy.
                self.engine.release(session.conversation)

    def touch(self, session: Session) -> None:
        session.last_active = self.clock()
