"""Voice library: metadata in SQLite (WAL), audio and Mimi codes as files beside it.

Crash safety rests on one ordering: files are written atomically (temp file, fsync, rename, fsync
dir) before the row that names them is committed, and rows are deleted before their files. A
crash can therefore leave only files without a row, which `recover()` removes at the next open.
File names carry the content checksum for codes, so replacing codes never rewrites a file that a
committed row points at.

Audio is 16-bit PCM WAV (stdlib `wave`): half the size of float32, playable and checkable with any
tool, and its quantisation noise (-96 dB) is far below what Mimi's encoder resolves. Samples
beyond [-1, 1] are clipped. Codes are int16 .npy (Mimi codebooks have 2048 entries).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from csm_voice_api.errors import InvalidInput, VoiceNotFound

log = logging.getLogger(__name__)

SAMPLE_RATE = 24_000
MAX_NAME_CHARS = 64
_TMP_PREFIX = ".tmp-"
_RESTORE_HINT = "Stop the server and restore the file from a backup, or move it away to start empty."
_ID_RE = re.compile(r"voice_[0-9a-f]{16}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    transcript TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    sample_rate INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    audio_sha256 TEXT NOT NULL,
    codes_sha256 TEXT,
    builtin INTEGER NOT NULL
)
"""
_COLUMNS = (
    "id, name, description, transcript, created_at, sample_rate, duration_s, audio_sha256, codes_sha256, builtin"
)


@dataclass(frozen=True)
class Voice:
    """One stored voice. `codes_sha256` is None when no Mimi codes are stored for it."""

    id: str
    name: str
    description: str
    transcript: str
    created_at: int
    sample_rate: int
    duration_s: float
    audio_sha256: str
    codes_sha256: str | None = None
    builtin: bool = False

    @property
    def has_codes(self) -> bool:
        return self.codes_sha256 is not None

    @property
    def audio_file(self) -> str:
        return f"{self.id}.wav"

    @property
    def codes_file(self) -> str | None:
        return None if self.codes_sha256 is None else _codes_name(self.id, self.codes_sha256)


@dataclass
class RecoveryReport:
    """What `recover()` removed; all empty after a clean shutdown."""

    dropped_rows: list[str] = field(default_factory=list)  # voice ids whose audio was missing/bad
    cleared_codes: list[str] = field(default_factory=list)  # voice ids whose codes were missing/bad
    removed_files: list[str] = field(default_factory=list)  # orphan and temp file names

    @property
    def clean(self) -> bool:
        return not (self.dropped_rows or self.cleared_codes or self.removed_files)


class StoreCorrupt(RuntimeError):
    """The SQLite database failed its integrity check: an operator must restore or remove it."""


class VoiceStore:
    """Persistent voice library under `data_dir` (voices.db + files/). Thread-safe.

    One process owns a directory at a time (an exclusive flock on data_dir/.lock); `close()` or
    the context manager releases it. Opening runs `recover()`.
    """

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_dir_lock(self.data_dir / ".lock")
        self._lock = threading.Lock()  # guards the connection and _inflight
        self._inflight: set[str] = set()  # file names written but not yet committed
        try:
            self._db = sqlite3.connect(self.data_dir / "voices.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a returned create() survives power loss
            self._db.execute(_SCHEMA)
            self.last_recovery = self.recover()
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreCorrupt(f"Cannot open {self.data_dir / 'voices.db'}: {e}. {_RESTORE_HINT}") from e
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> VoiceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database and release the directory lock. Idempotent."""
        with self._lock:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


    def get(self, id_or_name: str) -> Voice:
        """The voice with this id, else with this name (case-insensitive); raises VoiceNotFound."""
        key = id_or_name.strip()
        with self._lock:
            row = self._conn().execute(f"SELECT {_COLUMNS} FROM voices WHERE id = ?", (key,)).fetchone()
            if row is None:
                q = f"SELECT {_COLUMNS} FROM voices WHERE name_key = ?"
                row = self._conn().execute(q, (_name_key(key),)).fetchone()
        if row is None:
            raise VoiceNotFound(
                f"No voice with id or name '{id_or_name}'. List the stored voices with GET /v1/voices, "
                "or create one by uploading a clip.",
                param="voice",
            )
        return _voice(row)

    def list(self) -> list[Voice]:
        """All voices, oldest first."""
        with self._lock:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM voices ORDER BY created_at, rowid").fetchall()
        return [_voice(r) for r in rows]

    def load_audio(self, voice: Voice) -> np.ndarray:
        """The voice's reference clip: float32 mono at 24 kHz, in [-1, 1]."""
        data = self._read_checked(voice, voice.audio_file, voice.audio_sha256)
        return _wav_to_pcm(data)

    def load_codes(self, voice: Voice) -> np.ndarray | None:
        """The stored Mimi codes [K, T] as int64, or None if the voice has none."""
        if voice.codes_file is None or voice.codes_sha256 is None:
            return None
        data = self._read_checked(voice, voice.codes_file, voice.codes_sha256)
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64)


    def create(
        self,
        name: str,
        pcm: np.ndarray,
        transcript: str = "",
        description: str = "",
        codes: np.ndarray | None = None,
        builtin: bool = False,
    ) -> Voice:
        """Store a new voice from a float32 mono 24 kHz clip; raises InvalidInput (duplicate name...)."""
        name = _check_name(name)
        pcm = _check_pcm(pcm)
        wav = _pcm_to_wav(pcm)
        voice = Voice(
            id="voice_" + secrets.token_hex(8),
            name=name,
            description=description.strip(),
            transcript=transcript.strip(),
            created_at=int(time.time()),
            sample_rate=SAMPLE_RATE,
            duration_s=len(pcm) / SAMPLE_RATE,
            audio_sha256=_sha256(wav),
            builtin=builtin,
        )
        self._check_name_free(name)  # early, cheap refusal; the UNIQUE index settles races
        files = {voice.audio_file: wav}
        if codes is not None:
            npy = _codes_to_npy(codes)
            voice = replace(voice, codes_sha256=_sha256(npy))
            files[voice.codes_file] = npy  # type: ignore[index]
        # An exception inside _writing removes the files it wrote.
        with self._writing(files), self._lock:
            try:
                self._conn().execute(
                    f"INSERT INTO voices (name_key, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (_name_key(name), *_row(voice)),
                )
            except sqlite3.IntegrityError:
                raise InvalidInput(_duplicate_message(name), param="name") from None
        return voice

    def set_codes(self, voice_id: str, codes: np.ndarray | None) -> Voice:
        """Replace (or with None, drop) a voice's Mimi codes; returns the updated voice."""
        npy = None if codes is None else _codes_to_npy(codes)
        sha = None if npy is None else _sha256(npy)
        current = self._by_id(voice_id)
        if current.codes_sha256 == sha:
            return current  # never rewrite a file a committed row points at
        files = {} if npy is None or sha is None else {_codes_name(voice_id, sha): npy}
        with self._writing(files), self._lock:
            # Read and update under one lock hold, so the file replaced is the one the row named.
            old = self._by_id_locked(voice_id)
            self._conn().execute("UPDATE voices SET codes_sha256 = ? WHERE id = ?", (sha, voice_id))
        if old.codes_file is not None and old.codes_file not in files:
            self._remove_files([old.codes_file])
        return replace(old, codes_sha256=sha)

    def delete(self, voice_id: str, *, allow_builtin: bool = False) -> None:
        """Remove a voice (row first, then its files). Built-in voices need allow_builtin=True."""
        with self._lock:
            voice = self._by_id_locked(voice_id)
            if voice.builtin and not allow_builtin:
                raise InvalidInput(f"Voice '{voice.name}' is built in and cannot be deleted.", param="voice")
            self._conn().execute("DELETE FROM voices WHERE id = ?", (voice_id,))
        self._remove_files([n for n in (voice.audio_file, voice.codes_file) if n is not None])


    def recover(self) -> RecoveryReport:
        """Make rows and files agree: drop rows with missing/bad audio, clear missing/bad codes,
        delete orphan and temp files. Raises StoreCorrupt if SQLite's integrity check fails."""
        report = RecoveryReport()
        with self._lock:
            db = self._conn()
            check = db.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                raise StoreCorrupt(
                    f"{self.data_dir / 'voices.db'} failed PRAGMA integrity_check ({check[:3]}). {_RESTORE_HINT}"
                )
            for voice in [_voice(r) for r in db.execute(f"SELECT {_COLUMNS} FROM voices")]:
                if not _file_matches(self.files_dir / voice.audio_file, voice.audio_sha256):
                    db.execute("DELETE FROM voices WHERE id = ?", (voice.id,))
                    report.dropped_rows.append(voice.id)
                elif voice.codes_file and not _file_matches(self.files_dir / voice.codes_file, voice.codes_sha256):
                    db.execute("UPDATE voices SET codes_sha256 = NULL WHERE id = ?", (voice.id,))
                    report.cleared_codes.append(voice.id)
            keep = set()
            for voice in [_voice(r) for r in db.execute(f"SELECT {_COLUMNS} FROM voices")]:
                keep.update(n for n in (voice.audio_file, voice.codes_file) if n is not None)
            for path in self.files_dir.iterdir():
                if path.name not in keep and _target_name(path.name) not in self._inflight:
                    path.unlink(missing_ok=True)
                    report.removed_files.append(path.name)
        if report.removed_files:
            _fsync_dir(self.files_dir)
        if not report.clean:
            log.warning("voice store %s recovered: %s", self.data_dir, report)
        return report


    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("VoiceStore is closed.")
        return self._db

    def _by_id(self, voice_id: str) -> Voice:
        with self._lock:
            return self._by_id_locked(voice_id)

    def _by_id_locked(self, voice_id: str) -> Voice:
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM voices WHERE id = ?", (voice_id,)).fetchone()
        if row is None:
            raise _not_found(voice_id)
        return _voice(row)

    def _check_name_free(self, name: str) -> None:
        with self._lock:
            taken = self._conn().execute("SELECT 1 FROM voices WHERE name_key = ?", (_name_key(name),)).fetchone()
        if taken:
            raise InvalidInput(_duplicate_message(name), param="name")

    @contextmanager
    def _writing(self, files: dict[str, bytes]) -> Iterator[None]:
        """Write files atomically, sparing them from recover() until the caller's row is settled."""
        with self._lock:
            self._inflight.update(files)
        try:
            for name, data in files.items():
                _write_atomic(self.files_dir, name, data)
            if files:
                _fsync_dir(self.files_dir)  # the renames are durable before the row commits
            yield
        except BaseException:
            self._remove_files(list(files))
            raise
        finally:
            with self._lock:
                self._inflight.difference_update(files)

    def _read_checked(self, voice: Voice, name: str, sha256: str) -> bytes:
        try:
            data = (self.files_dir / name).read_bytes()
        except FileNotFoundError:
            raise VoiceNotFound(f"Voice '{voice.name}' was deleted.", param="voice") from None
        if _sha256(data) != sha256:
            raise RuntimeError(
                f"{self.files_dir / name} does not match its checksum: the voice store is damaged. "
                "Restart the server to drop damaged voices, then re-create the voice."
            )
        return data

    def _remove_files(self, names: list[str]) -> None:
        for name in names:
            (self.files_dir / name).unlink(missing_ok=True)
        _fsync_dir(self.files_dir)


def _write_atomic(directory: Path, name: str, data: bytes) -> None:
    tmp = directory / f"{_TMP_PREFIX}{secrets.token_hex(6)}-{name}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _target_name(name: str) -> str:
    """The final name a temp file is being written for (`name` itself for other files)."""
    if name.startswith(_TMP_PREFIX):
        return name[len(_TMP_PREFIX) + 13 :]  # ".tmp-" + 12 hex + "-"
    return name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _acquire_dir_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(
            f"The voice store at {path.parent} is open in another VoiceStore or process; "
            "close it first (one server per data directory)."
        ) from None
    return fd


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_matches(path: Path, sha256: str | None) -> bool:
    try:
        return _sha256(path.read_bytes()) == sha256
    except FileNotFoundError:
        return False


def _codes_name(voice_id: str, sha256: str) -> str:
    return f"{voice_id}.codes-{sha256[:16]}.npy"


def _name_key(name: str) -> str:
    return name.strip().casefold()


def _duplicate_message(name: str) -> str:
    return f"A voice named '{name}' already exists (names are case-insensitive); pick another name."


def _not_found(voice_id: str) -> VoiceNotFound:
    return VoiceNotFound(f"No voice with id '{voice_id}'. List the stored voices with GET /v1/voices.", param="voice")


def _check_name(name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise InvalidInput("Voice name must not be empty.", param="name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"Voice name is longer than {MAX_NAME_CHARS} characters.", param="name")
    if _ID_RE.fullmatch(name.lower()):
        raise InvalidInput("Voice name must not look like a voice id (voice_<16 hex>).", param="name")
    return name


def _check_pcm(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1 or pcm.size == 0 or not np.issubdtype(pcm.dtype, np.floating):
        raise InvalidInput("Voice audio must be non-empty mono float PCM at 24 kHz.", param="audio")
    if not np.isfinite(pcm).all():
        raise InvalidInput("Voice audio contains NaN or infinite samples.", param="audio")
    return pcm.astype(np.float32, copy=False)


def _pcm_to_wav(pcm: np.ndarray) -> bytes:
    pcm16 = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm16.tobytes())
    return buf.getvalue()


def _wav_to_pcm(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
        frames = w.readframes(w.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32767.0


def _codes_to_npy(codes: np.ndarray) -> bytes:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise InvalidInput("Voice codes must be a non-empty integer array [K, T].", param="codes")
    if codes.min() < 0 or codes.max() > np.iinfo(np.int16).max:
        raise InvalidInput("Voice codes must lie in [0, 32767].", param="codes")
    buf = io.BytesIO()
    # int16 halves the file against int32: Mimi codebooks have 2048 entries.
    np.save(buf, np.ascontiguousarray(codes, dtype="<i2"), allow_pickle=False)
    return buf.getvalue()


def _row(v: Voice) -> tuple:
    return (v.id, v.name, v.description, v.transcript, v.created_at, v.sample_rate, v.duration_s,
            v.audio_sha256, v.codes_sha256, int(v.builtin))  # fmt: skip


def _voice(row: tuple) -> Voice:
    return Voice(*row[:9], builtin=bool(row[9]))
