from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from csm_voice_api.audio.dsp import Tempo, tempo, to_s16
from csm_voice_api.audio.encode import CONTENT_TYPES, FORMATS, make_encoder, wav_bytes

from .media import tone

SR = 24_000
CHUNK = 3840  # two Mimi frames
N_CHUNKS = 10


def speech_like() -> np.ndarray:
    return tone(N_CHUNKS * CHUNK / SR, SR, freq=220.0)[0]


def encode_all(fmt: str, pcm: np.ndarray) -> list[bytes]:
    """Everything the encoder returned, one entry per write plus the flush."""
    enc = make_encoder(fmt)
    try:
        parts = [enc.write(pcm[i * CHUNK : (i + 1) * CHUNK]) for i in range(N_CHUNKS)]
        parts.append(enc.flush())
    finally:
        enc.close()
    return parts


def av_decode(data: bytes, fmt: str) -> tuple[int, int, np.ndarray]:
    """(sample rate, channels, float samples at 24 kHz) as PyAV reads `data`."""
    container = av.open(io.BytesIO(data), format="s16le" if fmt == "pcm" else None,
                        options={"sample_rate": str(SR), "ch_layout": "mono"} if fmt == "pcm" else {})
    with container:
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
        out = [f.to_ndarray()[0] for fr in container.decode(stream) for f in resampler.resample(fr)]
        out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return rate, channels, np.concatenate(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_24k_mono_of_the_right_length(fmt: str) -> None:
    pcm = speech_like()
    data = b"".join(encode_all(fmt, pcm))
    rate, channels, decoded = av_decode(data, fmt)
    assert channels == 1
    if fmt == "opus":
        # FFmpeg decodes Opus at 48 kHz whatever it was; the stream header records our 24 kHz
        assert struct.unpack("<I", data[data.index(b"OpusHead") + 12 :][:4])[0] == SR
    else:
        assert rate == SR
    tolerance = 0 if fmt in ("wav", "pcm", "flac") else 2048  # encoder priming + last-frame padding
    assert abs(len(decoded) - len(pcm)) <= tolerance, len(decoded)
    # content survived: same pitch
    spectrum = np.abs(np.fft.rfft(decoded[: len(pcm)]))
    assert abs(np.argmax(spectrum) * SR / len(pcm[: len(decoded)]) - 220) < 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_arrive_before_flush_with_one_header(fmt: str) -> None:
    parts = encode_all(fmt, speech_like())
    assert all(parts[:N_CHUNKS]), [len(p) for p in parts]  # every write yields bytes
    data = b"".join(parts)
    magic = {"wav": b"RIFF", "mp3": None, "opus": b"OpusHead", "aac": None, "flac": b"fLaC", "pcm": None}[fmt]
    if magic is not None:
        assert data.count(magic) == 1
    if fmt == "aac":  # ADTS: every frame starts with a sync word, there is no file header
        assert data[:2] in (b"\xff\xf1", b"\xff\xf9")
    if fmt == "mp3":
        assert data[:3] == b"ID3" and data.count(b"ID3") == 1


def test_streaming_wav_decodes_exactly_to_the_input() -> None:
    pcm = speech_like()
    parts = encode_all("wav", pcm)
    data = b"".join(parts)
    assert data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"
    assert len(parts[0]) == 44 + 2 * CHUNK and all(len(p) == 2 * CHUNK for p in parts[1:N_CHUNKS])
    _, _, decoded = av_decode(data, "wav")
    np.testing.assert_array_equal(np.rint(decoded * 32768).astype(np.int16), to_s16(pcm))


def test_complete_wav_has_exact_sizes() -> None:
    pcm = speech_like()[:1000]
    data = wav_bytes(pcm)
    assert len(data) == 44 + 2000
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert struct.unpack("<I", data[40:44])[0] == 2000
    _, _, decoded = av_decode(data, "wav")
    np.testing.assert_array_equal(np.rint(decoded * 32768).astype(np.int16), to_s16(pcm))


def test_s16_conversion_clips_and_rounds() -> None:
    got = to_s16(np.array([-2.0, -1.0, 0.0, 0.5 / 32767, 1.0, 3.0], np.float32))
    np.testing.assert_array_equal(got, [-32767, -32767, 0, 0, 32767, 32767])


def test_encoder_edge_cases() -> None:
    assert make_encoder("wav").flush()[:4] == b"RIFF"  # no audio is still a valid WAV
    enc = make_encoder("mp3")
    assert enc.write(np.zeros(0, np.float32)) == b""
    enc.write(np.zeros(CHUNK, np.float32))
    enc.flush()
    assert enc.flush() == b""
    with pytest.raises(ValueError, match="new encoder"):
        enc.write(np.zeros(CHUNK, np.float32))
    with pytest.raises(ValueError, match="unknown audio format"):
        make_encoder("ogg")


def test_content_types_are_openai_s() -> None:
    assert CONTENT_TYPES == {
        "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
    }  # fmt: skip
    assert all(make_encoder(f).content_type == CONTENT_TYPES[f] for f in FORMATS)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 2.0, 3.0, 4.0])
def test_tempo_changes_duration_not_pitch(speed: float) -> None:
    pcm = tone(2.0, SR, freq=300.0)[0]
    out = tempo(pcm, speed)
    assert out.dtype == np.float32
    assert abs(len(out) - len(pcm) / speed) <= 0.05 * len(pcm) / speed
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert abs(np.argmax(spectrum) * SR / len(out) - 300) < 5


def test_tempo_bounds() -> None:
    pcm = tone(0.1, SR)[0]
    np.testing.assert_array_equal(tempo(pcm, 1.0), pcm)
    for bad in (0.2, 4.5):
        with pytest.raises(ValueError, match="speed"):
            tempo(pcm, bad)


@pytest.mark.parametrize("speed", [0.5, 1.0, 3.0])
def test_streaming_tempo_equals_one_shot(speed: float) -> None:
    pcm = tone(1.5, SR, freq=300.0)[0]
    stream = Tempo(speed)
    parts = [stream.write(pcm[i : i + CHUNK]) for i in range(0, len(pcm), CHUNK)]
    parts.append(stream.flush())
    assert sum(len(p) > 0 for p in parts[:-1]) >= len(parts) // 2  # output flows while writing
    np.testing.assert_array_equal(np.concatenate(parts), tempo(pcm, speed))
    with pytest.raises(ValueError, match="new Tempo"):
        stream.write(pcm)
