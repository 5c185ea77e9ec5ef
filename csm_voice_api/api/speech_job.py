"""One speech request: text phrases spoken as consecutive turns of one Conversation, encoded as they come."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from csm_voice_api.api import metrics
from csm_voice_api.api.audio_out import response_watermark, watermarked
from csm_voice_api.audio.dsp import tempo
from csm_voice_api.audio.encode import make_encoder
from csm_voice_api.engine.types import FRAME_MS, FRAME_SAMPLES, Conversation, Sampling, VoicePrompt

if TYPE_CHECKING:
    from csm_voice_api.audio.watermark import StreamWatermarker
    from csm_voice_api.engine.engine import AsyncEngine

# Phrases of a long input: long enough for natural prosody, short enough that each turn plus the
# previous one fit the model's window.
PHRASE_MIN_CHARS = 120
PHRASE_MAX_CHARS = 300
# With a speed change, pcm is time-stretched in blocks at least this long: the stretch needs some
# context to sound clean, and block edges are where artefacts could appear.
TEMPO_BLOCK_SAMPLES = 12 * FRAME_SAMPLES
# A turn that has not ended by itself after this long is babbling (CSM can run on past the text):
# it is cut so it cannot eat the whole request's budget. Speech runs at ~15 characters a second.
TURN_BASE_MS = 2_000
TURN_MS_PER_CHAR = 250


def turn_cap_ms(phrase: str) -> int:
    return TURN_BASE_MS + TURN_MS_PER_CHAR * len(phrase)


def split_text(text: str) -> list[str]:
    """Sentence-sized phrases of `text`, in order, none empty."""
    from csm_voice_api.sessions.segmenter import PhraseSegmenter

    seg = PhraseSegmenter(min_chars=PHRASE_MIN_CHARS, max_chars=PHRASE_MAX_CHARS, idle_flush_s=None)
    return seg.push(text, final=True) or [text]


class SpeechJob:
    """Generates and encodes one response. `run()` yields encoded bytes; iterate it once.

    Closing the iterator (client gone) closes the engine's generator, which aborts the GPU work.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        voice: VoicePrompt,
        phrases: list[str],
        *,
        sampling: Sampling,
        fmt: str,
        speed: float = 1.0,
        chunk_frames: int = 2,
        started: float | None = None,
        watermark: StreamWatermarker | None | Literal["app"] = "app",
        route: str = "speech",
    ):
        self.engine = engine
        self.conversation = Conversation(voice)
        self.phrases = phrases
        self.sampling = sampling
        self.fmt = fmt
        self.speed = speed
        self.chunk_frames = chunk_frames
        self.started = time.perf_counter() if started is None else started
        self.frames = 0
        self.input_tokens = sum(len(engine.tokenizer.encode_turn(voice.speaker, p)) for p in phrases)
        self.stop_reason: str | None = None
        # "app": the current app's watermark (api/audio_out.py); None: no watermark (tests, tools).
        self.watermark = response_watermark() if isinstance(watermark, str) else watermark
        self.ttfa_observed = False
        self.route = route  # the TTFA metric's label

    async def run(self) -> AsyncIterator[bytes]:
        encoder = metrics.TimedEncoder(make_encoder(self.fmt))
        try:
            # The watermark goes on last, after any tempo change, which would blur it.
            async with aclosing(watermarked(self._stretched(), self.watermark)) as pcms:
                async for pcm in pcms:
                    if not self.ttfa_observed:
                        # Time to first audio as the client gets it: watermark included.
                        self.ttfa_observed = True
                        metrics.TTFA.labels(route=self.route).observe(time.perf_counter() - self.started)
                    out = encoder.write(pcm)
                    if out:
                        yield out
            out = encoder.flush()
            if out:
                yield out
        finally:
            encoder.close()
            self.engine.release(self.conversation)

    async def _stretched(self) -> AsyncIterator[np.ndarray]:
        stretch = _Tempo(self.speed)
        async with aclosing(self._pcm()) as pcms:
            async for pcm in pcms:
                out = stretch.write(pcm)
                if out.size:
                    yield out
        out = stretch.flush()
        if out.size:
            yield out

    async def _pcm(self) -> AsyncIterator[np.ndarray]:
        budget_ms = self.sampling.max_audio_ms
        for i, phrase in enumerate(self.phrases):
            if budget_ms < FRAME_MS:
                self.stop_reason = "max_length"
                return
            seed = None if self.sampling.seed is None else self.sampling.seed + i
            sampling = replace(self.sampling, max_audio_ms=min(budget_ms, turn_cap_ms(phrase)), seed=seed)
            gen = self.engine.generate(self.conversation, phrase, sampling=sampling, chunk_frames=self.chunk_frames)
            async with aclosing(metrics.engine_timed(gen)) as chunks:
                async for chunk in chunks:
                    if chunk.frames:
                        self.frames += chunk.frames
                        budget_ms -= chunk.frames * FRAME_MS
                        yield chunk.pcm
                    if chunk.done:
                        self.stop_reason = chunk.stop_reason


class _Tempo:
    """Streams pcm through `tempo()` in blocks; speed 1.0 passes chunks straight through."""

    def __init__(self, speed: float):
        self.speed = speed
        self._buf: list[np.ndarray] = []
        self._n = 0

    def write(self, pcm: np.ndarray) -> np.ndarray:
        if self.speed == 1.0:
            return pcm
        self._buf.append(pcm)
        self._n += len(pcm)
        if self._n < TEMPO_BLOCK_SAMPLES:
            return np.zeros(0, dtype=np.float32)
        return self.flush()

    def flush(self) -> np.ndarray:
        if self.speed == 1.0 or not self._n:
            return np.zeros(0, dtype=np.float32)
        block = np.concatenate(self._buf)
        self._buf, self._n = [], 0
        return tempo(block, self.speed).astype(np.float32, copy=False)
