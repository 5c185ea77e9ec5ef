"""User uploads -> float32 mono 24 kHz samples, decoded in-process by PyAV from bytes in memory.

The container is recognised by its magic bytes and handed to FFmpeg by name, so FFmpeg never
probes (and never runs) playlist, concat or network demuxers; nested opens are refused too.
Limits count decoded samples, never what a header claims.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import time

import av
import av.error
import numpy as np

from csm_voice_api.errors import InputTooLong, InvalidInput, UnsupportedMedia

SAMPLE_RATE = 24_000
MIN_INPUT_RATE = 4_000
MAX_INPUT_RATE = 192_000
MAX_CHANNELS = 8
ACCEPTED = "wav, mp3, flac, ogg (vorbis/opus), m4a/mp4 (aac), aac (adts) or webm"

_CODECS = {
    "mp3", "mp3float", "flac", "vorbis", "opus", "libopus", "aac", "alac",
    "pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le",
    "pcm_alaw", "pcm_mulaw",
}  # fmt: skip
# What FFmpeg raises from a hostile file; ValueError covers PyAV's own checks and bad metadata.
_AV_ERRORS = (av.error.FFmpegError, ValueError, EOFError, OverflowError, IndexError, OSError)
_DEMUXERS = {
    "wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mp3", "aac": "aac",
    "mp4": "mov,mp4,m4a,3gp,3g2,mj2", "webm": "matroska,webm",
}  # fmt: skip
_DATA_URI = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def decode_upload(
    data: bytes, *, max_seconds: float, time_limit_s: float = 10.0, trim: bool = False
) -> np.ndarray:
    """Decode an uploaded audio file to float32 mono samples at 24 kHz.

    Raises UnsupportedMedia for anything that is not cleanly decodable audio in an accepted
    format, InputTooLong past `max_seconds` of decoded audio (unless `trim`, which keeps the
    first `max_seconds`), and UnsupportedMedia when decoding takes over `time_limit_s`.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMedia(f"Not an audio file we read: upload {ACCEPTED}.", param="file")
    try:
        return _decode(data, fmt, max_seconds, time_limit_s, trim)
    except _AV_ERRORS as e:
        raise UnsupportedMedia(
            f"The {fmt} file could not be decoded ({type(e).__name__}): it looks damaged or "
            f"truncated. Upload {ACCEPTED}.",
            param="file",
        ) from e


def decode_base64_audio(
    s: str, *, max_seconds: float, time_limit_s: float = 10.0, trim: bool = False
) -> np.ndarray:
    """Like `decode_upload` for base64 text, plain or as a `data:...;base64,` URI."""
    s = _DATA_URI.sub("", s.strip(), count=1)
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput("Audio must be base64 encoded (optionally as a data: URI).") from e
    return decode_upload(data, max_seconds=max_seconds, time_limit_s=time_limit_s, trim=trim)


def sniff_format(data: bytes) -> str | None:
    """Which accepted container `data` is (a _DEMUXERS key), from magic bytes; None otherwise."""
    head = data[:12]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mark ADTS AAC instead
        return "aac" if head[1] & 0x06 == 0 else "mp3"
    return None


def _refuse_io(url: str, flags: int, options: dict) -> None:
    raise UnsupportedMedia("Audio files may not reference other files.", param="file")


def _decode(
    data: bytes, fmt: str, max_seconds: float, time_limit_s: float, trim: bool
) -> np.ndarray:
    deadline = time.monotonic() + time_limit_s
    max_samples = int(max_seconds * SAMPLE_RATE)
    demuxer = _DEMUXERS[fmt]
    with av.open(io.BytesIO(data), mode="r", format=demuxer, io_open=_refuse_io) as container:
        stream = _audio_stream(container)
        # Keep the channels through resampling and average them ourselves: FFmpeg's own
        # downmix adds the channels at -3 dB each, which makes stereo louder than mono.
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        for packet in container.demux(stream):
            if time.monotonic() > deadline:
                raise UnsupportedMedia(
                    f"Decoding took over {time_limit_s:g} s: upload a plainer file.", param="file"
                )
            for frame in packet.decode():
                _check_frame(frame)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
                    total += out.samples
            if total > max_samples:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
                total += out.samples
        claimed = _claimed_seconds(fmt, stream, data)
    if total == 0:
        raise UnsupportedMedia("The file holds no decodable audio.", param="file")
    pcm = np.clip(np.concatenate(chunks), -1.0, 1.0).astype(np.float32, copy=False)
    if len(pcm) > max_samples:
        if not trim:
            raise InputTooLong(
                f"Audio is longer than {max_seconds:g} s: upload a shorter clip.", param="file"
            )
        return pcm[:max_samples].copy()
    if claimed is not None and len(pcm) / SAMPLE_RATE < 0.99 * claimed - 0.05:
        raise UnsupportedMedia(
            f"The file claims {claimed:.1f} s of audio but only {len(pcm) / SAMPLE_RATE:.1f} s "
            "decode: it is truncated or damaged.",
            param="file",
        )
    return pcm


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    if not container.streams.audio:
        raise UnsupportedMedia("The file has no audio stream.", param="file")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    if ctx is None:  # FFmpeg found a stream but no decoder for it (a damaged or exotic header)
        raise UnsupportedMedia(f"The audio stream cannot be decoded: upload {ACCEPTED}.", param="file")
    if ctx.name not in _CODECS:
        raise UnsupportedMedia(f"Audio codec {ctx.name!r} is not accepted: upload {ACCEPTED}.", param="file")
    _check_rate_channels(ctx.sample_rate, ctx.channels)
    return stream


def _check_frame(frame: av.AudioFrame) -> None:
    # Headers can change mid-stream; each decoded frame is checked, not just the first header.
    _check_rate_channels(frame.sample_rate, len(frame.layout.channels))


def _check_rate_channels(rate: int, channels: int) -> None:
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise UnsupportedMedia(
            f"Sample rate {rate} Hz is outside {MIN_INPUT_RATE}-{MAX_INPUT_RATE} Hz.", param="file"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise UnsupportedMedia(f"{channels} audio channels: at most {MAX_CHANNELS} are accepted.", param="file")


def _claimed_seconds(fmt: str, stream: av.audio.stream.AudioStream, data: bytes) -> float | None:
    # Only headers that state an exact length count; mp3/adts/ogg/webm durations are estimates.
    if fmt == "wav":
        return _wav_claimed_seconds(data)
    if fmt not in ("flac", "mp4"):
        return None
    if stream.duration is None or stream.time_base is None or stream.duration <= 0:
        return None
    return float(stream.duration * stream.time_base)


def _wav_claimed_seconds(data: bytes) -> float | None:
    # FFmpeg trims a WAV's data size to the bytes present, so a truncated file looks whole to
    # it: read the sizes from the header ourselves.
    pos, byte_rate = 12, 0
    for _ in range(64):  # chunks before "data": fmt, LIST, fact, ...
        if pos + 8 > len(data):
            return None
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if cid == b"fmt " and size >= 16 and pos + 20 <= len(data):
            byte_rate = struct.unpack("<I", data[pos + 16 : pos + 20])[0]
        if cid == b"data":
            if size in (0, 0xFFFFFFFF) or byte_rate == 0:
                return None  # a streamed WAV: length unknown by design
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None
