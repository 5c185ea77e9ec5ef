"""AsyncEngine: the asyncio front of one batched engine, shared by every route.

One thread owns the device. Each turn of its loop is: take commands, schedule, run, update
(vLLM's core step). Requests talk to it through a command inbox and answer through their own
asyncio queues; closing a request's iterator aborts it, freeing its row within one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import EngineDead, Overloaded
from .runner import ModelRunner
from .scheduler import Planner, PrefillPiece, Request, Scheduler, Status
from .types import AudioChunk, Conversation, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "auto"  # "auto" | "demo" | "random" (full size, random: benchmarks) | HF repo id | local dir
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    max_batch: int = 0  # rows (generating or warm sessions); 0: 64 on cuda, 8 on cpu
    voice_cache_size: int = 32  # voice prompts whose KV stays on the device (LRU)
    cuda_graphs: bool = True  # CSM_NO_CUDA_GRAPH=1 also turns them off
    compile: bool = True  # torch.compile the step pieces on cuda (CSM_COMPILE=0 turns it off)
    prefill_chunk: int = 256  # prompt rows per prefill call while other rows are decoding
    mimi: str | None = None  # Mimi weights file; None: resolved with the model
    max_waiting: int = 256  # queued requests before new ones are refused (429)


STEP_EWMA = 0.1  # weight of the newest step in Engine.step_ms: about the last ten steps count


class CodecLanes:
    """Streaming Mimi decoders over row ranges [0, 8), [8, 64), [64, 256), ..., on their own CUDA stream.

    One decoder over all rows would make a lone stream pay for every row's Mimi state; lanes
    let a step decode only the ranges below its bucket, at most a few calls per frame. On CUDA
    a frame's decode runs on a second stream while the next decode step runs on the first:
    `launch` queues it, `collect` (a step later) waits for it. Inputs and outputs are double
    buffered, so a queued decode never reads codes or writes pcm that the other side still uses.
    With `graphs`, each lane's step is one CUDA graph (StreamingDecoder.capture).
    """

    EDGES = (8, 64, 256, 1024)

    def __init__(self, codec: Any, max_batch: int, num_codebooks: int, stack: contextlib.ExitStack,
                 graphs: bool = False):
        edges = [0] + [e for e in self.EDGES if e < max_batch] + [max_batch]
        self.lanes = [(a, b, stack.enter_context(codec.streaming(b - a))) for a, b in zip(edges, edges[1:])]
        self.device = codec.device
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda and graphs:
            with self._on_stream():
                for _, _, dec in self.lanes:
                    dec.capture()
        self.pcm = torch.zeros(max_batch, 1920, device=self.device)
        self.codes = [torch.zeros(max_batch, num_codebooks, dtype=torch.long, device=self.device) for _ in range(2)]
        self.audible = [torch.zeros(max_batch, dtype=torch.bool, device=self.device) for _ in range(2)]
        self.host = [torch.zeros(max_batch, 1920, pin_memory=cuda) for _ in range(2)]
        self.queued: list[tuple[torch.cuda.Event | None, int] | None] = [None, None]
        self.turn = 0
        self.resets = np.zeros(max_batch, dtype=bool)  # rows to reset before their next decode
        self.reset_host = [torch.zeros(max_batch, dtype=torch.bool, pin_memory=cuda) for _ in range(2)]
        self.reset_dev = [torch.zeros(max_batch, dtype=torch.bool, device=self.device) for _ in range(2)]

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def step(self, codes: torch.Tensor, audible: torch.Tensor, bucket: int, reset_rows: np.ndarray | None = None,
             reset: torch.Tensor | None = None) -> torch.Tensor:
        """Decode now, on the current stream: codes [MB, K], audible [MB] -> pcm [bucket, 1920].
        Rows set in `reset_rows` (host) / `reset` (the same mask on the device) start a new stream first."""
        for a, b, dec in self.lanes:
            if a >= bucket:
                break
            fresh = reset[a:b] if reset_rows is not None and reset_rows[a:b].any() else None
            self.pcm[a:b] = dec.step(codes[a:b], audible[a:b], fresh)
        return self.pcm[:bucket]

    def launch(self, codes: torch.Tensor, audible: torch.Tensor, bucket: int) -> int:
        """Queue the decode of this step's frame (rows [0, bucket)); returns the ticket for `collect`."""
        i = self.turn
        assert self.queued[i] is None, "collect the previous frame's audio first"
        rows = next(b for a, b, _ in self.lanes if b >= bucket)  # the lanes it runs cover rows [0, rows)
        # On the step's stream, so ordered after the step; rows past the bucket are parked (not audible).
        self.codes[i][:rows].copy_(codes[:rows])
        self.audible[i][:rows].copy_(audible[:rows])
        reset_rows = None
        if self.resets[:rows].any():
            reset_rows = self.resets.copy()
            reset_rows[rows:] = False
            self.resets[:rows] = False
            self.reset_host[i].copy_(torch.from_numpy(reset_rows))
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_stream():
            if reset_rows is not None:
                self.reset_dev[i].copy_(self.reset_host[i], non_blocking=self.stream is not None)
            pcm = self.step(self.codes[i], self.audible[i], bucket, reset_rows, self.reset_dev[i])
            self.host[i][:bucket].copy_(pcm, non_blocking=self.stream is not None)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.queued[i], self.turn = (event, bucket), 1 - i
        return i

    def collect(self, ticket: int) -> np.ndarray:
        """pcm [bucket, 1920] of a launched frame (valid until the ticket after next is launched)."""
        event, bucket = self.queued[ticket]
        self.queued[ticket] = None
        if event is not None:
            event.synchronize()
        return self.host[ticket][:bucket].numpy()

    def reset(self, slot: int) -> None:
        """Start `slot` on a new stream: done by its lane's next decode, before that frame."""
        self.resets[slot] = True


class VoiceKVCache:
    """Device copies of voice prompts' KV, least recently used dropped first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor:
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str, kv: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = kv
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _resolve(config: EngineConfig) -> tuple[torch.device, torch.dtype, int]:
    dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[config.dtype]
    max_batch = config.max_batch or (64 if device.type == "cuda" else 8)
    return device, dtype, max_batch


class AsyncEngine:
    def __init__(self, loaded: Any, codec: Any, config: EngineConfig):
        from .prompt import segment_rows

        self.config = config
        self.device, self.dtype, self.max_batch = _resolve(config)
        self.loaded = loaded
        self.model_name: str = loaded.name
        self.is_demo: bool = loaded.is_demo
        self.demo_reason: str | None = getattr(loaded, "reason", None)
        self.tokenizer = loaded.tokenizer
        self.prompt_clips: list[Path] = list(getattr(loaded, "prompt_clips", []) or [])
        self.codec = codec
        model = loaded.model.to(self.device, self.dtype).eval()
        self.runner = ModelRunner(model, self.max_batch, self.device, self.dtype, config.cuda_graphs,
                                  config.compile, prefill_rows=config.prefill_chunk)
        self.num_codebooks = model.args.num_codebooks
        self.voice_kv = VoiceKVCache(config.voice_cache_size)
        K = self.num_codebooks
        planner = Planner(lambda seg: segment_rows(seg, self.tokenizer, K), self.runner.max_pos,
                          lambda key: key in self.voice_kv)
        self.scheduler = Scheduler(planner, self.max_batch, config.prefill_chunk, config.max_waiting)
        self.healthy = True
        self.failure: BaseException | None = None
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.frames_total = 0
        self.steps_total = 0
        self.steps_launched = 0
        self._inflight: tuple | None = None  # the step queued last tick, its outputs not yet applied
        self._audio: tuple | None = None  # (codec ticket, kept rows) of the step applied last, not yet handed out
        # Where the engine thread's time goes (exported by /metrics; bench/load.py reads them):
        # busy: ticks that did work; wait: blocked on a step's outputs; codec: blocked on the
        # Mimi decode of a step's frame (its own stream); prefill: prompt forwards.
        self.seconds = {"busy": 0.0, "wait": 0.0, "codec": 0.0, "prefill": 0.0}
        self.prefills = 0
        self.prefill_rows = 0
        # Recent time between decode steps while steps follow each other, ms (an EWMA): every
        # generating stream gets one 80 ms frame per step, so this is what admission compares with
        # real time. None until two steps ran back to back.
        self.step_ms: float | None = None
        self._last_launch: float | None = None

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, config: EngineConfig) -> AsyncEngine:
        """Load model and codec (slow: call from a thread at start-up)."""
        from ..audio.codec import MimiCodec
        from .weights import load_model

        device, dtype, _ = _resolve(config)
        mimi_override = Path(config.mimi) if config.mimi else None
        loaded = load_model(config.model, device=device, dtype=dtype, mimi_weights=mimi_override)
        mimi = mimi_override or loaded.mimi_weights
        # The demo model pairs with a tiny random Mimi; the full-size random model with a full-size one.
        codec = MimiCodec.load(mimi, device=device, tiny=loaded.name == "demo" and mimi is None)
        return cls(loaded, codec, config)

    async def start(self) -> None:
        if self._thread is not None:
            return
        await asyncio.to_thread(self.runner.capture_all)
        self._thread = threading.Thread(target=self._loop, name="csm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ---- public API ------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.scheduler
        return {
            "active": sum(1 for r in s.running.values() if not r.status.is_finished),
            "slots": self.max_batch,
            "free_slots": len(s.free),
            "warm": len(s.owners),
            "queued": len(s.waiting) + sum(1 for c in self._inbox if c[0] == "add"),
            "frames_total": self.frames_total,
            "steps_total": self.steps_total,
            "voice_cache": len(self.voice_kv),
            "seconds": dict(self.seconds),
            "prefills": self.prefills,
            "prefill_rows": self.prefill_rows,
            "step_ms": self.step_ms,
        }

    async def ping(self) -> None:
        """Round-trip a no-op through the engine thread: proves the loop is turning, not just alive."""
        await self._call(lambda: None)

    def max_prompt_frames(self) -> int:
        """Reference-audio frames that leave room for a few turns of text and 20 s of speech."""
        return max(16, self.runner.max_pos - 250 - 64 - 20_000 // 80)

    async def encode(self, pcm: np.ndarray) -> torch.Tensor:
        return await self._call(self.codec.encode, pcm)

    async def generate(self, conversation: Conversation, text: str, *, speaker: int | None = None,
                       sampling: Sampling = Sampling(), chunk_frames: int = 2,
                       request_id: str | None = None) -> AsyncIterator[AudioChunk]:
        self._check_alive()
        if self.stats()["queued"] >= self.config.max_waiting:
            raise Overloaded("The engine is at capacity; retry shortly.", retry_after=1.0)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[AudioChunk | BaseException] = asyncio.Queue()

        def sink(item: AudioChunk | BaseException) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        seed = sampling.seed if sampling.seed is not None else random.getrandbits(31)
        req = Request(
            id=request_id or f"req-{uuid.uuid4().hex[:12]}", conversation=conversation, text=text,
            speaker=conversation.voice.speaker if speaker is None else speaker, sampling=sampling,
            seed=seed, chunk_frames=max(1, chunk_frames), sink=sink,
        )
        self._send("add", req)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.done:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer went away (disconnect, cancel): stop the GPU work
                self.abort(req.id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def release(self, conversation: Conversation) -> None:
        self._send("release", conversation)

    # ---- plumbing --------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.healthy:
            raise EngineDead(f"The speech engine stopped: {self.failure!r}. Restart the server.")

    def _send(self, *cmd: Any) -> None:
        self._inbox.append(cmd)
        self._wake.set()

    async def _call(self, fn: Callable, *args: Any) -> Any:
        """Run fn on the engine thread (it owns the device) and await its result."""
        self._check_alive()
        if self._thread is None:  # not started (tests, CLI before start): run inline
            return fn(*args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_exception(exc) if exc else fut.set_result(result)

        self._send("call", fn, args, lambda r, e: loop.call_soon_threadsafe(done, r, e))
        return await fut

    def _drain_inbox(self) -> None:
        while self._inbox:
            cmd = self._inbox.popleft()
            kind = cmd[0]
            if kind == "add":
                try:
                    self.scheduler.add(cmd[1])
                except Overloaded as exc:
                    cmd[1].sink(exc)
            elif kind == "abort":
                req = self.scheduler.abort(cmd[1])
                if req is not None and req.slot is not None:
                    self.runner.park_row(req.slot)
            elif kind == "release":
                self.scheduler.release(cmd[1])
            elif kind == "call":
                _, fn, args, reply = cmd
                try:
                    reply(fn(*args), None)
                except Exception as exc:  # noqa: BLE001 - returned to the caller
                    reply(None, exc)

    def _loop(self) -> None:
        try:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                if self.device.type == "cuda":
                    # The engine's work on a high-priority stream: Mimi's stream (CodecLanes) and the
                    # watermark workers' streams then fill only the SMs a decode step leaves idle.
                    stack.enter_context(torch.cuda.stream(torch.cuda.Stream(self.device, priority=-1)))
                self._lanes = CodecLanes(self.codec, self.max_batch, self.num_codebooks, stack,
                                         graphs=self.runner.use_graphs)
                while not self._stopping:
                    self._drain_inbox()
                    try:
                        busy = self._tick()
                    except torch.OutOfMemoryError as exc:
                        self._fail_step(exc)
                        continue
                    if not busy:
                        self._wake.wait(0.05)
                        self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - fatal: report, fail everything, go red
            log.exception("engine loop died")
            self.failure, self.healthy = exc, False
            dead = EngineDead(f"The speech engine stopped: {exc!r}. Restart the server.")
            self.scheduler.fail_all(dead)
            while self._inbox:
                cmd = self._inbox.popleft()
                if cmd[0] == "add":
                    cmd[1].sink(dead)
                elif cmd[0] == "call":
                    cmd[3](None, dead)

    def _fail_step(self, exc: BaseException) -> None:
        """A step ran out of device memory: fail only the requests that were in it (queued and other
        prefilling ones go on), free their rows and slots, return cached blocks, keep the loop running."""
        s = self.scheduler
        one = getattr(exc, "csm_request", None)  # a prefill: that request; a decode: the decoding rows
        decoding = (Status.RUNNING, Status.CLOSING)
        if one is not None:
            failed = [(one.slot, one)]
        else:
            failed = [(slot, r) for slot, r in s.running.items() if r.status in decoding]
        log.error("out of device memory in an engine step; failing %d request(s): %s", len(failed), exc)
        err = Overloaded("The GPU ran out of memory while generating this request; retry shortly.", retry_after=2.0)
        err.code = "gpu_out_of_memory"
        for slot, req in failed:
            del s.running[slot]
            req.status = Status.FINISHED_ERROR
            self.runner.park_row(slot)
            s.release(req.conversation)  # its KV may be partial: the next turn rebuilds it
            req.sink(err)
        s.to_close[:] = [slot for slot in s.to_close if slot in s.running]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _tick(self) -> bool:
        """One engine turn: queue the next decode step first, then apply the previous step's outputs
        while it runs, then admit, prefill (a chunk, or all when nothing decodes), start and close rows
        (all queued behind the step, so they take effect from the next one)."""
        started = time.perf_counter()
        s, r = self.scheduler, self.runner
        rows = s.decode_rows()
        launched = self._launch(r.bucket_for(rows)) if rows else None
        if launched is None:
            self._hand_out_audio()  # no step to overlap with: the last frame's audio goes out now
        did = launched is not None or self._inflight is not None
        if self._inflight is not None:
            self._apply(*self._inflight)
        self._inflight = launched
        s.admit()
        decoding = s.decode_rows() > 0
        budget = s.prefill_chunk  # rows computed per tick while others decode: their deadline holds
        while (budget > 0 or not decoding) and (work := s.next_prefill()) is not None:
            self._prefill(*work)
            budget -= 0 if work[1].tokens is None else len(work[1].tokens)  # KV copies are nearly free
            did = True
        for req in s.ready_to_start():
            self._start(req)
        for slot in s.to_close:
            r.close_row(slot)
        s.to_close.clear()
        if did:
            self.seconds["busy"] += time.perf_counter() - started
        return did

    def _prefill(self, req: Request, piece: PrefillPiece) -> None:
        started = time.perf_counter()
        try:
            self._prefill_piece(req, piece)
        except torch.OutOfMemoryError as exc:
            exc.csm_request = req  # type: ignore[attr-defined]  # only this request was in the step
            raise
        finally:
            self.seconds["prefill"] += time.perf_counter() - started
        if piece.tokens is not None:
            self.prefills += 1
            self.prefill_rows += len(piece.tokens)

    def _prefill_piece(self, req: Request, piece: PrefillPiece) -> None:
        if piece.voice_key is not None:
            self.runner.write_kv(req.slot, self.voice_kv.get(piece.voice_key))
            return
        self.runner.prefill(req.slot, piece.tokens, piece.mask, piece.start)
        if piece.store_voice_key is not None:
            self.voice_kv.put(piece.store_voice_key, self.runner.read_kv(req.slot, piece.start + len(piece.tokens)))

    def _start(self, req: Request) -> None:
        tok, msk = req.last_row
        p = req.sampling
        self.runner.start_row(req.slot, tok, msk, req.start_pos, p.temperature, p.topk, p.top_p, req.seed,
                              p.repetition_penalty)
        self._lanes.reset(req.slot)
        req.status = Status.RUNNING
        req.start_step = self.steps_launched  # the step in flight, if any, ran its slot without it

    def _launch(self, bucket: int) -> tuple:
        """Queue a decode step, the copy of its codes to the host, and its Mimi decode (own stream).

        Between the two, the audio of the frame before last goes out: its Mimi decode ran while the
        last step did, so it is (almost always) ready, where the last frame's has only just begun;
        waiting for that one cost the engine 11-13 ms a turn under load (H200, BENCHMARKS.md)."""
        now = time.perf_counter()
        if self._inflight is not None and self._last_launch is not None:  # back to back: a step period
            ms = 1e3 * (now - self._last_launch)
            self.step_ms = ms if self.step_ms is None else self.step_ms + STEP_EWMA * (ms - self.step_ms)
        self._last_launch = now
        codes, audible, event = self.runner.launch(bucket)
        self._hand_out_audio()  # before the codec's next launch, which reuses that frame's buffers
        ticket = self._lanes.launch(self.runner.out, self.runner.audible, bucket)
        self.steps_launched += 1
        return self.steps_launched - 1, codes, audible, event, ticket

    def _apply(self, step: int, codes: torch.Tensor, audible: torch.Tensor, event: Any, ticket: int) -> None:
        """A queued step's outputs: wait for its codes, update requests; its audio goes out with the
        next launch (`_hand_out_audio`)."""
        self._hand_out_audio()  # the previous step's audio comes before this update (it may end requests)
        if event is not None:
            started = time.perf_counter()
            event.synchronize()
            self.seconds["wait"] += time.perf_counter() - started
        codes_h, audible_h = codes.numpy(), audible.numpy()
        s = self.scheduler
        done = s.update(codes_h, audible_h, None, step=step)
        self._audio = (ticket, s.awaiting_audio)
        for req in done:
            self.runner.park_row(req.slot)
        self.frames_total += int(audible_h.sum())
        self.steps_total += 1

    def _hand_out_audio(self) -> None:
        """The pcm of the last applied step's kept frames, to their requests (waits for its Mimi decode)."""
        if self._audio is None:
            return
        (ticket, rows), self._audio = self._audio, None
        started = time.perf_counter()
        pcm = self._lanes.collect(ticket)
        self.seconds["codec"] += time.perf_counter() - started
        if rows:
            self.scheduler.audio(rows, pcm)

    def drain(self) -> None:
        """Apply the step in flight and hand out its audio, if any (engine thread only: benchmarks
        timing the runner directly)."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._apply(*inflight)
        self._hand_out_audio()
