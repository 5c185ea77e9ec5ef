"""api/audio_out.watermarked: the one helper every route's PCM goes through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import numpy as np
import pytest

from csm_voice_api.api.audio_out import response_watermark, watermarked
from csm_voice_api.audio.watermark import StreamWatermarker, demo_watermarker

from ..audio.test_watermark import voice_like

CHUNK = 3840  # two engine frames


def pieces(x: np.ndarray, fail_at: int | None = None) -> AsyncIterator[np.ndarray]:
    async def gen() -> AsyncIterator[np.ndarray]:
        for i in range(0, x.size, CHUNK):
            if fail_at is not None and i >= fail_at:
                raise RuntimeError("engine failed")
            yield x[i : i + CHUNK]

    return gen()


async def collect(source: AsyncIterator[np.ndarray]) -> list[np.ndarray]:
    async with aclosing(source) as it:  # type: ignore[type-var]
        return [p async for p in it]


async def test_off_passes_audio_through_untouched() -> None:
    x = voice_like(0.5)
    got = await collect(watermarked(pieces(x), None))
    want = [x[i : i + CHUNK] for i in range(0, x.size, CHUNK)]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert response_watermark() is None  # outside a request of a watermarking app


async def test_on_is_the_stream_watermarker_flushed_at_the_end() -> None:
    wm = demo_watermarker()
    x = voice_like(0.45)  # not a whole number of chunks: the flush carries the rest
    stream = wm.stream(0.16)
    out = np.concatenate(await collect(watermarked(pieces(x), stream)))
    ref = StreamWatermarker(wm, 0.16)
    want = np.concatenate([*(ref.write(x[i : i + CHUNK]) for i in range(0, x.size, CHUNK)), ref.flush()])
    np.testing.assert_array_equal(out, want)
    assert out.shape == x.shape and not np.array_equal(out, x) and stream.pending == 0


async def test_a_cut_response_drops_what_it_did_not_return() -> None:
    stream = demo_watermarker().stream(0.3)  # pieces longer than a chunk: audio waits in the stream
    x = voice_like(0.6, seed=1)
    gen = watermarked(pieces(x), stream)
    first = await anext(gen)
    assert first.size == 7200 and stream.pending > 0
    await gen.aclose()  # the client left
    assert stream.pending == 0
    # The stream goes on from the audio actually returned (the next phrase of a WebSocket).
    y = voice_like(0.4, seed=2)
    assert sum(p.size for p in await collect(watermarked(pieces(y), stream))) == y.size


async def test_an_engine_error_propagates_and_drops_pending_audio() -> None:
    stream = demo_watermarker().stream(0.3)
    with pytest.raises(RuntimeError, match="engine failed"):
        await collect(watermarked(pieces(voice_like(0.6), fail_at=3 * CHUNK), stream))
    assert stream.pending == 0


async def test_each_utterance_on_a_stream_starts_with_a_small_piece() -> None:
    # A WebSocket's phrases share one stream (one message grid). Grown to whole periods by the
    # first phrase, the second's first audio would wait for the rest of a period (up to 0.975 s
    # of generated audio: a playback stall at every phrase under load); it waits for one chunk.
    stream = demo_watermarker().stream(0.16, growth=1.5)
    first = voice_like(1.5, seed=1)
    assert sum(p.size for p in await collect(watermarked(pieces(first), stream))) == first.size
    second = voice_like(1.0, seed=2)
    got = await collect(watermarked(pieces(second), stream))
    assert got[0].size == CHUNK and sum(p.size for p in got) == second.size


async def test_only_chunks_that_end_a_piece_go_to_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    # A grown stream's chunks mostly add to its current piece: those stay on the event loop.
    from csm_voice_api.api import audio_out

    workers = audio_out.WatermarkWorkers(2)
    calls = 0
    real = workers.run

    async def counted(fn, **kw):  # noqa: ANN001, ANN003
        nonlocal calls
        calls += 1
        return await real(fn, **kw)

    monkeypatch.setattr(workers, "run", counted)
    monkeypatch.setattr(audio_out, "_default_workers", lambda: workers)
    wm = demo_watermarker()
    x = voice_like(3.0, seed=4)
    out = np.concatenate(await collect(watermarked(pieces(x), wm.stream(0.16, growth=1.5))))
    ref = StreamWatermarker(wm, 0.16, growth=1.5)
    written = [ref.write(x[i : i + CHUNK]) for i in range(0, x.size, CHUNK)]
    tail = ref.flush()
    np.testing.assert_array_equal(out, np.concatenate([*written, tail]))
    # One call per chunk that ended a piece, one for the flush of the rest; none for the others.
    assert calls == sum(p.size > 0 for p in written) + (tail.size > 0) < len(written) // 2
    workers.shutdown()
