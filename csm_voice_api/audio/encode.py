"""Streaming response encoders: one object per response, `write(pcm) -> bytes`, `flush() -> bytes`.

A response body is the concatenation of everything `write` and `flush` returned: one container
header at the start, never one per chunk. Compressed formats go through PyAV in-process into an
unseekable in-memory sink, so muxers stream instead of seeking back to patch headers.
"""

from __future__ import annotations

import struct
from typing import Protocol

import av
import numpy as np

from csm_voice_api.audio.dsp import to_s16

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_UNKNOWN = 0xFFFFFFFF  # RIFF/data size of a WAV whose length is not known yet


class Encoder(Protocol):
    content_type: str

    def write(self, pcm: np.ndarray) -> bytes: ...

    def flush(self) -> bytes: ...

    def close(self) -> None: ...


def make_encoder(fmt: str, sample_rate: int = 24_000) -> Encoder:
    """A fresh encoder for one response in `fmt` (one of FORMATS) for float32 mono input."""
    if fmt == "pcm":
        return PcmEncoder(sample_rate)
    if fmt == "wav":
        return WavEncoder(sample_rate)
    if fmt in _AV_SETTINGS:
        return AvEncoder(fmt, sample_rate)
    raise ValueError(f"unknown audio format {fmt!r}: use one of {', '.join(FORMATS)}")


def wav_header(sample_rate: int, num_samples: int | None = None) -> bytes:
    """44-byte mono s16le WAV header; sizes 0xFFFFFFFF when the length is not known yet."""
    data = _UNKNOWN if num_samples is None else 2 * num_samples
    riff = _UNKNOWN if num_samples is None else 36 + data
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
        + b"data" + struct.pack("<I", data)
    )  # fmt: skip


def wav_bytes(pcm: np.ndarray, sample_rate: int = 24_000) -> bytes:
    """A complete WAV file with exact sizes, for non-streaming responses."""
    s16 = to_s16(pcm)
    return wav_header(sample_rate, len(s16)) + s16.tobytes()


class PcmEncoder:
    """Raw s16le mono, no header."""

    content_type = CONTENT_TYPES["pcm"]

    def __init__(self, sample_rate: int = 24_000):
        self.sample_rate = sample_rate

    def write(self, pcm: np.ndarray) -> bytes:
        return to_s16(pcm).tobytes()

    def flush(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class WavEncoder(PcmEncoder):
    """A streaming WAV: one header with unknown sizes, then s16le samples as they come."""

    content_type = CONTENT_TYPES["wav"]

    def __init__(self, sample_rate: int = 24_000):
        super().__init__(sample_rate)
        self._header_sent = False

    def _header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return wav_header(self.sample_rate)

    def write(self, pcm: np.ndarray) -> bytes:
        return self._header() + super().write(pcm)

    def flush(self) -> bytes:
        return self._header()  # an empty response is still a valid WAV


# muxer, encoder, sample format fed to the encoder, bit rate, muxer options
_AV_SETTINGS: dict[str, tuple[str, str, int, dict[str, str]]] = {
    "mp3": ("mp3", "libmp3lame", 64_000, {"write_xing": "0"}),
    "opus": ("ogg", "libopus", 32_000, {"page_duration": "100000"}),  # pages every 100 ms
    "aac": ("adts", "aac", 64_000, {}),
    "flac": ("flac", "flac", 0, {}),
}


class _Sink:
    """Write-only, unseekable byte sink: what the muxer wrote since the last `take`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, b: bytes) -> int:
        self._buf += b
        return len(b)

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class AvEncoder:
    """mp3, opus (in ogg), aac (ADTS) or flac through PyAV, muxed into memory."""

    def __init__(self, fmt: str, sample_rate: int = 24_000):
        muxer, codec, bit_rate, options = _AV_SETTINGS[fmt]
        self.content_type = CONTENT_TYPES[fmt]
        self.sample_rate = sample_rate
        self._sink = _Sink()
        # flush_packets + a small buffer: each muxed packet reaches the sink at once.
        self._container = av.open(
            self._sink, mode="w", format=muxer, buffer_size=4096,
            options=options, container_options={"flush_packets": "1"},
        )  # fmt: skip
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        if bit_rate:
            self._stream.bit_rate = bit_rate
        self._pts = 0
        self._closed = False

    def write(self, pcm: np.ndarray) -> bytes:
        if self._closed:
            raise ValueError("write() after flush()/close(): make a new encoder per response")
        pcm = np.ascontiguousarray(np.clip(pcm, -1.0, 1.0), dtype=np.float32)
        if len(pcm) == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        # PyAV re-frames to the codec's frame size and converts the sample format itself.
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def flush(self) -> bytes:
        if self._closed:
            return b""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self.close()
        return self._sink.take()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()
