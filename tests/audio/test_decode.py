from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csm_voice_api.audio.decode import decode_base64_audio, decode_upload, sniff_format
from csm_voice_api.audio.encode import wav_bytes, wav_header
from csm_voice_api.errors import InputTooLong, InvalidInput, UnsupportedMedia

from .media import FILE_KINDS, make_file, tone, video_only_mp4

SR = 24_000


def native_rate(kind: str) -> int:
    return 48_000 if FILE_KINDS[kind][1] == "libopus" else 44_100


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """One second of a 440 Hz stereo tone in every accepted kind, 44.1 kHz where the codec allows."""
    return {k: make_file(k, tone(1.0, native_rate(k), channels=2), native_rate(k)) for k in FILE_KINDS}


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.argmax(spectrum) * SR / len(pcm))


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_every_kind_decodes_to_24k_mono_with_the_right_duration(files, kind: str) -> None:
    pcm = decode_upload(files[kind], max_seconds=5)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    exact = kind in ("wav", "flac")
    # lossy codecs add up to a frame of priming/padding (aac 1024, mp3 1152 at the source rate)
    assert abs(len(pcm) - SR) <= (2 if exact else 0.05 * SR), len(pcm)
    assert abs(dominant_hz(pcm) - 440) < 5  # resampled, not just relabelled
    # two identical channels average to the same level, not louder
    assert 0.45 < np.abs(pcm[SR // 10 : -SR // 10]).max() < 0.56


def test_stereo_is_averaged(files) -> None:
    left = tone(0.5, 44_100)[0]
    stereo = np.stack([left, np.zeros_like(left)])
    pcm = decode_upload(make_file("wav", stereo, 44_100), max_seconds=5)
    assert len(pcm) == SR // 2
    assert np.abs(pcm[1000:-1000]).max() == pytest.approx(0.25, abs=0.01)


def test_24k_wav_round_trips_exactly() -> None:
    x = (tone(0.3, SR)[0] * 32767).round() / 32767
    np.testing.assert_allclose(decode_upload(wav_bytes(x), max_seconds=1), x, atol=1e-4)


def test_decoded_length_not_header_is_capped(files) -> None:
    with pytest.raises(InputTooLong):
        decode_upload(files["mp3"], max_seconds=0.5)
    assert len(decode_upload(files["mp3"], max_seconds=0.5, trim=True)) == SR // 2
    # a streamed WAV states no length at all: 3 s of samples still hit the 1 s cap
    streamed = wav_header(SR) + np.zeros(3 * SR, np.int16).tobytes()
    with pytest.raises(InputTooLong, match="longer than 1 s"):
        decode_upload(streamed, max_seconds=1)


def test_wav_header_claiming_more_than_present_is_refused() -> None:
    body = np.zeros(SR // 2, np.int16).tobytes()
    liar = wav_header(SR, num_samples=10 * SR) + body
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_upload(liar, max_seconds=20)


@pytest.mark.parametrize("rate", [1, 1_000, 10_000_000])
def test_absurd_sample_rates_are_refused(rate: int) -> None:
    data = wav_header(rate, num_samples=2000) + np.zeros(2000, np.int16).tobytes()
    with pytest.raises(UnsupportedMedia):
        decode_upload(data, max_seconds=1e9)


@pytest.mark.parametrize("kind", ["wav", "flac", "ogg-opus", "ogg-vorbis", "m4a"])
def test_truncated_files_with_exact_lengths_are_refused(files, kind: str) -> None:
    data = files[kind]
    with pytest.raises(UnsupportedMedia):
        decode_upload(data[: len(data) // 2], max_seconds=5)


@pytest.mark.parametrize("kind", ["mp3", "webm"])
def test_truncated_streams_decode_what_is_there_or_are_refused(files, kind: str) -> None:
    data = files[kind]
    for cut in (len(data) // 10, len(data) // 2):
        try:
            pcm = decode_upload(data[:cut], max_seconds=5)
        except UnsupportedMedia:
            continue
        assert 0 < len(pcm) < 0.8 * SR


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        bytes(range(256)) * 8,
        "Hello, this is a text file.\nNot audio at all.\n".encode(),
        b"RIFF\x10\x00\x00\x00WAVE",  # a header and nothing else
        b"OggS" + b"\x00" * 60,
        b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff" * 40,
        b"\x00\x00\x00\x18ftypisom" + b"\x00" * 32,
        b"#EXTM3U\n#EXT-X-VERSION:3\nhttp://127.0.0.1/x.ts\n",  # a playlist
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
    ],
)
def test_non_audio_is_unsupported_media(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        decode_upload(data, max_seconds=5)


def test_video_only_file_is_refused() -> None:
    with pytest.raises(UnsupportedMedia, match="no audio stream"):
        decode_upload(video_only_mp4(), max_seconds=5)


def test_sniffing_names_the_accepted_containers(files) -> None:
    expected = {"wav": "wav", "mp3": "mp3", "flac": "flac", "ogg-opus": "ogg", "ogg-vorbis": "ogg", "m4a": "mp4", "webm": "webm"}
    assert {k: sniff_format(v) for k, v in files.items()} == expected


def test_base64_and_data_uris(files) -> None:
    raw = files["flac"]
    expected = decode_upload(raw, max_seconds=5)
    b64 = base64.b64encode(raw).decode()
    np.testing.assert_array_equal(decode_base64_audio(b64, max_seconds=5), expected)
    uri = "data:audio/flac;base64," + b64
    np.testing.assert_array_equal(decode_base64_audio(uri, max_seconds=5), expected)
    with pytest.raises(InvalidInput):
        decode_base64_audio("not base64 !!", max_seconds=5)
    with pytest.raises(UnsupportedMedia):
        decode_base64_audio(base64.b64encode(b"plain text").decode(), max_seconds=5)


def test_wall_time_cap(files) -> None:
    with pytest.raises(UnsupportedMedia, match="took over"):
        decode_upload(files["flac"], max_seconds=5, time_limit_s=-1.0)


def _small_seeds() -> list[bytes]:
    x = tone(0.2, SR)
    return [make_file(k, x, SR) for k in ("wav", "mp3", "ogg-opus", "flac")]


_SEEDS = _small_seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "int"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif pos + 4 <= len(data):  # an extreme 32-bit field, where sizes and rates live
            data[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF])))
        if not data:
            break
    return bytes(data)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzzed_files_raise_only_domain_errors(data: bytes) -> None:
    try:
        pcm = decode_upload(data, max_seconds=2, time_limit_s=5)
    except (UnsupportedMedia, InputTooLong):
        return
    assert pcm.dtype == np.float32 and pcm.ndim == 1 and 0 < len(pcm) <= 2 * SR
    assert np.isfinite(pcm).all() and np.abs(pcm).max() <= 1.0
