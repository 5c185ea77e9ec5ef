"""SilentCipher watermark plumbing, on silentcipher's real code with randomly initialised networks.

Random networks embed and decode *some* message, not the key: these tests check what the code
around silentcipher guarantees (lengths, rates, strength bound, stream == offline, key logic,
loading). Only the test at the end, skipped without the real weights, checks a real round trip.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from csm_voice_api.audio import watermark as W
from csm_voice_api.audio.watermark import (
    CKPT_SUBDIR,
    CSM_1B_PUBLIC_KEY,
    StreamWatermarker,
    Watermarker,
    WatermarkResult,
    parse_key,
    verify_file,
)
from csm_voice_api.errors import UnsupportedMedia

SR = 24_000


def voice_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A harmonic tone with vibrato, syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 15 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 2.5 * t))
    return (0.1 * env * x + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def wm() -> Watermarker:
    # Real-size encoder; the message decoder shrunk so the 205-shift phase search fits on CPU.
    return Watermarker.random(seed=1, decoder_channels=4, decoder_layers=3)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


# --- keys -------------------------------------------------------------------------------------


def test_default_key_is_the_public_csm_key() -> None:
    assert parse_key(None) == parse_key("  ") == CSM_1B_PUBLIC_KEY == (212, 211, 146, 56, 201)


@pytest.mark.parametrize("text", ["1,2,3,4,5", " 1, 2 ,3,4, 5 ", "[1,2,3,4,5]"])
def test_parse_private_key(text: str) -> None:
    assert parse_key(text) == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("text", ["1,2,3,4", "1,2,3,4,5,6", "1,2,3,4,256", "-1,2,3,4,5", "a,b,c,d,e"])
def test_bad_key_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="watermark key"):
        parse_key(text)


def test_bad_key_rejected_by_constructor(wm: Watermarker) -> None:
    with pytest.raises(ValueError, match="0..255"):
        Watermarker(wm.model, key=(1, 2, 3, 4, 300))


# --- apply ------------------------------------------------------------------------------------


def test_apply_keeps_length_rate_and_changes_signal_slightly(wm: Watermarker) -> None:
    x = voice_like(1.3)
    y = wm.apply(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.array_equal(x, y)
    # silentcipher scales the message to -36 dB of the carrier per frame, whatever the weights:
    # a delay, a rate error or a level change would all show up as a far larger difference.
    assert 1e-4 < rel_rms(y, x) < 0.1


def test_apply_odd_lengths_and_silence(wm: Watermarker) -> None:
    for n in (1, 7, 1919, 4097):
        x = voice_like(n / SR + 0.01)[:n]
        assert wm.apply(x).shape == (n,)
    silence = np.zeros(5000, np.float32)
    assert np.array_equal(wm.apply(silence), silence)
    assert wm.apply(np.zeros(0, np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="mono"):
        wm.apply(np.zeros((2, 100), np.float32))


def shipped_apply(wm: Watermarker, pcm: np.ndarray) -> np.ndarray:
    """apply() through the model's own encode_wav and its shared STFT, one call at a time."""
    y44 = W._resample(pcm, SR, 44_100)
    encoded, _ = wm.model.encode_wav(y44, 44_100, list(wm.key), message_sdr=W.MESSAGE_SDR_DB, calc_sdr=False)
    return W._fit(W._resample(np.asarray(encoded, np.float32), 44_100, SR), pcm.size)


def test_concurrent_encodes_equal_serial_ones() -> None:
    # silentcipher's shared STFT passes num_samples from transform() to inverse(): on one shared
    # object, overlapping encodes of different lengths cut each other's output wrongly.
    wm = W.demo_watermarker()
    xs = [voice_like(0.05 + 0.037 * i, seed=i) for i in range(12)]
    serial = [shipped_apply(wm, x) for x in xs]
    threads = 4
    barrier = threading.Barrier(threads)

    def encode(first: int) -> list[tuple[int, np.ndarray]]:
        barrier.wait(30)
        return [(j, wm.apply(xs[j])) for _ in range(3) for j in range(first, len(xs), threads)]

    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(encode, range(threads)) for r in rs]
    assert len(results) == 3 * len(xs)
    for j, out in results:
        np.testing.assert_array_equal(out, serial[j])
    enc = wm._encoder()  # this thread's: the same networks, its own STFT
    assert enc.model.enc_c is wm.model.enc_c and enc.model.stft is not wm.model.stft
    assert enc.stream is None  # CPU: no CUDA stream


# --- verify -----------------------------------------------------------------------------------


def test_verify_maps_silentcipher_results_to_the_key(wm: Watermarker) -> None:
    key = CSM_1B_PUBLIC_KEY
    ok = {"messages": [list(key)], "confidences": [0.9], "status": True}
    assert wm._result(ok) == WatermarkResult(True, True, 0.9, key)
    other = {"messages": [[1, 2, 3, 4, 5]], "confidences": [1.0], "status": True}
    assert wm._result(other) == WatermarkResult(True, False, 1.0, (1, 2, 3, 4, 5))
    assert Watermarker(wm.model, key=(1, 2, 3, 4, 5))._result(other).key_matches
    failed = {"messages": [], "confidences": [], "error": "Could not find message", "status": False}
    assert wm._result(failed) == WatermarkResult(False, False, None)


def test_verify_is_silentcipher_decode_of_the_44k_audio(wm: Watermarker) -> None:
    y = wm.apply(voice_like(1.2, seed=2))
    y44 = W._resample(y, SR, 44_100)
    decode = wm.model.decode_wav
    want = wm._result(decode(y44, 44_100, phase_shift_decoding=False))
    assert wm.verify(y, SR, phase_search_s=0) == want
    assert wm.verify(y44, 44_100, phase_search_s=0) == want
    # Unbounded search: silentcipher's decode_wav with its own phase search, as shipped.
    res = wm.verify(y, SR, phase_search_s=None)
    assert res == wm._result(decode(y44, 44_100, phase_shift_decoding=True))
    assert res.present == (res.message is not None) == (res.confidence is not None)
    assert res.key_matches == (res.message == wm.key)


def test_bounded_phase_search_decodes_from_the_found_offset(
    wm: Watermarker, monkeypatch: pytest.MonkeyPatch
) -> None:
    y = wm.apply(voice_like(2.5, seed=3))
    y44 = W._resample(y, SR, 44_100)
    seen: list[int] = []

    def best_ps(audio: np.ndarray) -> int:
        seen.append(audio.size)
        return 30

    monkeypatch.setattr(wm.model, "get_best_ps", best_ps)
    res = wm.verify(y, SR, phase_search_s=1.5)
    assert seen == [int(1.5 * 44_100)]
    assert res == wm._result(wm.model.decode_wav(y44[30:], 44_100, phase_shift_decoding=False))


def test_verify_too_short_or_silent_is_not_present(wm: Watermarker) -> None:
    short = wm.apply(voice_like(0.95))  # under one message period (0.975 s)
    for pcm in (short, np.zeros(3 * SR, np.float32), np.zeros(0, np.float32)):
        res = wm.verify(pcm, SR)
        assert res == WatermarkResult(present=False, key_matches=False, confidence=None)


def test_verify_file_reads_audio_like_verify(wm: Watermarker, tmp_path: Path) -> None:
    y = wm.apply(voice_like(1.2, seed=3))
    path = tmp_path / "out.wav"
    sf.write(path, np.stack([y, y], axis=1), SR, subtype="FLOAT")  # stereo: mixed to mono
    want = wm.verify(y, SR, phase_search_s=0)
    assert verify_file(path, wm, phase_search_s=0) == want
    with open(path, "rb") as f:
        assert verify_file(f, wm, phase_search_s=0) == want
    with pytest.raises(UnsupportedMedia):
        verify_file(io.BytesIO(b"this is not audio" * 100), wm)


def test_coarse_phase_search_is_silentcipher_criterion_on_fewer_offsets(wm: Watermarker) -> None:
    y44 = W._resample(wm.apply(voice_like(1.2, seed=4)), SR, 44_100).astype(np.float64)
    y = y44 * np.sqrt(wm.model.average_energy_VCTK / np.mean(y44**2))
    with torch.no_grad():
        assert wm._coarse_phase_shift(y, 10) == wm.model.get_best_ps(y)  # same offsets: same pick
        shift = wm._coarse_phase_shift(y, 256)
    assert shift % 256 == 0 and 0 <= shift < 2048


def test_watermarked_is_the_key_or_a_confident_well_formed_message() -> None:
    key = CSM_1B_PUBLIC_KEY
    assert WatermarkResult(True, True, 0.3, key).watermarked  # a 40-bit match is proof enough
    assert WatermarkResult(True, False, 0.95, (1, 2, 3, 4, 5)).watermarked  # another key's mark
    assert not WatermarkResult(True, False, 0.6, (1, 2, 3, 4, 5)).watermarked  # noise decodes too
    assert not WatermarkResult(True, False, 1.0, (1, -2, 3, 4, 5)).watermarked  # malformed
    assert not WatermarkResult(True, False, 1.0, (1, 2, 3)).watermarked
    assert not WatermarkResult(False, False, None).watermarked


def test_search_bounds_and_server_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hfc

    assert W.search_bounds("cuda") == (3.0, 10)
    assert W.search_bounds("cpu") == (W.CPU_PHASE_SEARCH_S, W.CPU_PHASE_STEP)
    assert W.CPU_PHASE_SEARCH_S * 44_100 >= W.demo_watermarker().min_verify_samples
    demo = W.load_watermarker("1,2,3,4,5", "cpu", demo=True)
    assert demo.key == (1, 2, 3, 4, 5) and demo.key_kind == "private"
    assert demo.model is W.load_watermarker(None, "cpu", demo=True).model  # built once
    with pytest.raises(ValueError, match="CSM_WATERMARK_KEY"):
        W.load_watermarker("1,2", "cpu", demo=True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="CSM_WATERMARK=false"):
        W.load_watermarker(None, "cpu", demo=False)


# --- streaming --------------------------------------------------------------------------------


def feed(stream: StreamWatermarker, x: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    outs, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 6000))
        outs.append(stream.write(x[i : i + n]))
        i += n
    outs.append(stream.flush())
    return [o for o in outs if o.size]


def test_stream_equals_offline_apply_of_period_chunks(wm: Watermarker) -> None:
    x = voice_like(2.3, seed=4)
    stream = StreamWatermarker(wm)
    got = feed(stream, x, seed=0)
    out = np.concatenate(got)
    assert out.shape == x.shape
    # Chunk edges are whole message periods (23405.7 samples, rounded without drift).
    edges = [0, 23406, 46811, x.size]
    assert [stream.edge(j) for j in range(3)] == edges[:3]
    want = np.concatenate([wm.apply(x[a:b]) for a, b in zip(edges, edges[1:])])
    np.testing.assert_array_equal(out, want)
    assert rel_rms(out, x) < 0.1


def test_stream_short_chunks_look_behind_to_the_period_edge(wm: Watermarker) -> None:
    x = voice_like(1.4, seed=5)
    stream = StreamWatermarker(wm, min_chunk_s=0.3)
    out = np.concatenate(feed(stream, x, seed=1))
    assert out.shape == x.shape
    edges = [stream.edge(j) for j in range(5)] + [x.size]
    assert edges[:5] == [0, 7200, 14400, 21600, 28800]
    want = []
    for a, b in zip(edges, edges[1:]):
        p = stream.period_start(a)  # 0 until the first period edge at 23406
        want.append(wm.apply(x[p:b])[a - p :])
    assert [stream.period_start(a) for a in edges[:5]] == [0, 0, 0, 0, 23406]
    np.testing.assert_array_equal(out, np.concatenate(want))


def test_stream_of_nothing_is_nothing(wm: Watermarker) -> None:
    stream = StreamWatermarker(wm)
    assert stream.write(np.zeros(0, np.float32)).size == 0
    assert stream.flush().size == 0
    with pytest.raises(ValueError):
        StreamWatermarker(wm, min_chunk_s=0)


# --- loading ----------------------------------------------------------------------------------


def write_checkpoint(model: object, folder: Path) -> Path:
    """Lays out a model's networks as sony/silentcipher ships them."""
    ckpt = folder / CKPT_SUBDIR
    ckpt.mkdir(parents=True)
    torch.save(model.enc_c.state_dict(), ckpt / "enc_c.ckpt")  # type: ignore[attr-defined]
    torch.save(model.dec_c.state_dict(), ckpt / "dec_c.ckpt")  # type: ignore[attr-defined]
    torch.save(model.dec_m[0].state_dict(), ckpt / "dec_m_0.ckpt")  # type: ignore[attr-defined]
    (ckpt / "hparams.yaml").write_text(yaml.safe_dump(W.HPARAMS_44K))
    return ckpt


def test_load_goes_through_silentcipher_loader(tmp_path: Path) -> None:
    ref = Watermarker.random(seed=7)  # full-size decoder: the checkpoint shapes must match
    write_checkpoint(ref.model, tmp_path)
    x = voice_like(1.1, seed=6)
    want = ref.apply(x)
    # the message is the key: another key must change the watermark
    assert not np.array_equal(Watermarker(ref.model, key=(1, 2, 3, 4, 5)).apply(x), want)
    for where in (tmp_path, tmp_path / CKPT_SUBDIR):
        loaded = Watermarker.load(weights_dir=where)
        assert loaded.key == ref.key == CSM_1B_PUBLIC_KEY
        np.testing.assert_array_equal(loaded.apply(x), want)
        assert loaded.verify(want, SR, phase_search_s=0) == ref.verify(want, SR, phase_search_s=0)


def test_load_from_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hfc

    ref = Watermarker.random(seed=8)
    snap = tmp_path / "models--sony--silentcipher" / "snapshots" / "0123abcd"
    write_checkpoint(ref.model, snap)
    (tmp_path / "models--sony--silentcipher" / "refs").mkdir()
    (tmp_path / "models--sony--silentcipher" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    assert W.resolve_weights() == snap / CKPT_SUBDIR
    x = voice_like(0.5)
    np.testing.assert_array_equal(Watermarker.load().apply(x), ref.apply(x))


def test_missing_weights_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hfc

    with pytest.raises(FileNotFoundError, match="hparams.yaml"):
        Watermarker.load(weights_dir=tmp_path)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="sony/silentcipher"):
        Watermarker.load()


# --- the real model ---------------------------------------------------------------------------


def _real_weights_cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return all(
        isinstance(try_to_load_from_cache(W.HF_REPO, f"{CKPT_SUBDIR}/{f}"), str)
        for f in W.CKPT_FILES
    )


@pytest.mark.slow
@pytest.mark.skipif(not _real_weights_cached(), reason="sony/silentcipher not in the HF cache")
def test_real_watermark_round_trip() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wm = Watermarker.load(device=device)
    x = voice_like(4.0, seed=9)
    y = wm.apply(x)
    assert wm.verify(y, SR).key_matches
    assert not wm.verify(x, SR).key_matches
    streamed = np.concatenate(feed(StreamWatermarker(wm), x, seed=2))
    assert wm.verify(streamed, SR).key_matches


def test_growing_pieces_keep_length_grid_and_match_whole_stream():
    """Pieces grow by `growth` up to a message period, then end on period edges; output length
    equals input, and how the audio is written does not change a byte of the output."""
    from csm_voice_api.audio.watermark import StreamWatermarker, demo_watermarker

    wm = demo_watermarker()
    s = StreamWatermarker(wm, 0.16, growth=1.5)
    edges = [s.edge(j) for j in range(10)]
    sizes = np.diff(edges)
    assert edges[:3] == [0, 3840, 3840 + 5760]
    assert list(sizes[:4]) == [3840, 5760, 8640, 12960]  # x1.5 each, while under a period
    assert all(0 < n <= round(s.period) + 1 for n in sizes)
    grid = [e for e in edges if e > 0 and s.period_start(e) == e]
    assert len(grid) >= 3 and all(0 < b - a <= round(s.period) + 1 for a, b in zip(grid, grid[1:]))
    x = (np.random.RandomState(3).randn(24_000 * 5) * 0.1).astype(np.float32)
    one = StreamWatermarker(wm, 0.16, growth=1.5)
    whole = np.concatenate([one.write(x), one.flush()])
    other = StreamWatermarker(wm, 0.16, growth=1.5)
    parts = [other.write(x[i : i + 1920 * 3]) for i in range(0, len(x), 1920 * 3)] + [other.flush()]
    assert len(whole) == len(x)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_restart_starts_small_pieces_on_the_same_message_grid():
    from csm_voice_api.audio.watermark import StreamWatermarker, demo_watermarker

    wm = demo_watermarker()
    x = (np.random.RandomState(4).randn(24_000 * 3) * 0.1).astype(np.float32)
    s = StreamWatermarker(wm, 0.16, growth=1.5)
    cut = 36_000  # 1.5 s: the pieces have grown, the next edge is 50640 (a 0.61 s piece away)
    first = np.concatenate([s.write(x[:cut]), s.flush()])
    assert first.size == cut and s.edge(s._chunks + 1) == 50_640
    s.restart()
    piece = s.write(x[cut : cut + 3840])
    assert piece.size == 3840  # one step, not the rest of the grown piece
    # Marked with look-behind to its message period's edge: the grid of the whole stream.
    p = s.period_start(cut)
    assert p == 23_406
    np.testing.assert_array_equal(piece, wm.apply(x[p : cut + 3840])[cut - p :])
    rest = np.concatenate([s.write(x[cut + 3840 :]), s.flush()])
    assert first.size + piece.size + rest.size == x.size


def test_buffer_takes_only_chunks_that_end_no_piece_and_changes_no_byte():
    """`buffer` is `write` minus the chunks that complete a piece: those it refuses, untouched."""
    from csm_voice_api.audio.watermark import StreamWatermarker, demo_watermarker

    wm = demo_watermarker()
    x = (np.random.RandomState(5).randn(24_000 * 4) * 0.1).astype(np.float32)
    chunk = 3840
    ref = StreamWatermarker(wm, 0.16, growth=1.5)
    want = [ref.write(x[i : i + chunk]) for i in range(0, x.size, chunk)] + [ref.flush()]
    s = StreamWatermarker(wm, 0.16, growth=1.5)
    got, refused = [], 0
    for i in range(0, x.size, chunk):
        before = s.pending
        if s.buffer(x[i : i + chunk]):
            assert s.pending == before + x[i : i + chunk].size
            continue
        refused += 1
        assert s.pending == before  # refused: nothing taken
        got.append(s.write(x[i : i + chunk]))
    got.append(s.flush())
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))
    # The chunks that ended a piece (the output came in those writes) and no others went to write.
    assert refused == sum(p.size > 0 for p in want[:-1]) < x.size // chunk // 2


def test_buffer_defers_to_a_write_still_running():
    from csm_voice_api.audio.watermark import StreamWatermarker, demo_watermarker

    s = StreamWatermarker(demo_watermarker(), 0.16, growth=1.5)
    with s._lock:  # a cancelled caller's write, still running in its worker
        assert not s.buffer(np.zeros(10, np.float32))
    assert s.pending == 0 and s.buffer(np.zeros(10, np.float32)) and s.pending == 10
