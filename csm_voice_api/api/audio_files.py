"""Generated audio files: an opaque-name store under data_dir/outputs and GET /v1/audio/{filename}."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.convertors import Convertor, register_url_convertor

from csm_voice_api.api.models import CONTENT_TYPES, RESPONSE_FORMATS
from csm_voice_api.config import OutputRetention
from csm_voice_api.errors import InvalidInput, NotFound

# 32 hex characters and a known extension: nothing a client sends can name another path.
EXTENSIONS = RESPONSE_FORMATS
NAME_RE = re.compile(r"^[0-9a-f]{32}\.(?:%s)$" % "|".join(EXTENSIONS))


class OutputStore:
    """Generated files kept for a while (bounded by count and age) so clients can fetch them by name."""

    def __init__(self, root: Path, retention: OutputRetention):
        self.root = root.resolve()
        self.retention = retention
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, ext: str) -> str:
        """Store `data` and return its name (fetch it at /v1/audio/{name})."""
        if ext not in EXTENSIONS:
            raise InvalidInput(f"Cannot store a '.{ext}' file; use one of {', '.join(EXTENSIONS)}.")
        name = f"{secrets.token_hex(16)}.{ext}"
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)
        self.prune()
        return name

    def path(self, name: str) -> Path:
        """The file called `name`; raises NotFound for anything that is not a live stored name."""
        if not NAME_RE.fullmatch(name):
            raise InvalidInput("Not a generated audio file name.", param="filename")
        path = (self.root / name).resolve()
        if path.parent != self.root or not path.is_file():
            raise NotFound(f"Audio file '{name}' does not exist or has expired.", param="filename")
        return path

    def prune(self, now: float | None = None) -> None:
        """Delete files older than the retention age, then the oldest beyond the retention count."""
        now = time.time() if now is None else now
        with self._lock:
            files = []
            for p in self.root.iterdir():
                if not NAME_RE.fullmatch(p.name):
                    continue
                try:
                    files.append((p.stat().st_mtime, p))
                except FileNotFoundError:
                    continue
            files.sort()
            keep = []
            for mtime, p in files:
                if now - mtime > self.retention.max_age_s:
                    p.unlink(missing_ok=True)
                else:
                    keep.append(p)
            for p in keep[: max(0, len(keep) - self.retention.max_files)]:
                p.unlink(missing_ok=True)


class _NameConvertor(Convertor[str]):
    # Only stored-name shapes reach the route: other /v1/audio/* paths (GET /v1/audio/speech,
    # "../x") fall through to 404/405 instead of being taken for file names.
    regex = NAME_RE.pattern.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("csm_audio_file", _NameConvertor())
router = APIRouter()


@router.get("/v1/audio/{filename:csm_audio_file}")
async def get_audio_file(filename: str, request: Request) -> FileResponse:
    store: OutputStore = request.app.state.outputs
    path = store.path(filename)
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix[1:]], filename=filename)
