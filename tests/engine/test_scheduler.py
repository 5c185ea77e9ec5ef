"""Scheduler and Planner on CPU with fake rows and fake runner outputs: no model, no device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_voice_api.engine.scheduler import Planner, Request, Scheduler, Status
from csm_voice_api.engine.types import Conversation, Sampling, Segment, VoicePrompt
from csm_voice_api.errors import ContextOverflow

K = 4


def rows(seg: Segment):
    """Fake prompt rows: one text row per character, then frames + EOS when the segment has codes."""
    n = len(seg.text) + (0 if seg.codes is None else seg.codes.shape[1] + 1)
    return torch.zeros(n, K + 1, dtype=torch.long), torch.zeros(n, K + 1, dtype=torch.bool)


def voice(n_frames=3):
    return VoicePrompt((Segment(0, "ref", torch.zeros(K, n_frames, dtype=torch.long)),))


def make(max_pos=100, slots=2, cached=()):
    planner = Planner(rows, max_pos, lambda key: key in cached)
    return Scheduler(planner, slots, prefill_chunk=8)


def request(conv, text="hello", frames=5, sink=None):
    out = [] if sink is None else sink
    return Request(id=f"r{id(conv)}{text}", conversation=conv, text=text, speaker=0,
                   sampling=Sampling(max_audio_ms=frames * 80), seed=1, chunk_frames=2, sink=out.append), out


def step(s: Scheduler, B: int, eos_rows=()):
    codes = np.ones((B, K), np.int64)
    audible = np.ones(B, bool)
    for r in eos_rows:
        codes[r], audible[r] = 0, False
    return s.update(codes, audible, np.zeros((B, 1920), np.float32))


def run_prefill(s: Scheduler):
    while s.next_prefill() is not None:
        pass
    for r in s.ready_to_start():
        r.status = Status.RUNNING


def test_cold_plan_prefills_voice_then_text_and_caches_voice():
    conv = Conversation(voice(3))
    plan = make().planner.plan(conv, "hello", 0, 5, warm=False)
    # voice: 3 text rows + 3 frames + EOS = 7; new text: 5 rows, the last is the first decode input
    assert [p.start for p in plan.pieces] == [0, 7]
    assert plan.pieces[0].store_voice_key == conv.voice.key
    assert len(plan.pieces[1].tokens) == 4 and plan.start_pos == 11 and plan.rebuilt


def test_cached_voice_is_copied_not_computed():
    conv = Conversation(voice(3))
    plan = make(cached={conv.voice.key}).planner.plan(conv, "hi", 0, 5, warm=False)
    assert plan.pieces[0].voice_key == conv.voice.key and plan.pieces[0].n == 7


def test_warm_plan_appends_only_the_new_text():
    conv = Conversation(voice(3), position=20)
    plan = make().planner.plan(conv, "abc", 0, 5, warm=True)
    assert [(p.start, len(p.tokens)) for p in plan.pieces] == [(20, 2)] and plan.start_pos == 22
    assert not plan.rebuilt


def test_full_window_rolls_over_keeping_recent_turns():
    turns = [Segment(0, f"turn{i}", torch.zeros(K, 10, dtype=torch.long)) for i in range(5)]  # 16 rows each
    conv = Conversation(voice(3), turns=list(turns), position=95)
    plan = make(max_pos=100).planner.plan(conv, "next", 0, 20, warm=True)
    # 100 - voice 7 - (4 text + 20 frames + 1 EOS) = 68 positions: the 4 most recent turns fit
    assert plan.rebuilt and [p.start for p in plan.pieces] == [0, 7, 23, 39, 55, 71]


def test_overflow_names_the_budget():
    with pytest.raises(ContextOverflow, match="100-position window"):
        make(max_pos=100).planner.plan(Conversation(voice(50)), "text", 0, 60, warm=False)


def test_eos_closes_after_one_more_step_and_records_position():
    s = make()
    conv = Conversation(voice(3))
    req, out = request(conv, "hello", frames=50)
    s.add(req)
    s.admit()
    run_prefill(s)
    assert s.decode_rows() == 1
    step(s, 1)
    step(s, 1)  # two frames spoken
    step(s, 1, eos_rows=[0])
    assert req.status is Status.CLOSING and not out[-1].done
    done = step(s, 1)  # this step wrote the EOS frame's KV
    assert done == [req] and req.status is Status.FINISHED_EOS
    assert out[-1].done and out[-1].stop_reason == "eos"
    assert sum(c.frames for c in out) == 2
    assert conv.turns[-1].codes.shape == (K, 2)
    assert conv.position == req.start_pos + 2 + 2  # text's last row, 2 frames, EOS frame
    assert conv.slot == 0 and 0 not in s.running  # warm, idle


def test_length_limit_closes_at_once_then_the_eos_frame_follows():
    """The engine queues the next step before it applies this one's outputs, so the step in flight
    feeds the last frame: the row is closed at once and the EOS frame follows it directly."""
    s = make()
    req, out = request(Conversation(voice()), frames=3)
    s.add(req)
    s.admit()
    run_prefill(s)
    for _ in range(3):
        step(s, 1)
    assert req.status is Status.CLOSING and s.to_close == [0]
    step(s, 1)  # the frame fed in flight: its output is not kept
    assert req.status is Status.FINISHED_LENGTH and out[-1].stop_reason == "max_length"
    assert sum(c.frames for c in out) == 3
    assert req.conversation.position == req.start_pos + 3 + 2


def test_outputs_of_steps_before_a_request_started_are_not_its_own():
    s = make()
    req, out = request(Conversation(voice()), frames=5)
    s.add(req)
    s.admit()
    run_prefill(s)
    req.start_step = 7
    codes, silent = np.zeros((1, K), np.int64), np.zeros(1, bool)
    s.update(codes, silent, np.zeros((1, 1920), np.float32), step=6)  # the slot's previous owner's EOS
    assert req.status is Status.RUNNING and not req.frames
    s.update(np.ones((1, K), np.int64), np.ones(1, bool), np.zeros((1, 1920), np.float32), step=7)
    assert len(req.frames) == 1


def test_abort_frees_the_slot_at_once():
    s = make(slots=1)
    conv = Conversation(voice())
    req, out = request(conv)
    s.add(req)
    s.admit()
    run_prefill(s)
    step(s, 1)
    assert s.abort(req.id) is req
    assert req.status is Status.FINISHED_ABORTED and out[-1].stop_reason == "aborted"
    assert s.free == [0] and conv.slot is None and conv.turns == []


def test_idle_warm_slot_is_evicted_lru_when_full():
    s = make(slots=2)
    convs = [Conversation(voice()) for _ in range(3)]
    for conv in convs[:2]:
        req, _ = request(conv, frames=1)
        s.add(req)
        s.admit()
        run_prefill(s)
        step(s, 2, eos_rows=[0, 1])
        step(s, 2)
    assert {c.slot for c in convs[:2]} == {0, 1}
    req, _ = request(convs[2])
    s.add(req)
    s.admit()
    assert convs[0].slot is None and convs[0].turns  # evicted, context kept
    assert convs[2].slot == 0


def test_one_utterance_at_a_time_per_conversation():
    s = make()
    conv = Conversation(voice())
    first, _ = request(conv, "one")
    second, _ = request(conv, "two")
    s.add(first)
    s.add(second)
    s.admit()
    assert first.status is Status.PREFILLING and second.status is Status.WAITING
