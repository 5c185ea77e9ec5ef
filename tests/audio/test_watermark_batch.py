"""The batched SilentCipher encode and the thread that batches pieces (audio/watermark_batch.py).

The reference is `Watermarker.apply`: silentcipher's own `encode_wav`, one piece per call. The
batched encode must give every piece the same audio up to float rounding, whatever else its
batch holds, while running one set of launches for many pieces.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from csm_voice_api.audio import watermark_batch as WB
from csm_voice_api.audio.watermark import StreamWatermarker, Watermarker, demo_watermarker
from csm_voice_api.audio.watermark_batch import BatchEncoder, frames_of

# float32 rounding of the same sums in another order; the marks themselves are ~1e-2 here.
ATOL = 2e-6


def noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def wm() -> Watermarker:
    # The real-size encoder and carrier decoder (what apply runs); the message decoder is unused.
    return Watermarker.random(seed=1, decoder_channels=4, decoder_layers=3)


# 44.1 kHz lengths: 4096 * k exactly (padded by a whole window), one piece of one chunk, a
# message period, two periods (a look-behind window), tiny, and two of one STFT size.
SIZES = [2229, 1920, 3840, 5760, 23406, 46811, 7, 5700, 5760]


def test_batch_equals_one_piece_encodes(wm: Watermarker) -> None:
    assert (2229 * 147 + 79) // 80 == 4096  # the first size is one STFT window at 44.1 kHz
    pcms = [noise(n, seed) for seed, n in enumerate(SIZES)]
    pcms += [np.zeros(800, np.float32), np.zeros(0, np.float32)]  # silence and nothing pass through
    want = [wm.apply(p) for p in pcms]
    got = wm.apply_batch(pcms)
    for p, w, g in zip(pcms, want, got):
        assert g.dtype == np.float32 and g.shape == p.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)
        if np.any(p):
            assert np.abs(g - p).max() > 100 * ATOL  # marked: the comparison above means something
    np.testing.assert_array_equal(got[-2], pcms[-2])


def test_a_piece_does_not_depend_on_its_batch_partners(wm: Watermarker) -> None:
    # Same STFT size, very different loudness: with BatchNorm over the batch (not per piece),
    # the quiet piece would be normalised by the loud one's statistics.
    quiet, loud = noise(5760, 1) * 0.01, noise(5700, 2) * 30
    assert frames_of(quiet.size, 4096, 2048) == frames_of(loud.size, 4096, 2048)
    alone = wm.apply_batch([quiet])[0]
    with_loud = wm.apply_batch([loud, quiet, loud])[1]
    np.testing.assert_allclose(with_loud, alone, rtol=0, atol=ATOL * 0.01)
    np.testing.assert_allclose(alone, wm.apply(quiet), rtol=0, atol=ATOL * 0.01)


def test_encoder_batches_waiting_pieces_within_the_frame_budget() -> None:
    wm = demo_watermarker()
    pcms = [noise(3840, seed) for seed in range(6)]
    cost = frames_of(3840, 4096, 2048)
    enc = BatchEncoder(wm, max_frames=2 * cost + 1)
    try:
        with enc._cv:  # hold the thread off until all six wait: then the budget alone splits them
            futures = [enc.submit(p) for p in pcms]
        outs = [f.result(60) for f in futures]
        assert enc.stats()["pieces"] == 6 and enc.stats()["batches"] == 3
        for p, out in zip(pcms, outs):
            np.testing.assert_allclose(out, wm.apply(p), rtol=0, atol=ATOL)
        # A piece over the budget alone still runs (in a batch of its own).
        long = noise(24_000, 9)
        assert frames_of(long.size, 4096, 2048) > enc.max_frames
        np.testing.assert_allclose(enc.apply(long), wm.apply(long), rtol=0, atol=ATOL)
    finally:
        enc.close()


def test_first_pieces_run_before_waiting_later_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    wm = demo_watermarker()
    seen: list[list[int]] = []
    real = WB.encode_batch

    def recording(wm_, pcms, sdr):  # noqa: ANN001
        seen.append([p.size for p in pcms])
        return real(wm_, pcms, sdr)

    monkeypatch.setattr(WB, "encode_batch", recording)
    enc = BatchEncoder(wm)
    try:
        with enc._cv:  # three later pieces wait, then a stream's first piece arrives
            later = [enc.submit(noise(5760, i)) for i in range(3)]
            first = enc.submit(noise(1920, 9), first=True)
        np.testing.assert_allclose(first.result(60), wm.apply(noise(1920, 9)), rtol=0, atol=ATOL)
        assert all(f.result(60).size == 5760 for f in later)
    finally:
        enc.close()
    assert seen == [[1920], [5760, 5760, 5760]]
    # A stream hands its first piece (and only that one) to apply_first.
    calls: list[str] = []
    stream = wm.stream(0.16, 1.5, lambda p: calls.append("later") or wm.apply(p),
                       lambda p: calls.append("first") or wm.apply(p))
    stream.write(noise(3840 * 3, 1))
    stream.restart()
    stream.write(noise(3840, 2))
    assert calls == ["first", "later", "first"]


def test_encoder_under_concurrent_callers_equals_serial_apply() -> None:
    wm = demo_watermarker()
    pcms = [noise(1920 * (1 + i % 5), i) for i in range(24)]
    want = [wm.apply(p) for p in pcms]
    enc = BatchEncoder(wm)
    barrier = threading.Barrier(8)

    def call(i: int) -> np.ndarray:
        if i < 8:
            barrier.wait(30)
        return enc.apply(pcms[i])

    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(call, range(len(pcms))))
        assert enc.stats()["batches"] < len(pcms)  # pieces shared batches
    finally:
        enc.close()
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=0, atol=ATOL)


def test_encoder_failure_reaches_every_waiter_and_the_thread_lives_on(monkeypatch: pytest.MonkeyPatch) -> None:
    wm = demo_watermarker()
    enc = BatchEncoder(wm)
    real = WB.encode_batch

    def out_of_memory(*args: object) -> list[np.ndarray]:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(WB, "encode_batch", out_of_memory)
    try:
        with enc._cv:
            futures = [enc.submit(noise(1920, i)) for i in range(3)]
        for f in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result(30)
        monkeypatch.setattr(WB, "encode_batch", real)
        p = noise(1920, 7)
        np.testing.assert_allclose(enc.apply(p), wm.apply(p), rtol=0, atol=ATOL)
    finally:
        enc.close()
    with pytest.raises(RuntimeError, match="shut down"):
        enc.submit(noise(10, 0))


def test_close_finishes_waiting_pieces_first() -> None:
    wm = demo_watermarker()
    enc = BatchEncoder(wm)
    with enc._cv:
        futures = [enc.submit(noise(1920, i)) for i in range(3)]
        closer = threading.Thread(target=enc.close)
        closer.start()
    closer.join(60)
    assert not closer.is_alive() and all(f.result(0).size == 1920 for f in futures)


def test_stream_through_the_encoder_equals_stream_through_apply() -> None:
    wm = demo_watermarker()
    x = noise(24_000 * 3, 5)
    enc = BatchEncoder(wm)
    try:
        direct = StreamWatermarker(wm, 0.16, growth=1.5)
        batched = wm.stream(0.16, 1.5, enc.apply)
        a = [direct.write(x[i : i + 3840]) for i in range(0, x.size, 3840)] + [direct.flush()]
        b = [batched.write(x[i : i + 3840]) for i in range(0, x.size, 3840)] + [batched.flush()]
    finally:
        enc.close()
    assert [p.size for p in a] == [p.size for p in b]
    np.testing.assert_allclose(np.concatenate(b), np.concatenate(a), rtol=0, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_equals_one_piece_encodes_on_cuda() -> None:
    # Full-size random networks. cuDNN may pick other convolution algorithms (TF32 included) for
    # a batch than for one piece: equal to rounding of those, far below the mark itself.
    wm = Watermarker.random(seed=1, device="cuda")
    pcms = [noise(n, seed) for seed, n in enumerate(SIZES)]
    want = [wm.apply(p) for p in pcms]
    enc = BatchEncoder(wm)
    try:
        with enc._cv:
            futures = [enc.submit(p) for p in pcms]
        got = [f.result(60) for f in futures]
    finally:
        enc.close()
    for p, w, g in zip(pcms, want, got):
        mark = np.abs(w - p).max()
        assert g.shape == p.shape and np.abs(g - w).max() < 0.01 * mark


def test_istft_equals_torch_istft() -> None:
    # silentcipher's STFT shape: a Hann window of 2048 at a quarter hop, frames of one piece.
    win, hop = 2048, 512
    window = torch.hann_window(win)
    y = torch.randn(3, 4096 * 3)
    spec = torch.stft(y, win, hop, win, window=window, return_complex=True)
    want = torch.istft(spec, win, hop, win, window=window)
    got = WB.istft(spec, win, hop, window)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_waits_for_the_device_only_for_its_result() -> None:
    # Under load the engine's steps go first: each wait inside a batch cost it a step or more.
    wm = Watermarker.random(seed=1, device="cuda")
    pcms = [noise(n, seed) for seed, n in enumerate(SIZES[:6])]
    WB._encode_on_device(wm, pcms, 36.0)  # first use builds the resampling kernels and messages
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # the device busy ahead of the batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        marked = WB._encode_on_device(wm, pcms, 36.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.cuda.current_stream().query()  # all of it queued while the device still slept
    want = WB.encode_batch(wm, pcms, 36.0)
    for row, w in enumerate(want):
        np.testing.assert_allclose(marked[row, : w.size].cpu().numpy(), w, atol=1e-5)
