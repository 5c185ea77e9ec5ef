"""Built-in voices (alloy, echo, fable, onyx, nova, shimmer): one fixed reference each, made once.

A built-in voice is a stored voice (builtin=True) whose reference is either one of the model
repo's prompt clips or, when the repo ships none, a clip the model generates on first use with a
fixed seed, sentence and speaker id. Either way every later request speaks from the same stored
codes, so a built-in voice sounds the same on every request and after restarts.

References are made lazily, on first use, so start-up never waits on generation; a lock per voice
makes concurrent first uses produce (and store) one reference. The stored voice's description
records how it was made and by which model: when either changes, the old reference is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from csm_voice_api.engine.types import FRAME_SAMPLES, SAMPLE_RATE, Conversation, Sampling, VoicePrompt
from csm_voice_api.errors import VoiceNotFound
from csm_voice_api.voices.store import Voice, VoiceStore

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import AsyncEngine

log = logging.getLogger(__name__)

BUILTIN_NAMES: tuple[str, ...] = ("alloy", "echo", "fable", "onyx", "nova", "shimmer")

# What a generated reference says: varied phonemes and a question, about four seconds of speech.
REFERENCE_TEXT = "Hi there! I'm glad you could make it today. Shall we take a quick look at what's new?"
# Sampling of generated references: a little below the usual 0.9, for a steadier voice.
REFERENCE_TEMPERATURE = 0.7
REFERENCE_TOPK = 50
# The demo model is random and never ends a turn by itself: its "speech" is noise whatever the
# length, so its references stay short and first use stays fast.
DEMO_REFERENCE_MS = 960

# Transcripts of the clips Sesame ships in the csm-1b repo (prompts/*.wav), as its run_csm.py
# uses them. A clip may also carry its transcript in a sibling .txt file, which wins.
KNOWN_TRANSCRIPTS: dict[str, str] = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd start really "
        "early I'd be like okay I'm gonna start revising now and then like you're revising for ages and then "
        "I just like start losing steam I didn't do that for the exam we had recently to be fair that was a "
        "more of a last minute scenario but like yeah I'm trying to like yeah I noticed this yesterday that "
        "like Mondays I sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get into the park, it "
        "just like, everything looks like a computer game and they have all these, like, you know, if, if "
        "there's like a, you know, like in a Mario game, they will have like a question block. And if you "
        "like, you know, punch it, a coin will come out. So like everyone, when they come into the park, "
        "they get like this little bracelet and then you can go punching question blocks around."
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How one built-in voice's reference is made."""

    name: str
    speaker: int  # the model speaker id the reference is spoken as, and the voice speaks as
    clip: Path | None  # a prompt clip, else a reference generated from `seed`
    transcript: str
    seed: int
    reference_ms: int

    def describe(self, model_name: str) -> str:
        """The stored description; a stored reference whose description differs is out of date."""
        if self.clip is not None:
            how = f"prompt clip {self.clip.name}"
        else:
            how = f"generated reference (seed {self.seed}, speaker {self.speaker}, up to {self.reference_ms} ms)"
        return f"Built-in voice '{self.name}': {how}, model {model_name}."


def clip_transcript(clip: Path) -> str:
    txt = clip.with_suffix(".txt")
    if txt.is_file():
        return " ".join(txt.read_text(encoding="utf-8").split())
    return KNOWN_TRANSCRIPTS.get(clip.stem, "")


def recipes(clips: Sequence[Path], *, seed: int, reference_ms: int) -> dict[str, Recipe]:
    """name -> Recipe. Clips go to voices in a fixed order: clips with a transcript first, then by
    file name, so the same repo always gives each voice the same clip."""
    with_text = [(clip_transcript(c), c) for c in clips]
    ordered = sorted(with_text, key=lambda tc: (tc[0] == "", tc[1].name))
    out = {}
    for i, name in enumerate(BUILTIN_NAMES):
        if i < len(ordered):
            text, clip = ordered[i]
            out[name] = Recipe(name, 0, clip, text, seed, reference_ms)
        else:
            out[name] = Recipe(name, i, None, REFERENCE_TEXT, seed, reference_ms)
    return out


# Generated references by engine and recipe: generation is deterministic, so several apps (or
# stores) sharing one engine in a process generate each reference once.
_GENERATED: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[np.ndarray, np.ndarray]]] = (
    weakref.WeakKeyDictionary()
)


class BuiltinVoices:
    """Makes and finds the stored reference of each built-in voice."""

    def __init__(self, store: VoiceStore, engine: AsyncEngine, *, seed: int, reference_ms: int):
        self.store = store
        self.engine = engine
        if getattr(engine, "is_demo", False):
            reference_ms = min(reference_ms, DEMO_REFERENCE_MS)
        self.recipes = recipes(list(getattr(engine, "prompt_clips", []) or []), seed=seed, reference_ms=reference_ms)
        self._locks = {name: asyncio.Lock() for name in BUILTIN_NAMES}

    def __contains__(self, name: str) -> bool:
        return name.strip().lower() in self.recipes

    def speaker(self, name: str) -> int:
        return self.recipes[name.strip().lower()].speaker

    async def voice(self, name: str) -> Voice:
        """The stored voice of built-in `name`, made now if this is its first use."""
        recipe = self.recipes[name.strip().lower()]
        description = recipe.describe(self.engine.model_name)
        stored = await self._stored(recipe.name, description, replace=False)
        if stored is not None:
            return stored
        async with self._locks[recipe.name]:
            stored = await self._stored(recipe.name, description, replace=True)  # made while we waited?
            if stored is not None:
                return stored
            pcm, codes = await self._make(recipe)
            voice = await asyncio.to_thread(
                self.store.create, recipe.name, pcm, transcript=recipe.transcript,
                description=description, codes=codes, builtin=True,
            )  # fmt: skip
            log.info("built-in voice %s stored as %s (%s)", recipe.name, voice.id, description)
            return voice

    async def _stored(self, name: str, description: str, *, replace: bool) -> Voice | None:
        try:
            voice = await asyncio.to_thread(self.store.get, name)
        except VoiceNotFound:
            return None
        if not voice.builtin:
            raise RuntimeError(
                f"A stored voice named '{name}' is not the built-in voice; rename or delete it "
                f"(DELETE /v1/voice-cloning/voices/{voice.id})."
            )
        if voice.description == description:
            return voice
        if not replace:
            return None
        log.info("built-in voice %s is out of date (%s); making it again", name, voice.description)
        await asyncio.to_thread(self.store.delete, voice.id, allow_builtin=True)
        return None

    async def _make(self, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
        if recipe.clip is not None:
            return await self._from_clip(recipe.clip)
        memo = _GENERATED.setdefault(self.engine, {})
        key = (recipe.speaker, recipe.seed, recipe.reference_ms, recipe.transcript)
        if key not in memo:
            memo[key] = await self._generate(recipe)
        return memo[key]

    async def _from_clip(self, clip: Path) -> tuple[np.ndarray, np.ndarray]:
        from csm_voice_api.audio.decode import decode_upload

        max_s = self.engine.max_prompt_frames() * FRAME_SAMPLES / SAMPLE_RATE
        data = await asyncio.to_thread(clip.read_bytes)
        pcm = await asyncio.to_thread(decode_upload, data, max_seconds=max_s, trim=True)
        codes = await self.engine.encode(np.ascontiguousarray(pcm, dtype=np.float32))
        return pcm, codes.numpy()

    async def _generate(self, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
        conv = Conversation(VoicePrompt(segments=(), speaker=recipe.speaker))
        sampling = Sampling(temperature=REFERENCE_TEMPERATURE, topk=REFERENCE_TOPK, seed=recipe.seed,
                            max_audio_ms=recipe.reference_ms)  # fmt: skip
        parts: list[np.ndarray] = []
        try:
            async with aclosing(self.engine.generate(conv, recipe.transcript, sampling=sampling)) as chunks:
                async for chunk in chunks:
                    if chunk.frames:
                        parts.append(chunk.pcm)
        finally:
            self.engine.release(conv)
        # The engine appends the finished turn, codes included: the reference's exact codes,
        # with no re-encoding of its audio.
        codes = conv.turns[-1].codes if conv.turns else None
        if not parts or codes is None or codes.shape[-1] == 0:
            raise RuntimeError(f"The model produced no audio for built-in voice '{recipe.name}'.")
        return np.concatenate(parts).astype(np.float32), codes.numpy()
