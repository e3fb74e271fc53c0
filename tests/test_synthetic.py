"""Synthetic speech tasks: reproducible, correct, and the perceptual levels really differ."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from vocalign.data.synthetic import (
    MAX_CLIP_SECONDS,
    PERCEPTION_CHOICES,
    STYLE_PHRASES,
    VOICE_GENDER,
    arithmetic,
    number_to_words,
    perception,
    styled_speech,
)
from vocalign.data.tasks import TASKS, make_task, task
from vocalign.data.types import STYLE_LEVELS, Prompt, Response, SpeechStyle

AUDIO_TASKS = ("arithmetic", "transcription", "perception")


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"), (7, "seven"), (13, "thirteen"), (19, "nineteen"), (20, "twenty"),
        (21, "twenty one"), (40, "forty"), (99, "ninety nine"), (100, "one hundred"),
        (105, "one hundred five"), (110, "one hundred ten"), (342, "three hundred forty two"),
        (999, "nine hundred ninety nine"), (1000, "one thousand"), (1010, "one thousand ten"),
        (21_000, "twenty one thousand"), (1_000_001, "one million one"), (-3, "minus three"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_number_to_words_is_one_to_one_below_a_thousand():
    spoken = [number_to_words(n) for n in range(1000)]
    assert len(set(spoken)) == 1000
    assert all("-" not in w and " and " not in f" {w} " for w in spoken)


def test_number_to_words_rejects_non_integers():
    with pytest.raises(ValueError, match="needs an int"):
        number_to_words(2.5)
    with pytest.raises(ValueError, match="out of range"):
        number_to_words(10**12)


def _fingerprint(prompts: list[Prompt]) -> list:
    return [
        (p.id, p.task, p.meta, p.target, [(m.role, m.content) for m in p.messages],
         [a.waveform.tobytes() for a in p.audio])
        for p in prompts
    ]


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_gives_identical_prompts_and_audio(name):
    first, again, other = make_task(name, 6, seed=3), make_task(name, 6, seed=3), make_task(name, 6, seed=4)
    assert _fingerprint(first) == _fingerprint(again)  # audio compared byte for byte
    assert [p.meta for p in first] != [p.meta for p in other]
    if name in AUDIO_TASKS:
        assert [p.audio[0].waveform.tobytes() for p in first] != [p.audio[0].waveform.tobytes() for p in other]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_gives_valid_prompts(name):
    prompts = make_task(name, 12, seed=0)
    assert len(prompts) == 12 and len({p.id for p in prompts}) == 12
    required_meta = {
        "arithmetic": {"question", "answer", "operands", "op"},
        "transcription": {"transcript"},
        "perception": {"attribute", "label", "choices", "text", "voice"},
        "styled_speech": {"text", "style"},
        "tool_use": {"expected_tool", "expected_args"},
    }[name]
    for p in prompts:
        assert p.task == name
        assert p.messages[-1].role == "human"
        assert required_meta <= set(p.meta)
        assert isinstance(p.target, Response) and isinstance(p.target.style, SpeechStyle)
        if name in AUDIO_TASKS:
            (audio,) = p.audio
            assert audio.sample_rate == 16000 and audio.waveform.dtype == np.float32
            assert 0.5 < audio.seconds <= MAX_CLIP_SECONDS
            assert np.isfinite(audio.waveform).all() and np.abs(audio.waveform).max() <= 1.0
            assert np.sqrt(np.mean(audio.waveform**2)) > 0.01  # speech, not silence
        else:
            assert p.audio == [] and p.messages[-1].content


def test_sample_rate_is_honoured():
    (p,) = arithmetic(1, seed=0, sample_rate=8000)
    (q,) = arithmetic(1, seed=0)
    assert p.audio[0].sample_rate == 8000
    assert len(p.audio[0].waveform) == pytest.approx(len(q.audio[0].waveform) / 2, abs=2)


def test_arithmetic_answers_are_right():
    words_to_int = {number_to_words(k): k for k in range(100)}
    prompts = arithmetic(300, seed=1, max_operand=12)
    for p in prompts:
        q = p.meta["question"]
        assert q.startswith("what is ")
        left, op, right = None, None, None
        for candidate in ("plus", "minus"):
            if f" {candidate} " in q:
                op = candidate
                left, right = q[len("what is "):].split(f" {candidate} ")
        a, b = words_to_int[left], words_to_int[right]
        assert [a, b] == p.meta["operands"] and op == p.meta["op"]
        assert 0 <= a <= 12 and 0 <= b <= 12
        expected = a + b if op == "plus" else a - b
        assert expected >= 0
        assert p.meta["answer"] == expected
        assert p.target.text == str(expected) and p.target.speech == number_to_words(expected)
        assert p.target.style == SpeechStyle() and "style" not in p.meta
    assert {p.meta["op"] for p in prompts} == {"plus", "minus"}


def test_styled_arithmetic_asks_for_the_style_it_expects():
    # two style requests make questions longer than MAX_CLIP_SECONDS, so allow more here
    prompts = arithmetic(60, seed=2, styled=True, max_attributes=2, max_seconds=6.0)
    for p in prompts:
        style = p.meta["style"]
        assert 1 <= len(style) <= 2 and "normal" not in style.values()
        for attr, level in style.items():
            assert STYLE_PHRASES[attr][level] in p.meta["question"].split("? answer ")[1]
            assert getattr(p.target.style, attr) == level
        assert p.target.speech == number_to_words(p.meta["answer"])
    assert {len(p.meta["style"]) for p in prompts} == {1, 2}


def test_styled_speech_targets_say_the_text_in_the_style():
    for p in styled_speech(30, seed=0, max_attributes=3):
        text, style = p.meta["text"], p.meta["style"]
        instruction = p.messages[-1].content
        assert instruction.startswith(f'say "{text}" ')
        assert all(STYLE_PHRASES[a][lv] in instruction for a, lv in style.items())
        assert p.target == Response(text="", speech=text, style=SpeechStyle(**style))


def test_transcription_target_is_the_transcript():
    for p in make_task("transcription", 10, seed=0):
        assert p.target.text == p.meta["transcript"] and p.target.speech is None
        assert p.meta["transcript"] == p.meta["transcript"].lower()


def test_perception_labels_are_among_the_choices_asked_for():
    for p in perception(40, seed=5):
        assert p.meta["choices"] == list(PERCEPTION_CHOICES[p.meta["attribute"]])
        assert p.meta["label"] in p.meta["choices"] and p.target.text == p.meta["label"]
        assert all(c in p.messages[-1].content for c in p.meta["choices"])
        if p.meta["attribute"] == "gender":
            assert VOICE_GENDER[p.meta["voice"].split("+")[1]] == p.meta["label"]


def _by_label(prompts: list[Prompt], measure) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for p in prompts:
        values.setdefault(p.meta["label"], []).append(measure(p))
    return {label: float(np.median(v)) for label, v in values.items()}


def _words_per_second(p: Prompt) -> float:
    return len(p.meta["text"].split()) / p.audio[0].seconds


def _rms(p: Prompt) -> float:
    return float(np.sqrt(np.mean(p.audio[0].waveform ** 2)))


def _f0(p: Prompt) -> float:
    """Median F0 over the loud frames (yin gives a value for every frame, silent ones too)."""
    audio = p.audio[0]
    f0 = librosa.yin(audio.waveform, fmin=50, fmax=500, sr=audio.sample_rate, frame_length=1024, hop_length=256)
    rms = librosa.feature.rms(y=audio.waveform, frame_length=1024, hop_length=256)[0][: len(f0)]
    return float(np.median(f0[: len(rms)][rms > 0.3 * rms.max()]))


def test_perception_rate_levels_differ_in_speaking_rate():
    wps = _by_label(perception(36, seed=0, attributes=["rate"]), _words_per_second)
    assert wps["slow"] * 1.2 < wps["normal"] and wps["normal"] * 1.2 < wps["fast"]


def test_perception_volume_levels_differ_in_energy():
    rms = _by_label(perception(36, seed=0, attributes=["volume"]), _rms)
    assert rms["soft"] * 2 < rms["normal"] and rms["normal"] * 1.4 < rms["loud"]


@pytest.mark.parametrize("voice", ["f2", "m3"])
def test_perception_pitch_levels_differ_in_f0(voice):
    f0 = _by_label(perception(18, seed=0, attributes=["pitch"], voices=[voice]), _f0)
    assert f0["low"] * 1.15 < f0["normal"] and f0["normal"] * 1.25 < f0["high"]


def test_perception_gender_voices_differ_in_f0():
    f0 = _by_label(perception(24, seed=0, attributes=["gender"]), _f0)
    assert f0["male"] * 1.5 < f0["female"]


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="synthetic task 'algebra' is not registered; registered synthetic tasks: arithmetic, perception"):
        make_task("algebra", 1, seed=0)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match=r"voices \['en-us\+nobody'\] are not espeak-ng variants"):
        arithmetic(1, seed=0, voices=["nobody"])
    with pytest.raises(ValueError, match="both a female and a male voice"):
        perception(1, seed=0, attributes=["gender"], voices=["f1", "f2"])
    with pytest.raises(ValueError, match="attributes=.*'loudness'"):
        perception(1, seed=0, attributes=["loudness"])
    with pytest.raises(ValueError, match="max_attributes=4 must be in 1..3"):
        styled_speech(1, seed=0, max_attributes=4)
    with pytest.raises(ValueError, match="n=-1 must be a non-negative int"):
        arithmetic(-1, seed=0)


def test_a_clip_over_max_seconds_is_an_error_that_says_what_to_change():
    with pytest.raises(ValueError, match=r"arithmetic prompt 0 .* over max_seconds=0.5; .*max_operand"):
        arithmetic(1, seed=0, max_seconds=0.5)


def test_styled_arithmetic_can_ask_in_text_and_targets_can_ignore_the_request():
    prompts = arithmetic(90, seed=3, styled=True, style_in="text", target_style="random", think=True)
    (spoken,) = arithmetic(1, seed=3, styled=True)
    # the request is the human turn's text, and the spoken question is the plain one
    assert "?" not in prompts[0].meta["question"]
    assert spoken.meta["question"].startswith(prompts[0].meta["question"] + "? answer ")
    seen_levels = {attr: set() for attr in STYLE_LEVELS}
    for p in prompts:
        (attr, level), = p.meta["style"].items()
        assert p.messages[-1].content == f"answer {STYLE_PHRASES[attr][level]}"
        # the reasoning restates the question and the request: "three plus four answer slowly"
        a, b = p.meta["operands"]
        assert p.target.think == f"{number_to_words(a)} {p.meta['op']} {number_to_words(b)} {p.messages[-1].content}"
        for a in STYLE_LEVELS:
            seen_levels[a].add(getattr(p.target.style, a))
    # random targets: every level of every attribute shows up, requested or not
    assert all(levels == set(STYLE_LEVELS[a]) for a, levels in seen_levels.items())
    matches = sum(getattr(p.target.style, a) == lvl for p in prompts for a, lvl in p.meta["style"].items())
    assert 10 < matches < 50  # about a third of 90 by chance, not all


def test_unknown_style_options_are_errors():
    with pytest.raises(ValueError, match="style_in='sung' is not known"):
        arithmetic(1, seed=0, styled=True, style_in="sung")
    with pytest.raises(ValueError, match="target_style='any' is not known"):
        arithmetic(1, seed=0, target_style="any")


def test_every_task_registers_once_in_one_place() -> None:
    assert set(TASKS) == {"arithmetic", "transcription", "perception", "styled_speech", "tool_use"}
    with pytest.raises(ValueError, match="'arithmetic' is already registered"):
        task("arithmetic")(arithmetic)
    with pytest.raises(ValueError, match="'arithmatic' is not registered; did you mean 'arithmetic'"):
        make_task("arithmatic", 1, 0)
