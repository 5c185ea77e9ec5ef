"""The scheduler: plain Python that owns request state and slot assignment. No device work:
token rows are small CPU tensors.

Each engine step asks it what to do (`schedule`), the runner does it, and the scheduler updates
request state from what came back (`update`). Tested on CPU with fake runner outputs.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import ContextOverflow, Overloaded
from .types import FRAME_SAMPLES, AudioChunk, Conversation, Sampling, Segment


class Status(enum.IntEnum):
    WAITING = 0  # queued for a slot
    PREFILLING = 1
    RUNNING = 2
    CLOSING = 4  # done speaking; one more step writes its EOS frame's KV
    FINISHED_EOS = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def is_finished(self) -> bool:
        return self >= Status.FINISHED_EOS


STOP_REASONS = {Status.FINISHED_EOS: "eos", Status.FINISHED_LENGTH: "max_length", Status.FINISHED_ABORTED: "aborted"}


@dataclass
class PrefillPiece:
    """Rows to write into a slot: either copied from the voice KV cache, or computed."""

    start: int
    tokens: Tensor | None = None  # [T, K+1] int64
    mask: Tensor | None = None  # [T, K+1] bool
    voice_key: str | None = None  # copy this cached voice KV (length = n) instead of computing
    store_voice_key: str | None = None  # after computing, keep rows [0, start+T) as this voice's KV
    n: int = 0


@dataclass(eq=False)
class Request:
    id: str
    conversation: Conversation
    text: str
    speaker: int
    sampling: Sampling
    seed: int
    chunk_frames: int
    sink: Callable[[AudioChunk | BaseException], None]
    status: Status = Status.WAITING
    slot: int | None = None
    pieces: deque[PrefillPiece] = field(default_factory=deque)
    last_row: tuple[Tensor, Tensor] | None = None  # the first decode input
    start_pos: int = 0  # position of last_row
    max_frames: int = 0
    frames: list[np.ndarray] = field(default_factory=list)  # codes [K] per generated frame
    pcm: list[np.ndarray] = field(default_factory=list)  # not yet delivered
    pcm_frames: int = 0
    final: Status | None = None  # how it ends, once known
    start_step: int = 0  # the first decode step it is in; outputs of earlier steps in its slot are not its own


@dataclass
class Plan:
    """The prompt rows a request needs, given its conversation's state."""

    pieces: list[PrefillPiece]
    last_row: tuple[Tensor, Tensor]
    start_pos: int
    max_frames: int
    rebuilt: bool  # the slot's history was rebuilt from the voice prompt (+ recent turns)


_DECODING = (Status.RUNNING, Status.CLOSING)

RowsFn = Callable[[Segment], tuple[Tensor, Tensor]]


class Planner:
    """Turns a conversation + new text into prefill pieces, keeping within the position window."""

    def __init__(self, segment_rows: RowsFn, max_pos: int, has_voice_kv: Callable[[str], bool]):
        self.segment_rows, self.max_pos, self.has_voice_kv = segment_rows, max_pos, has_voice_kv

    def plan(self, conv: Conversation, text: str, speaker: int, max_frames: int, warm: bool) -> Plan:
        tok, msk = self.segment_rows(Segment(speaker, text, None))
        need = len(tok) + max_frames + 1  # text, frames, and the closing EOS frame
        if warm and conv.position + need <= self.max_pos:
            pieces = [PrefillPiece(conv.position, tok[:-1], msk[:-1])] if len(tok) > 1 else []
            return Plan(pieces, (tok[-1], msk[-1]), conv.position + len(tok) - 1, max_frames, rebuilt=False)
        voice_rows = [self.segment_rows(s) for s in conv.voice.segments]
        voice_len = sum(len(t) for t, _ in voice_rows)
        if voice_len + need > self.max_pos:
            room = self.max_pos - voice_len - len(tok) - 1
            raise ContextOverflow(
                f"The voice prompt ({voice_len} positions) plus the text ({len(tok)}) plus "
                f"{max_frames} audio frames exceed the model's {self.max_pos}-position window; "
                f"{'shorten the text or the reference clip' if room < 1 else f'ask for at most {room * 80} ms of audio'}.",
                param="input",
            )
        # Most recent turns that still fit, oldest first.
        budget = self.max_pos - voice_len - need
        kept: list[tuple[Tensor, Tensor]] = []
        for turn in reversed(conv.turns):
            rows = self.segment_rows(turn)
            if len(rows[0]) > budget:
                break
            kept.insert(0, rows)
            budget -= len(rows[0])
        pieces: list[PrefillPiece] = []
        key = conv.voice.key
        if voice_len and self.has_voice_kv(key):
            pieces.append(PrefillPiece(0, voice_key=key, n=voice_len))
        elif voice_len:
            t, m = torch.cat([r[0] for r in voice_rows]), torch.cat([r[1] for r in voice_rows])
            pieces.append(PrefillPiece(0, t, m, store_voice_key=key))
        pos = voice_len
        for t, m in kept:
            pieces.append(PrefillPiece(pos, t, m))
            pos += len(t)
        if len(tok) > 1:
            pieces.append(PrefillPiece(pos, tok[:-1], msk[:-1]))
        return Plan(pieces, (tok[-1], msk[-1]), pos + len(tok) - 1, max_frames, rebuilt=True)


class Scheduler:
    def __init__(self, planner: Planner, num_slots: int, prefill_chunk: int = 256, max_waiting: int = 1024):
        self.planner = planner
        self.num_slots = num_slots
        self.prefill_chunk = prefill_chunk
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request holding it now
        self.owners: OrderedDict[int, Conversation] = OrderedDict()  # slot -> warm conversation, LRU order
        self.free: list[int] = list(range(num_slots))
        self.to_close: list[int] = []  # rows the runner must switch to feeding the EOS frame
        self.awaiting_audio: list[tuple[int, Request]] = []  # (slot, request) of the last update's kept frames

    # ---- admission -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded("The engine queue is full; retry shortly.", retry_after=1.0)
        self.waiting.append(req)

    def abort(self, req_id: str) -> Request | None:
        for r in list(self.waiting):
            if r.id == req_id:
                self.waiting.remove(r)
                r.status = Status.FINISHED_ABORTED
                return r
        for r in list(self.running.values()):
            if r.id == req_id and not r.status.is_finished:
                self._finish(r, Status.FINISHED_ABORTED)  # the caller parks its row before the next step
                return r
        return None

    def release(self, conv: Conversation) -> int | None:
        """Forget a conversation's warm slot (its turns stay). Returns the freed slot if idle."""
        slot = conv.slot
        if slot is None or self.owners.get(slot) is not conv or slot in self.running:
            return None
        del self.owners[slot]
        conv.slot, conv.position = None, 0
        self.free.append(slot)
        self.free.sort()
        return slot

    def _take_slot(self, conv: Conversation) -> int | None:
        if conv.slot is not None and self.owners.get(conv.slot) is conv:
            self.owners.move_to_end(conv.slot)
            return conv.slot
        if not self.free:  # evict the least recently used idle warm conversation
            idle = next((s for s in self.owners if s not in self.running), None)
            if idle is None:
                return None
            self.release(self.owners[idle])
        slot = self.free.pop(0)  # lowest free index keeps the decode bucket small
        self.owners[slot] = conv
        conv.slot, conv.position = slot, 0
        return slot

    # ---- the step --------------------------------------------------------------------------
    def admit(self) -> list[Request]:
        """Give waiting requests slots and plans. Returns those that failed planning."""
        failed: list[Request] = []
        busy = {r.conversation for r in self.running.values()}
        for req in list(self.waiting):
            if req.conversation in busy:
                continue  # one utterance at a time per conversation, in order
            warm = req.conversation.slot is not None and self.owners.get(req.conversation.slot) is req.conversation
            slot = self._take_slot(req.conversation)
            if slot is None:
                break
            self.waiting.remove(req)
            try:
                plan = self.planner.plan(req.conversation, req.text, req.speaker, req.sampling.max_frames, warm)
            except Exception as exc:  # noqa: BLE001 - delivered to the request, engine goes on
                req.status = Status.FINISHED_ERROR
                req.sink(exc)
                failed.append(req)
                continue
            req.slot, req.status = slot, Status.PREFILLING
            req.pieces, req.last_row = deque(plan.pieces), plan.last_row
            req.start_pos, req.max_frames = plan.start_pos, plan.max_frames
            self.running[slot] = req
            busy.add(req.conversation)
        return failed

    def next_prefill(self) -> tuple[Request, PrefillPiece] | None:
        """One chunk of prefill work (at most prefill_chunk rows), oldest request first."""
        for req in self.running.values():
            if req.status is Status.PREFILLING and req.pieces:
                piece = req.pieces[0]
                if piece.tokens is not None and len(piece.tokens) > self.prefill_chunk:
                    n = self.prefill_chunk
                    head = PrefillPiece(piece.start, piece.tokens[:n], piece.mask[:n])
                    req.pieces[0] = PrefillPiece(piece.start + n, piece.tokens[n:], piece.mask[n:],
                                                 store_voice_key=piece.store_voice_key)
                    return req, head
                return req, req.pieces.popleft()
        return None

    def ready_to_start(self) -> list[Request]:
        return [r for r in self.running.values() if r.status is Status.PREFILLING and not r.pieces]

    def decode_rows(self) -> int:
        """Rows the next decode step must cover (0: no step needed)."""
        live = [s for s, r in self.running.items() if r.status in _DECODING]
        return max(live) + 1 if live else 0

    def update(self, codes: np.ndarray, audible: np.ndarray, pcm: np.ndarray | None, step: int | None = None
               ) -> list[Request]:
        """Apply one decode step's outputs (codes [B, K], audible [B], pcm [B, 1920]).

        With pcm None the audio comes separately (the engine decodes Mimi on another stream): the
        rows whose frame was kept are left in `awaiting_audio` for `audio()`, to be called before the
        next update; a request finishes at least one update after its last kept frame, so its audio
        is always in first. `step` is the index of the step these outputs come from.
        Returns requests that finished this step (their slots may now be parked).
        """
        done: list[Request] = []
        self.awaiting_audio = []
        B = codes.shape[0]
        for slot, req in list(self.running.items()):
            if slot >= B or req.status not in _DECODING or (step is not None and step < req.start_step):
                continue
            if req.status is Status.CLOSING:
                self._finish(req, req.final)
                done.append(req)
            elif not audible[slot]:  # the all-zero frame: the utterance ended
                req.status, req.final = Status.CLOSING, Status.FINISHED_EOS
            else:
                req.frames.append(codes[slot].copy())
                if pcm is not None:
                    self._add_pcm(req, pcm[slot])
                else:
                    self.awaiting_audio.append((slot, req))
                if len(req.frames) >= req.max_frames:
                    # The engine queues step t+1 before it applies step t's outputs, so the step in
                    # flight already feeds this last frame; close the row now and the next step feeds
                    # the EOS frame: the slot's KV matches the turn as recorded (text, frames, EOS).
                    req.status, req.final = Status.CLOSING, Status.FINISHED_LENGTH
                    self.to_close.append(slot)
        return done

    def audio(self, rows: list[tuple[int, Request]], pcm: np.ndarray) -> None:
        """The decoded pcm [B, 1920] of the frames an earlier update left in `awaiting_audio`."""
        for slot, req in rows:
            if not req.status.is_finished:  # aborted or failed meanwhile: nobody is listening
                self._add_pcm(req, pcm[slot])

    def _add_pcm(self, req: Request, pcm: np.ndarray) -> None:
        req.pcm.append(pcm.copy())
        req.pcm_frames += 1
        if req.pcm_frames >= req.chunk_frames:
            self._deliver(req, done=False)

    def _deliver(self, req: Request, done: bool, reason: str | None = None) -> None:
        pcm = np.concatenate(req.pcm) if req.pcm else np.zeros(0, np.float32)
        req.sink(AudioChunk(pcm=pcm, frames=len(pcm) // FRAME_SAMPLES, done=done, stop_reason=reason))
        req.pcm, req.pcm_frames = [], 0

    def _finish(self, req: Request, final: Status) -> None:
        """Record the turn in the conversation (its KV is complete in the slot) and end the request."""
        conv = req.conversation
        if final is Status.FINISHED_ABORTED:
            conv.position = 0  # its slot holds a partial turn: rebuild from the turn list next time
        else:
            K = len(req.last_row[0]) - 1
            codes = np.stack(req.frames, axis=1) if req.frames else np.zeros((K, 0), np.int64)  # [K, T]
            conv.turns.append(Segment(req.speaker, req.text, torch.from_numpy(codes.astype(np.int64))))
            # The last text row sat at start_pos; frames follow it, then the EOS frame.
            conv.position = req.start_pos + len(req.frames) + 2
        req.status = final
        del self.running[req.slot]
        if final is Status.FINISHED_ABORTED:
            self.release(conv)
        self._deliver(req, done=True, reason=STOP_REASONS.get(final))

    def fail_all(self, exc: BaseException) -> list[Request]:
        reqs = list(self.waiting) + list(self.running.values())
        for r in reqs:
            r.status = Status.FINISHED_ERROR
            r.sink(exc)
        self.waiting.clear()
        self.running.clear()
        return reqs

