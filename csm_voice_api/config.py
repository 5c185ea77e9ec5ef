"""Settings read once at the edge (env `CSM_*`, `.env`), turned into frozen values handed inward."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from csm_voice_api.engine.engine import EngineConfig
    from csm_voice_api.engine.types import Sampling
    from csm_voice_api.sessions.manager import SessionConfig


@dataclass(frozen=True)
class Limits:
    """Per-request limits the API enforces before any work reaches the engine."""

    max_body_bytes: int
    max_text_chars: int
    max_reference_seconds: float
    max_upload_bytes: int
    max_output_ms: int


@dataclass(frozen=True)
class OutputRetention:
    """How many generated files the store keeps, and for how long."""

    max_files: int
    max_age_s: float


class Settings(BaseSettings):
    """Every knob of the server. Env `CSM_<FIELD>` (e.g. CSM_PORT=9000) or a `.env` file."""

    model_config = SettingsConfigDict(env_prefix="CSM_", env_file=".env", extra="ignore")

    # Interface uvicorn binds; 0.0.0.0 exposes the server to the network.
    host: str = "127.0.0.1"
    # TCP port of the HTTP/WebSocket server.
    port: int = Field(8000, ge=1, le=65535)
    # "auto" (sesame/csm-1b if its weights load, else the demo model), "demo", an HF repo id or a local dir.
    model: str = "auto"
    # "auto" picks cuda when available, else cpu; or "cuda", "cuda:1", "cpu".
    device: str = "auto"
    # "auto" is bfloat16 on cuda and float32 on cpu; or "bfloat16", "float16", "float32".
    dtype: str = "auto"
    # Concurrent generating slots on the device; 0 lets the engine pick (64 on cuda, 8 on cpu).
    max_batch: int = Field(0, ge=0)
    # Warm voice prompts (KV state) kept on the device, least recently used evicted first.
    voice_cache_size: int = Field(32, ge=0)
    # Capture the decode step in CUDA graphs; turn off to debug (CSM_NO_CUDA_GRAPH=1 also does).
    cuda_graphs: bool = True
    # At start-up, speak one short utterance through the whole output path (engine, codec,
    # watermark on every worker, an encoder) before /ready answers 200, so first requests do not
    # pay first-use costs; false makes /ready answer as soon as the engine is up.
    warmup: bool = True
    # Root for stored voices and generated audio (outputs/ beneath it).
    data_dir: Path = Path("data")
    # Generated files kept in data_dir/outputs before the oldest are deleted.
    output_retention_files: int = Field(256, ge=1)
    # Age in seconds after which a generated file is deleted.
    output_retention_seconds: float = Field(3600.0, gt=0)
    # Bearer keys accepted on /v1 routes (comma separated); empty means no authentication.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Largest request body accepted, in bytes; larger bodies get 413 before they are read in full.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Longest `input` text accepted by /v1/audio/speech, in characters (OpenAI's limit is 4096).
    max_text_chars: int = Field(4096, ge=1)
    # Longest voice reference clip accepted, in seconds; longer clips are refused, not cut.
    max_reference_seconds: float = Field(30.0, gt=0)
    # Largest uploaded (decoded from base64 or multipart) audio file, in bytes.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Most audio one request may generate, in milliseconds.
    max_output_ms: int = Field(90_000, ge=80)
    # Frames (80 ms each) per streamed chunk: smaller is lower latency, larger is less overhead.
    chunk_frames: int = Field(2, ge=1, le=64)
    # Mark every generated audio with Sesame's inaudible SilentCipher watermark; false turns it off.
    watermark: bool = True
    # Private 5-byte watermark key, e.g. "17,42,3,99,250"; unset uses the public CSM-1B key.
    watermark_key: str | None = None
    # Folder with the sony/silentcipher 44.1k checkpoint; unset reads the HF cache or downloads.
    watermark_weights: Path | None = None
    # Responses are watermarked in pieces this long (each re-encodes the message period it falls
    # in so far); 0 means one engine chunk, so nothing is held back. 975 (one message period)
    # costs least compute but holds streamed audio back up to a second.
    watermark_stream_chunk_ms: int = Field(0, ge=0, le=975)
    # Each streamed piece is this much longer than the one before, up to a message period: the
    # first audio waits for one small piece, a long stream costs about one encode per period.
    # 1 keeps every piece one chunk (most compute). Streams must outpace real time by this factor.
    watermark_stream_growth: float = Field(1.5, ge=1.0, le=4.0)
    # Threads that hand response pieces to the batched watermark encoder, which marks the pieces
    # of all waiting streams in one batch: at most this many streams' pieces share a batch. They
    # mostly wait; apart from asyncio's default pool.
    watermark_workers: int = Field(64, ge=1, le=512)
    # Default sampling temperature when a request gives none (<= 0 is greedy).
    temperature: float = Field(0.9, ge=0.0, le=5.0)
    # Default top-k when a request gives none.
    topk: int = Field(50, ge=1)

    # ---- Security and overload (read by csm_voice_api/api/security.py and admission.py) ----
    # Origins allowed to call the API from a browser (CORS), comma separated; "*" allows any. Empty: no CORS.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Origins allowed to open WebSockets, besides the server's own; "*" allows any. Clients without Origin pass.
    ws_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Serve /metrics without an API key (Prometheus scrapers usually send none).
    public_metrics: bool = True
    # Requests per minute per API key (per client address when no keys are set); 0 turns the limit off.
    rate_limit_per_minute: int = Field(0, ge=0)
    # Requests a key may make at once before the per-minute rate applies; 0 means rate_limit_per_minute.
    rate_limit_burst: int = Field(0, ge=0)
    # Generations at once: HTTP ones in flight (speech, voice-clone, stream-text, session creation...)
    # plus connected streaming WebSockets; 0 means the engine's slot count.
    max_inflight: int = Field(0, ge=0)
    # Refuse new generations (429) while a decode step takes longer than this, in ms: a step is one
    # 80 ms frame of every stream, so 80 is real time, and below it streams have headroom. Unset:
    # 35 on a GPU, off on CPU (the demo model); 0 turns it off.
    realtime_step_ms: float | None = Field(None, ge=0)
    # Refuse new generations (429) while a stream accepted earlier stalled longer than this within
    # the last 5 s, in ms (its listener, playing in real time, waited that long for audio; a client
    # reading slowly does not count). Unset: 200 on a GPU (the stall p99 bench/load.py holds a level
    # to), off on CPU (the demo model); 0 turns it off.
    realtime_stall_ms: float | None = Field(None, ge=0)
    # Seconds a client may leave a response or socket unread before it is dropped and its slot freed.
    send_timeout_s: float = Field(30.0, gt=0)
    # Largest WebSocket message accepted, in bytes; larger messages close the socket with 1009.
    ws_max_message_bytes: int = Field(64 * 1024, ge=1024)
    # Python's GIL switch interval in the server process, in ms (Python's default is 5): how long
    # the engine thread can wait to win the GIL back from the event loop after each device call.
    gil_switch_ms: float = Field(1.0, gt=0, le=100)
    # On SIGTERM: seconds in-flight streams get to finish before sockets close with 1001 and the server exits.
    shutdown_grace_s: float = Field(30.0, ge=0)

    @field_validator("api_keys", "cors_origins", "ws_origins", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        # Env values arrive as one string; a list in code stays a list.
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    def engine_config(self) -> EngineConfig:
        from csm_voice_api.engine.engine import EngineConfig

        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            max_batch=self.max_batch,
            voice_cache_size=self.voice_cache_size,
            cuda_graphs=self.cuda_graphs,
        )

    def limits(self) -> Limits:
        return Limits(
            max_body_bytes=self.max_body_bytes,
            max_text_chars=self.max_text_chars,
            max_reference_seconds=self.max_reference_seconds,
            max_upload_bytes=self.max_upload_bytes,
            max_output_ms=self.max_output_ms,
        )

    def retention(self) -> OutputRetention:
        return OutputRetention(max_files=self.output_retention_files, max_age_s=self.output_retention_seconds)

    def watermark_stream_chunk_s(self) -> float:
        ms = self.watermark_stream_chunk_ms or self.chunk_frames * 80
        return min(ms, 975) / 1000

    def sampling(self) -> Sampling:
        from csm_voice_api.engine.types import Sampling

        return Sampling(temperature=self.temperature, topk=self.topk, top_p=self.top_p,
                        repetition_penalty=self.repetition_penalty, max_audio_ms=self.max_output_ms)

    # ---- Real-time sessions (/v1/streaming-session, /v1/ws/stream-text, /v1/stream-text) ----
    # Owned by the sessions helper; read by csm_voice_api/api/sessions.py.
    # Sessions open at once; opening another answers 429 until one closes or expires.
    session_max: int = Field(32, ge=1)
    # Idle seconds before a session's warm engine slot is released (it re-warms on its next text).
    session_idle_ttl_s: float = Field(60.0, gt=0)
    # Idle seconds, with no connection attached, before a session is closed and forgotten.
    session_close_ttl_s: float = Field(1800.0, gt=0)
    # Longest audio one phrase of a session may produce, in milliseconds.
    session_phrase_max_ms: int = Field(20_000, ge=80)
    # A phrase ends at punctuation once it holds this many characters...
    session_min_chars: int = Field(20, ge=0)
    # ...or at a word boundary before it would hold more than this many.
    session_max_chars: int = Field(250, ge=1)
    # Seconds without new text after which buffered text is spoken anyway; 0 turns this off.
    session_idle_flush_s: float = Field(1.0, ge=0)

    def session_config(self) -> SessionConfig:
        from csm_voice_api.sessions.manager import SessionConfig

        return SessionConfig(
            max_sessions=self.session_max,
            idle_ttl_s=self.session_idle_ttl_s,
            close_ttl_s=self.session_close_ttl_s,
            phrase_max_ms=min(self.session_phrase_max_ms, self.max_output_ms),
            min_chars=self.session_min_chars,
            max_chars=self.session_max_chars,
            idle_flush_s=self.session_idle_flush_s or None,
        )

    # ---- Voice library (stored and built-in voices; /v1/voice-cloning, /v1/audio/voices) ----
    # Owned by the voice-library helper; read by csm_voice_api/api/voices.py.
    # Seed of the reference each built-in voice (alloy, echo, ...) generates on first use when the
    # model ships no prompt clips; changing it changes how those voices sound (they are remade).
    builtin_voice_seed: int = Field(20250313, ge=0, le=2**31)
    # Longest such generated reference, in milliseconds (the model usually ends the sentence sooner).
    builtin_voice_ms: int = Field(8000, ge=400, le=30_000)

    @property
    def voices_dir(self) -> Path:
        return self.data_dir / "voices"

    # ---- Compatibility routes, scenes, job queue, remote audio (api/compat.py, scenes.py, queue.py, jobs/) ----
    # Default nucleus (top-p) sampling mass when a request gives none; 1.0 turns it off.
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Default repetition penalty on recently generated audio codes; 1.0 turns it off.
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)
    # Most turns one scene may have.
    scene_max_turns: int = Field(64, ge=1)
    # Queued jobs run at once; 0 accepts and stores jobs but runs none (maintenance).
    queue_workers: int = Field(1, ge=0)
    # Queued (not yet started) jobs accepted at once; more answer 429.
    queue_max_pending: int = Field(1000, ge=1)
    # Webhook deliveries tried per finished job before giving up.
    webhook_max_attempts: int = Field(5, ge=1, le=20)
    # Delay before the first webhook retry, in seconds; it doubles per attempt up to webhook_backoff_max_s.
    webhook_backoff_s: float = Field(1.0, ge=0.0)
    # Longest delay between webhook retries, in seconds.
    webhook_backoff_max_s: float = Field(60.0, ge=0.0)
    # Seconds one webhook POST or one remote audio fetch may take in all.
    fetch_timeout_s: float = Field(20.0, gt=0)
    # Most bytes one remote audio fetch (a scene's audio_url) may return.
    fetch_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Addresses or networks (comma separated, e.g. "127.0.0.1,10.0.0.0/8") that audio_url fetches
    # and webhooks may reach besides public internet addresses; empty: public addresses only.
    fetch_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("fetch_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, v: object) -> object:
        if isinstance(v, str):
            return [h.strip() for h in v.split(",") if h.strip()]
        return v

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"
