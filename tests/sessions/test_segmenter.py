from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csm_voice_api.errors import InvalidInput
from csm_voice_api.sessions.segmenter import PhraseSegmenter

CORPUS = [
    "Hello there! How are you today? I'm fine, thanks; and you: still here — good.",
    "Dr. Smith met Mr. Jones and Mrs. Brown at St. Mary's, vs. the Prof. of Ms. Lee's class.",
    "It costs 3.5 dollars, or 1,000 in bulk, at 10:30 a.m. or 5 p.m. sharp, said J. R. R. Tolkien.",
    "Visit https://x.y/z?q=1.2&r=3,4 or write to a.b@c.d. Then wait... and wait… then go.",
    "Bring fruit, e.g. apples, i.e. the red ones, etc. from the U.S. market, okay? Sure!",
    "你好，世界。这是一个测试！真的吗？是的、没错；好：结束。",
    '"Stop!" she said. (Really?) Yes. He said "Go." Then left.',
    "  Lots   of\n\nwhitespace\there ,  and   there .  End  ",
    "word " * 80 + "and a supercalifragilisticexpialidocious " * 10 + "end.",
    "Pages 10–20 — see below – or above. Values: 1.2.3, v2.0; 3.14159!",
    "Short. Tiny. A. B. Ok. Fine, sure, yes, no, maybe.",
]


def run(seg: PhraseSegmenter, pieces: list[str]) -> list[str]:
    out: list[str] = []
    for p in pieces:
        out += seg.push(p)
    return out + seg.flush()


def split_fixed(text: str, k: int) -> list[str]:
    return [text[i : i + k] for i in range(0, len(text), k)]


def split_random(text: str, rng: random.Random, lo: int = 1, hi: int = 4) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(lo, hi)
        pieces.append(text[i : i + n])
        i += n
    return pieces


def squash(s: str) -> str:
    return "".join(s.split())


def phrases(text: str, **kw) -> list[str]:
    return run(PhraseSegmenter(**kw), [text])


@pytest.mark.parametrize("text", CORPUS)
@pytest.mark.parametrize("kw", [dict(min_chars=0, max_chars=60), dict(min_chars=15, max_chars=120)])
def test_output_is_independent_of_chunking(text: str, kw: dict) -> None:
    whole = phrases(text, **kw)
    assert whole, "every corpus text has content"
    splits = [split_fixed(text, k) for k in (1, 2, 3, 4)]
    rng = random.Random(1234)
    splits += [split_random(text, rng) for _ in range(6)]
    for pieces in splits:
        assert run(PhraseSegmenter(**kw), pieces) == whole
    assert squash("".join(whole)) == squash(text)
    for p in whole:
        assert p and p == p.strip() and "  " not in p and "\n" not in p
        assert len(p) <= kw["max_chars"]


def test_sentence_and_clause_punctuation() -> None:
    text = "Hello there! How are you? Fine, thanks; and you: good — yes. Done… ok"
    assert phrases(text, min_chars=0) == [
        "Hello there!", "How are you?", "Fine,", "thanks;", "and you:", "good —", "yes.", "Done…", "ok",
    ]


def test_cjk_punctuation_needs_no_space() -> None:
    assert phrases("你好，世界。这是测试！真的吗？是、好；好：结束", min_chars=0) == [
        "你好，", "世界。", "这是测试！", "真的吗？", "是、", "好；", "好：", "结束",
    ]


def test_punctuation_runs_and_closing_quotes_stay_with_the_phrase() -> None:
    text = 'She asked "why?!" Then (quietly.) left... Really?!? Yes.'
    assert phrases(text, min_chars=0) == [
        'She asked "why?!"', "Then (quietly.)", "left...", "Really?!?", "Yes.",
    ]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The value is 3.5 today. Next", ["The value is 3.5 today."]),
        ("We sold 1,000 units. Next", ["We sold 1,000 units."]),
        ("Meet at 10:30 sharp. Next", ["Meet at 10:30 sharp."]),
        ("Versions 1.2.3 and v2.0 shipped. Next", ["Versions 1.2.3 and v2.0 shipped."]),
        ("Ask Dr. Who now. Next", ["Ask Dr. Who now."]),
        ("Mr. and Mrs. Smith and Ms. Lee. Next", ["Mr. and Mrs. Smith and Ms. Lee."]),
        ("Prof. X at St. Paul, Jr. too. Next", ["Prof. X at St. Paul,", "Jr. too."]),
        ("Cats vs. dogs, round two. Next", ["Cats vs. dogs,", "round two."]),
        ("Fruit, e.g. apples, is fine. Next", ["Fruit,", "e.g. apples,", "is fine."]),
        ("Red, i.e. ripe, is best. Next", ["Red,", "i.e. ripe,", "is best."]),
        ("Pens, paper, etc. are here. Next", ["Pens,", "paper,", "etc. are here."]),
        ("Made in the U.S. by hand. Next", ["Made in the U.S. by hand."]),
        ("At 9 a.m. or 5 p.m. daily. Next", ["At 9 a.m. or 5 p.m. daily."]),
        ("By J. R. R. Tolkien himself. Next", ["By J. R. R. Tolkien himself."]),
        ("See https://x.y/z?q=1.2 now. Next", ["See https://x.y/z?q=1.2 now."]),
        ("Go to https://a.b/c:8080/d,e;f now. Next", ["Go to https://a.b/c:8080/d,e;f now."]),
        ("Mail a.b@c.d today. Next", ["Mail a.b@c.d today."]),
        ("Pages 10–20 only. Next", ["Pages 10–20 only."]),
        ("He paused... then spoke. Next", ["He paused...", "then spoke."]),
    ],
)
def test_never_split_rules(text: str, expected: list[str]) -> None:
    # min_chars=0 splits at every accepted mark: the protected marks must still hold.
    for pieces in ([text], split_fixed(text, 1), split_fixed(text, 3)):
        assert run(PhraseSegmenter(min_chars=0), pieces) == expected + ["Next"]


def test_trailing_period_waits_for_the_next_character() -> None:
    seg = PhraseSegmenter(min_chars=0)
    assert seg.push("It is 3.") == []
    assert seg.pending == "It is 3."
    assert seg.push("5") == []
    assert seg.push(" now. ") == ["It is 3.5 now."]
    assert seg.push("Count 3.") == []
    assert seg.push(" Then") == ["Count 3."]
    assert seg.flush() == ["Then"]


def test_ellipsis_in_progress_is_not_split() -> None:
    seg = PhraseSegmenter(min_chars=0)
    assert seg.push("Well.") == []
    assert seg.push(".") == []
    assert seg.push(".") == []
    assert seg.push(" I") == ["Well..."]
    assert seg.flush() == ["I"]


def test_flush_resolves_pending_marks_and_ends_at_abbreviation() -> None:
    seg = PhraseSegmenter(min_chars=0)
    assert seg.push("One. Two 3.") == ["One."]
    assert seg.flush() == ["Two 3."]
    assert seg.push("Call Dr.") == []
    assert seg.flush() == ["Call Dr."]
    assert seg.flush() == []


def test_min_chars_merges_short_phrases() -> None:
    text = "Yes. No. Maybe, later. This is a longer sentence, with a clause."
    assert phrases(text, min_chars=0) == [
        "Yes.", "No.", "Maybe,", "later.", "This is a longer sentence,", "with a clause.",
    ]
    assert phrases(text, min_chars=10) == [
        "Yes. No. Maybe,", "later. This is a longer sentence,", "with a clause.",
    ]
    assert phrases(text, min_chars=1000, max_chars=1000) == [" ".join(text.split())]


def test_max_chars_cuts_at_last_word_boundary() -> None:
    words = [f"w{i:02d}" for i in range(40)]  # 3 chars each, no punctuation
    out = phrases(" ".join(words), min_chars=0, max_chars=17)
    assert out[:2] == ["w00 w01 w02 w03", "w04 w05 w06 w07"]  # 15 chars: a 5th word makes 19
    assert " ".join(out).split() == words
    assert all(len(p) <= 17 for p in out)


def test_max_chars_cut_lands_exactly_on_the_limit() -> None:
    # "aaaa bbbb" is 9 chars: with max 9 the space after it is the cut, not the one before.
    assert phrases("aaaa bbbb cccc dddd", min_chars=0, max_chars=9) == ["aaaa bbbb", "cccc dddd"]


def test_max_chars_hard_cut_without_spaces() -> None:
    assert phrases("x" * 25, min_chars=0, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_punctuation_beyond_max_chars_yields_to_word_cut() -> None:
    # The mark's phrase would be 13 chars ("aaaa bbbb cc!"), over max 12: cut at the space.
    assert phrases("aaaa bbbb cc! dd", min_chars=0, max_chars=12) == ["aaaa bbbb", "cc!", "dd"]


def test_whitespace_normalised_and_no_empty_phrases() -> None:
    seg = PhraseSegmenter(min_chars=0)
    assert seg.push("   ") == []
    assert seg.push("\n\t") == []
    assert seg.pending == ""
    assert seg.flush() == []
    assert seg.push("  Hello \n\n  world ,") == []
    assert seg.push("  \tyes .  ") == ["Hello world ,", "yes ."]
    assert seg.flush() == []


def test_push_final_emits_everything() -> None:
    seg = PhraseSegmenter(min_chars=0)
    assert seg.push("Hi there. And 3.", final=True) == ["Hi there.", "And 3."]
    assert seg.pending == ""


def test_idle_flush_with_caller_clock() -> None:
    seg = PhraseSegmenter(min_chars=50, idle_flush_s=0.5)
    assert seg.deadline(0.0) is None
    assert seg.poll_idle(100.0) == []
    assert seg.push("Hello there,", now=10.0) == []
    assert seg.deadline(10.2) == pytest.approx(0.3)
    assert seg.poll_idle(10.49) == []
    assert seg.push(" friend", now=10.4) == []
    assert seg.deadline(10.6) == pytest.approx(0.3)  # new text restarted the timer
    assert seg.poll_idle(10.89) == []
    assert seg.deadline(11.5) == 0.0
    assert seg.poll_idle(10.9) == ["Hello there, friend"]
    assert seg.deadline(20.0) is None
    assert seg.poll_idle(20.0) == []


def test_idle_flush_disabled() -> None:
    seg = PhraseSegmenter(idle_flush_s=None)
    seg.push("Hello", now=0.0)
    assert seg.deadline(1e9) is None
    assert seg.poll_idle(1e9) == []
    assert seg.flush() == ["Hello"]


def test_clear_drops_buffer() -> None:
    seg = PhraseSegmenter(min_chars=0)
    seg.push("Half a sent", now=0.0)
    seg.clear()
    assert seg.pending == ""
    assert seg.deadline(5.0) is None
    assert seg.push("New one. ") == ["New one."]


@pytest.mark.parametrize(
    "kw,param",
    [
        (dict(min_chars=-1), "min_chars"),
        (dict(min_chars=10, max_chars=5), "max_chars"),
        (dict(max_chars=0, min_chars=0), "max_chars"),
        (dict(idle_flush_s=0), "idle_flush_s"),
    ],
)
def test_invalid_settings(kw: dict, param: str) -> None:
    with pytest.raises(InvalidInput) as e:
        PhraseSegmenter(**kw)
    assert e.value.param == param


ALPHABET = "ab 3.,;:!?…—–'\"()@/\n。，Dr"


@settings(max_examples=150, deadline=None)
@given(
    text=st.lists(st.sampled_from(list(ALPHABET) + ["Dr.", "e.g.", "3.5", "..."]), max_size=60).map("".join),
    cuts=st.lists(st.integers(min_value=1, max_value=4), max_size=100),
    min_chars=st.integers(min_value=0, max_value=8),
    max_chars=st.integers(min_value=8, max_value=30),
)
def test_property_chunking_never_changes_phrases(text: str, cuts: list[int], min_chars: int, max_chars: int) -> None:
    kw = dict(min_chars=min_chars, max_chars=max_chars)
    whole = phrases(text, **kw)
    pieces, i = [], 0
    for n in cuts:
        pieces.append(text[i : i + n])
        i += n
    pieces.append(text[i:])
    assert run(PhraseSegmenter(**kw), pieces) == whole
    assert squash("".join(whole)) == squash(text)
    assert all(p and p == " ".join(p.split()) and len(p) <= max_chars for p in whole)
