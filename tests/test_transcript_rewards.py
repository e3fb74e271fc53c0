"""Transcript rewards: normalisation, WER/CER, `asr_wer` and `speech_consistency`.

Text cases have hand-computed expected values (worked out in the comments). The speech
cases use real speech: the policy's own detokenizer renders, heard by the shipped
embedded recognizer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vocalign.data.types import Message, Prompt, Rollout, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.rewards.asr import get_asr, register_asr
from vocalign.rewards.ctc_asr import EmbeddedRecognizer
from vocalign.rewards.registry import RewardSpec, get_reward, score
from vocalign.rewards.transcripts import (
    asr_wer,
    normalize_transcript,
    shaped_score,
    speech_consistency,
    word_error_rate,
)


class CountingRecognizer(EmbeddedRecognizer):
    """The shipped recognizer, counting how often and on how many clips it is called."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def transcribe(self, waveforms, sample_rate):
        self.calls.append(len(waveforms))
        return super().transcribe(waveforms, sample_rate)


@register_asr("counting-test")
def counting_asr() -> CountingRecognizer:
    return CountingRecognizer.load()


def make_rollout(text: str = "", waveform: np.ndarray | None = None, sample_rate: int = 16000,
                 spoken_text: str = "", meta: dict | None = None) -> Rollout:
    return Rollout(
        prompt=Prompt(id="p0", messages=[Message("human", "")], meta=meta or {}),
        text=text, think="", spoken_text=spoken_text, audio_tokens=[], waveform=waveform,
        sample_rate=sample_rate, prompt_ids=[], response_ids=[], logprobs=[],
    )


@pytest.fixture(scope="module")
def detok() -> EspeakUnitDetokenizer:
    return EspeakUnitDetokenizer()


def say(detok: EspeakUnitDetokenizer, text: str, **style: str) -> np.ndarray:
    return detok.render(detok.encode(text, SpeechStyle(**style))).waveform


# --- normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("seven o'clock", "seven oclock"),
    ("7 o'clock", "seven oclock"),
    ("$25.50", "twenty five dollars fifty cents"),
    ("$1", "one dollar"),
    ("$0.99", "ninety nine cents"),
    ("twenty-first", "twenty first"),
    ("21st", "twenty first"),
    ("12th", "twelfth"),
    ("40th", "fortieth"),
    ("7:30", "seven thirty"),
    ("7:05", "seven oh five"),
    ("7:00 p.m.", "seven oclock pm"),
    ("3.5", "three point five"),
    ("1,000", "one thousand"),
    ("-3", "minus three"),
    ("9-2", "nine two"),  # a hyphen between numbers is not a sign
    ("50%", "fifty percent"),
    ("007", "zero zero seven"),
    ("The answer is 7.", "the answer is seven"),
    ("It's SEVEN!", "its seven"),
    ("one hundred and five", "one hundred five"),
    ("105", "one hundred five"),
    ("a hundred cats", "one hundred cats"),
    ("bread and butter", "bread and butter"),  # "and" outside a number stays
])
def test_normalize_transcript(text: str, expected: str) -> None:
    assert normalize_transcript(text) == expected


def test_digits_and_words_agree() -> None:
    for digits, words in [("7", "seven"), ("14", "fourteen"), ("99", "ninety-nine"), ("105", "one hundred and five")]:
        assert word_error_rate(words, digits) == 0.0


# --- error rates ---------------------------------------------------------------------------


def test_word_error_rate_hand_computed() -> None:
    # "the cat sat down" vs "the bat sat": 1 substitution + 1 deletion over 4 words
    assert word_error_rate("the cat sat down", "the bat sat") == pytest.approx(0.5)
    # 2 insertions over 2 words
    assert word_error_rate("seven up", "seven up and down") == pytest.approx(1.0)
    # "the answer is 7" == "the answer is seven" after normalisation
    assert word_error_rate("The answer is 7.", "the answer is seven") == 0.0
    # without normalisation: "7." vs "seven" is 1 substitution, "The" vs "the" another: 2 / 4
    assert word_error_rate("The answer is 7.", "the answer is seven", normalize=False) == pytest.approx(0.5)
    # CER: "abcd" vs "abxd" is 1 substitution over 4 characters; spaces are removed
    assert word_error_rate("ab cd", "abxd", unit="char") == pytest.approx(0.25)
    # CJK text: one of 4 characters wrong
    assert word_error_rate("今天很好", "今天不好", unit="char") == pytest.approx(0.25)


def test_word_error_rate_empty_texts() -> None:
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("", "hello") == 1.0
    assert word_error_rate("hello there", "") == 1.0
    assert word_error_rate("...", "") == 0.0  # nothing but punctuation is an empty reference


def test_unknown_unit_is_explained() -> None:
    with pytest.raises(ValueError, match="unit='letter'.*'word'.*'char'"):
        word_error_rate("a", "a", unit="letter")


def test_shaped_score() -> None:
    assert shaped_score(0.25) == pytest.approx(0.75)
    assert shaped_score(1.5) == 0.0  # capped at WER 1
    assert shaped_score(0.5, "exp", k=2.0) == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="shape='square'"):
        shaped_score(0.5, "square")


# --- asr_wer -------------------------------------------------------------------------------


def test_asr_wer_hand_computed() -> None:
    rollouts = [
        make_rollout("the train leaves at 9:45", meta={"transcript": "the train leaves at nine forty five"}),
        make_rollout("the train leaves at nine", meta={"transcript": "the train leaves at nine forty five"}),
        make_rollout("anything", meta={}),
        make_rollout("i can see 12 cats", meta={"transcript": "i can see twelve dogs"}),
    ]
    # 0 errors; 2 deletions of 7 words -> 1 - 2/7; no reference -> None; 1 of 5 words wrong -> 0.8
    assert asr_wer(rollouts) == pytest.approx([1.0, 1 - 2 / 7, None, 0.8])
    assert asr_wer(rollouts, shape="exp", k=7.0) == pytest.approx([1.0, math.exp(-2.0), None, math.exp(-1.4)])


def test_asr_wer_field_reference_key_and_cer() -> None:
    rollout = make_rollout("", spoken_text="猫が好き", meta={"target": "猫が好きだ"})
    # CER: 1 deletion over 5 characters
    assert asr_wer([rollout], field="spoken_text", reference_key="target", unit="char") == pytest.approx([0.8])
    with pytest.raises(ValueError, match="field='answer' is not a text of a rollout"):
        asr_wer([rollout], field="answer")


def test_rewards_are_registered() -> None:
    assert get_reward("asr_wer") is asr_wer
    assert get_reward("speech_consistency") is speech_consistency


# --- speech_consistency on real speech ----------------------------------------------------


def test_right_text_scores_high_and_wrong_text_low(detok: EspeakUnitDetokenizer) -> None:
    spoken = [("seven", {"rate": "slow"}), ("fourteen", {"rate": "fast", "pitch": "high"}),
              ("twenty one", {"pitch": "low", "volume": "soft"}), ("the answer is ninety eight", {"volume": "loud"})]
    waves = [say(detok, text, **style) for text, style in spoken]
    right = [make_rollout(text, wave) for text, wave in zip(["7", "14", "21", "The answer is 98."], waves)]
    wrong = [make_rollout(text, wave) for text, wave in zip(["3", "40", "sixty two", "please paint the cup red"], waves)]
    right_scores = speech_consistency(right)
    wrong_scores = speech_consistency(wrong)
    print("right", right_scores, "wrong", wrong_scores)
    assert all(s >= 0.9 for s in right_scores)
    assert all(s <= 0.2 for s in wrong_scores)


def test_against_reference_and_spoken_text(detok: EspeakUnitDetokenizer) -> None:
    wave = say(detok, "what is three plus four")
    rollouts = [
        make_rollout("7", wave, meta={"question": "what is 3 plus 4"}),
        make_rollout("7", wave, meta={"answer": 7}),
    ]
    scores = speech_consistency(rollouts, against="reference", reference_key="question")
    assert scores[0] >= 0.9 and scores[1] is None
    assert speech_consistency([make_rollout("", say(detok, "eleven"), meta={"answer": 11})],
                              against="reference", reference_key="answer")[0] >= 0.9
    assert speech_consistency([make_rollout("", wave, spoken_text="what is 3 plus 4")],
                              against="spoken_text")[0] >= 0.9


def test_missing_speech_scores_zero_and_missing_text_none(detok: EspeakUnitDetokenizer) -> None:
    rollouts = [
        make_rollout("7", None),
        make_rollout("7", np.zeros(0, np.float32)),
        make_rollout("", say(detok, "seven")),
        make_rollout("?!", say(detok, "seven")),
    ]
    assert speech_consistency(rollouts) == [0.0, 0.0, None, None]


def test_batch_is_transcribed_in_one_call_at_one_rate(detok: EspeakUnitDetokenizer) -> None:
    backend = get_asr("counting-test")
    backend.calls.clear()
    other_rate = EspeakUnitDetokenizer(sample_rate=22050)
    rollouts = [make_rollout(str(n), say(detok, word)) for n, word in [(3, "three"), (8, "eight"), (19, "nineteen")]]
    rollouts.append(make_rollout("5", other_rate.render(other_rate.encode("five")).waveform, sample_rate=22050))
    rollouts.append(make_rollout("6", None))  # no speech: not sent to the ASR
    scores = speech_consistency(rollouts, asr="counting-test")
    assert backend.calls == [4]
    assert scores[:4] == pytest.approx([1.0] * 4) and scores[4] == 0.0


def test_speech_consistency_through_score(detok: EspeakUnitDetokenizer) -> None:
    rollouts = [make_rollout("9", say(detok, "nine")), make_rollout("2", say(detok, "nine"))]
    result = score(rollouts, [RewardSpec("speech_consistency", params={"shape": "exp", "k": 2.0})])
    assert result.components["speech_consistency"] == pytest.approx([1.0, math.exp(-2.0)])


def test_bad_params_fail_before_asr() -> None:
    with pytest.raises(ValueError, match="against='voice'"):
        speech_consistency([make_rollout("7")], against="voice")
    with pytest.raises(ValueError, match="k=-1"):
        speech_consistency([make_rollout("7")], shape="exp", k=-1)
