from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from csm_voice_api.audio.codec import FRAME_SAMPLES, MimiCodec, StreamingDecoder

K = 32


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=GPU), pytest.param("cuda-graph", marks=GPU)])
def codec(request) -> Iterator[MimiCodec]:
    """The tiny random Mimi. On CUDA its streaming steps go through moshi's partial CUDA graphs;
    with "cuda-graph" every streaming decoder is also captured whole (StreamingDecoder.capture),
    as the engine runs it."""
    if request.param == "cpu":
        torch.set_num_threads(1)
    # TF32 would make streaming and offline differ by more than fp32 rounding
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    codec = MimiCodec.load(None, request.param.split("-")[0], tiny=True, seed=0)
    if request.param == "cuda-graph":
        opened = codec.streaming

        @contextmanager
        def captured(batch_size: int) -> Iterator[StreamingDecoder]:
            with opened(batch_size) as dec:
                dec.capture()
                assert dec.captured
                yield dec

        codec.streaming = captured  # type: ignore[method-assign]
    yield codec
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def rand_codes(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (K, T), generator=g)


def stream_rows(codec: MimiCodec, schedule: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]):
    """Run (codes [B,K], active [B], reset-before [B] or None) steps; collect each row's active output."""
    B = schedule[0][0].shape[0]
    outs: list[list[torch.Tensor]] = [[] for _ in range(B)]
    with codec.streaming(B) as dec:
        for codes, active, reset in schedule:
            if reset is not None:
                dec.reset(reset)
            pcm = dec.step(codes, active)
            assert pcm.shape == (B, FRAME_SAMPLES) and pcm.dtype == torch.float32
            for b in range(B):
                if active[b]:
                    outs[b].append(pcm[b].cpu())
                else:
                    assert int(torch.count_nonzero(pcm[b])) == 0
    return [torch.cat(o) if o else torch.empty(0) for o in outs]


@pytest.mark.parametrize("frames", [1, 3])
def test_encode_gives_one_frame_per_1920_samples(codec: MimiCodec, frames: int) -> None:
    pcm = np.random.default_rng(frames).standard_normal(frames * FRAME_SAMPLES).astype(np.float32)
    codes = codec.encode(0.1 * pcm)
    assert codes.shape == (K, frames) and codes.dtype == torch.int64
    assert codes.device.type == "cpu"
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    # a partial frame is padded up, not dropped
    assert codec.encode(np.full(frames * FRAME_SAMPLES + 1, 0.1, np.float32)).shape == (K, frames + 1)


def test_decode_length_and_codes_matter(codec: MimiCodec) -> None:
    codes = rand_codes(4, seed=1)
    pcm = codec.decode(codes)
    assert pcm.shape == (4 * FRAME_SAMPLES,) and pcm.dtype == np.float32
    other = codes.clone()
    other[7, 2] = (other[7, 2] + 1) % 2048
    assert not np.allclose(codec.decode(other), pcm)  # random codebooks: every code counts


@pytest.mark.parametrize("B", [1, 3])
def test_streaming_equals_offline(codec: MimiCodec, B: int) -> None:
    T = 12  # past the tiny transformer's 8-frame context, so the ring KV cache wraps
    codes = [rand_codes(T, seed=10 + b) for b in range(B)]
    ones = torch.ones(B, dtype=torch.bool)
    got = stream_rows(codec, [(torch.stack([c[:, t] for c in codes]), ones, None) for t in range(T)])
    for b in range(B):
        assert_close(got[b], torch.from_numpy(codec.decode(codes[b])))


def test_row_alone_equals_row_in_busy_batch(codec: MimiCodec) -> None:
    T = 10
    mine, noise = rand_codes(T, 20), rand_codes(2 * T, 21)
    alone = stream_rows(codec, [(mine[:, t][None], torch.ones(1, dtype=torch.bool), None) for t in range(T)])
    schedule = []
    for t in range(T):
        # row 0: ours; row 1: always active; row 2: idle on odd steps; row 3: reset every 3 steps
        codes = torch.stack([mine[:, t], noise[:, t], noise[:, T + t], noise[:, t].flip(0)])
        active = torch.tensor([True, True, t % 2 == 0, True])
        reset = torch.tensor([False, False, False, True]) if t % 3 == 2 else None
        schedule.append((codes, active, reset))
    batched = stream_rows(codec, schedule)
    assert_close(batched[0], alone[0])
    assert_close(batched[0], torch.from_numpy(codec.decode(mine)))


def test_idle_steps_do_not_advance_a_row(codec: MimiCodec) -> None:
    T = 10
    mine, junk = rand_codes(T, 30), rand_codes(3 * T, 31)
    schedule, t = [], 0
    for step in range(3 * T):
        if t < T and step % 3 == 1:  # active every third step, fed junk while idle
            schedule.append((mine[:, t][None], torch.tensor([True]), None))
            t += 1
        else:
            schedule.append((junk[:, step][None], torch.tensor([False]), None))
    assert t == T
    (got,) = stream_rows(codec, schedule)
    assert_close(got, torch.from_numpy(codec.decode(mine)))


def test_reset_row_reproduces_fresh_stream(codec: MimiCodec) -> None:
    old, new, other = rand_codes(9, 40), rand_codes(6, 41), rand_codes(15, 42)
    schedule = []
    for t in range(15):
        row0 = old[:, t] if t < 9 else new[:, t - 9]
        reset = torch.tensor([True, False]) if t == 9 else None
        schedule.append((torch.stack([row0, other[:, t]]), torch.ones(2, dtype=torch.bool), reset))
    got = stream_rows(codec, schedule)
    fresh = torch.from_numpy(codec.decode(new))
    assert_close(got[0][9 * FRAME_SAMPLES :], fresh)
    # and resetting row 0 left row 1 alone
    assert_close(got[1], torch.from_numpy(codec.decode(other)))
    # sanity: without the reset row 0 would have sounded different
    assert not torch.allclose(torch.from_numpy(codec.decode(torch.cat([old, new], 1)))[9 * FRAME_SAMPLES :], fresh)


def test_offline_calls_work_while_streaming(codec: MimiCodec) -> None:
    codes = rand_codes(4, 50)
    expected = codec.decode(codes)
    with codec.streaming(1) as dec:
        first = dec.step(codes[:, 0][None], torch.tensor([True]))
        np.testing.assert_allclose(codec.decode(codes), expected)
        assert codec.encode(expected).shape == (K, 4)
        rest = [dec.step(codes[:, t][None], torch.tensor([True])) for t in range(1, 4)]
    assert_close(torch.cat([first, *rest], 1)[0].cpu(), torch.from_numpy(expected))


def test_bad_shapes_are_refused(codec: MimiCodec) -> None:
    with pytest.raises(ValueError, match="codes must be"):
        codec.decode(torch.zeros(8, 3, dtype=torch.int64))
    with codec.streaming(2) as dec, pytest.raises(ValueError, match="codes must be"):
        dec.step(torch.zeros(3, K, dtype=torch.int64), torch.ones(3, dtype=torch.bool))


def test_seed_makes_random_weights_reproducible() -> None:
    codes = rand_codes(2, 60)
    a = MimiCodec.load(None, tiny=True, seed=5).decode(codes)
    b = MimiCodec.load(None, tiny=True, seed=5).decode(codes)
    c = MimiCodec.load(None, tiny=True, seed=6).decode(codes)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        MimiCodec.load(tmp_path / "nope.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_full_size_random_mimi_round_trips_a_frame(tmp_path, device: str) -> None:
    from safetensors.torch import save_file

    codec = MimiCodec.load(None, device, seed=0)
    assert sum(p.numel() for p in codec.model.parameters()) > 70_000_000
    codes = codec.encode(np.zeros(FRAME_SAMPLES, np.float32))
    assert codes.shape == (K, 1)
    pcm = codec.decode(codes)
    assert pcm.shape == (FRAME_SAMPLES,) and np.isfinite(pcm).all()
    for whole_graph in [False, True] if device == "cuda" else [False]:
        with codec.streaming(1) as dec:
            if whole_graph:
                dec.capture()
            for _ in range(3):  # on CUDA: eager, then moshi's graph capture, then replay
                got = dec.step(codes.T, torch.tensor([True]))[0].cpu()
                assert_close(got, torch.from_numpy(pcm), atol=1e-4, rtol=1e-3)
                dec.reset(torch.tensor([True]))
    # the weights path goes through moshi's own loader
    path = tmp_path / "mimi.safetensors"
    save_file({k: v.contiguous() for k, v in codec.model.state_dict().items()}, str(path))
    np.testing.assert_array_equal(MimiCodec.load(path, device).decode(codes), pcm)
