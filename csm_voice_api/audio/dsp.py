"""Small sample-level helpers shared by the encoders: s16 conversion and tempo change."""

from __future__ import annotations

import av
import av.filter
import numpy as np

MIN_SPEED = 0.25
MAX_SPEED = 4.0


def to_s16(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, clipped and rounded (not truncated, which would bias)."""
    x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
    return np.rint(x * 32767.0).astype(np.int16)


def tempo(pcm: np.ndarray, speed: float, sample_rate: int = 24_000) -> np.ndarray:
    """Play `pcm` (float32 mono) `speed` times faster without changing its pitch.

    `speed` in [0.25, 4]; the output lasts about len(pcm) / speed samples.
    """
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be within {MIN_SPEED}-{MAX_SPEED}, got {speed}")
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    if speed == 1.0 or len(pcm) == 0:
        return pcm.copy()
    graph = av.filter.Graph()
    src = graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}")
    node = src
    for factor in _atempo_stages(speed):
        stage = graph.add("atempo", f"{factor:.9f}")
        node.link_to(stage)
        node = stage
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()

    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = 0
    graph.push(frame)
    graph.push(None)
    out: list[np.ndarray] = []
    while True:
        try:
            f = graph.pull()
        except (av.error.BlockingIOError, av.error.EOFError):
            break
        out.append(f.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _atempo_stages(speed: float) -> list[float]:
    # One atempo stage stays within 0.5-2.0 (where it sounds best); chain stages beyond that.
    stages: list[float] = []
    while speed > 2.0:
        stages.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        stages.append(0.5)
        speed /= 0.5
    stages.append(speed)
    return stages
