"""Builds real audio files in memory with PyAV's encoders, for the decode/encode tests."""

from __future__ import annotations

import io

import av
import numpy as np

# name -> (muxer, codec)
FILE_KINDS = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "flac": ("flac", "flac"),
    "ogg-opus": ("ogg", "libopus"),
    "ogg-vorbis": ("ogg", "vorbis"),
    "m4a": ("ipod", "aac"),
    "webm": ("webm", "libopus"),
}


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """[channels, n] float32 sine at 0.5 amplitude."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.repeat(x[None], channels, axis=0)


def make_file(kind: str, pcm: np.ndarray, rate: int) -> bytes:
    """Encode [channels, n] float32 into a complete file of `kind` (a FILE_KINDS key)."""
    muxer, codec = FILE_KINDS[kind]
    if codec == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
        raise ValueError(f"opus cannot encode at {rate} Hz")
    layout = {1: "mono", 2: "stereo"}[pcm.shape[0]]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        step = 4096
        for i in range(0, pcm.shape[1], step):
            chunk = np.ascontiguousarray(pcm[:, i : i + step]).reshape(1, -1, order="F")
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate = rate
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def video_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
