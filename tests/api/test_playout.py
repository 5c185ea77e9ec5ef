"""A stream's audio against a listener playing it in real time (api/playout.py), on a fake clock."""

from __future__ import annotations

import pytest

from csm_voice_api.api.playout import Playout, RecentStalls
from csm_voice_api.engine.types import SAMPLE_RATE


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_listener_hears_a_gap_only_when_audio_is_ready_after_it_ran_out():
    clock = Clock()
    p = Playout(clock)
    assert p.ready(SAMPLE_RATE) == 0  # 1 s at t=0: plays until t=1
    clock.t = 0.9
    assert p.ready(SAMPLE_RATE // 2) == 0  # ready in time: plays on until 1.5
    clock.t = 1.8
    assert p.ready(SAMPLE_RATE) == pytest.approx(0.3)  # 0.3 s of silence, then plays 1.8 .. 2.8
    clock.t = 2.7
    assert p.ready(SAMPLE_RATE) == 0  # the listener re-buffered at the gap: in time again


def test_time_spent_handing_audio_to_the_client_is_not_a_stall():
    clock = Clock()
    p = Playout(clock)
    p.ready(SAMPLE_RATE // 10)  # 0.1 s
    p.handed_over(2.0)  # a slow reader held the response for 2 s
    clock.t = 2.05
    assert p.ready(SAMPLE_RATE // 10) == 0


def test_recent_stalls_keep_the_worst_of_their_window():
    clock = Clock()
    recent = RecentStalls(5.0, clock)
    assert recent.worst() == 0
    recent.record(0.3)
    clock.t = 2.0
    recent.record(0.1)
    assert recent.worst() == 0.3
    clock.t = 5.5
    assert recent.worst() == 0.1  # the first one is out of the window
    clock.t = 7.5
    assert recent.worst() == 0
