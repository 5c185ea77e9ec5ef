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
    stream = Tempo(speed, sample_rate)
    return np.concatenate([stream.write(pcm), stream.flush()])


class Tempo:
    """Streaming `tempo`: one filter graph for a whole response, so chunk edges do not click.

    `write(pcm)` returns what the filter has ready (it holds back a window of ~tens of ms),
    `flush()` the rest; speed 1.0 passes samples straight through.
    """

    def __init__(self, speed: float, sample_rate: int = 24_000):
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be within {MIN_SPEED}-{MAX_SPEED}, got {speed}")
        self.speed = speed
        self.sample_rate = sample_rate
        self._pts = 0
        self._flushed = False
        self._graph: av.filter.Graph | None = None if speed == 1.0 else self._build()

    def _build(self) -> av.filter.Graph:
        graph = av.filter.Graph()
        rate = self.sample_rate
        node = graph.add_abuffer(format="flt", sample_rate=rate, layout="mono", time_base=f"1/{rate}")
        for factor in _atempo_stages(self.speed):
            stage = graph.add("atempo", f"{factor:.9f}")
            node.link_to(stage)
            node = stage
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        return graph

    def write(self, pcm: np.ndarray) -> np.ndarray:
        if self._flushed:
            raise ValueError("write() after flush(): make a new Tempo per response")
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if self._graph is None or len(pcm) == 0:
            return pcm.copy()
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        self._graph.push(frame)
        return self._pull()

    def flush(self) -> np.ndarray:
        self._flushed = True
        if self._graph is None:
            return np.zeros(0, np.float32)
        self._graph.push(None)
        out = self._pull()
        self._graph = None
        return out

    def _pull(self) -> np.ndarray:
        assert self._graph is not None
        out: list[np.ndarray] = []
        while True:
            try:
                f = self._graph.pull()
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
