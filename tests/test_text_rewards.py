"""The text rewards `format` and `think_length`, on hand-written responses.

Rollouts are built directly; the raw texts are written as the model would write them
(see vocalign.model.chat). Every expected score is worked out in the test or its
comment: `partial` scores are (checks passed) / 7.
"""

from __future__ import annotations

from typing import Any

import pytest

from vocalign.data.types import Message, Prompt, Response, Rollout
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.format import FORMAT_CHECKS, check_format, format_reward
from vocalign.rewards.think_length import think_length, think_length_score, think_size

SPEECH = "<tts_start>seven<audio_12><audio_40><tts_end>"
GOOD = f"<think>three plus four</think>7{SPEECH}<|EOT|>"


def make_rollout(
    raw_text: str = GOOD, *, think: str = "", finished: bool = True, prompt_id: str = "p0", think_tokens: int = 0
) -> Rollout:
    prompt = Prompt(id=prompt_id, messages=[Message("human", "what is three plus four")], meta={"answer": 7})
    return Rollout(
        prompt=prompt, text="", think=think, spoken_text="", audio_tokens=[], waveform=None, sample_rate=16000,
        prompt_ids=[], response_ids=[], logprobs=[], finished=finished, raw_text=raw_text, think_tokens=think_tokens,
    )


# --- format: one check at a time -----------------------------------------------------


def test_a_well_formed_response_passes_every_check() -> None:
    report = check_format(GOOD, ["think", "text", "speech"])
    assert report.failed == []
    assert report.passed == len(FORMAT_CHECKS) == 7


@pytest.mark.parametrize(
    ("raw", "require", "failed"),
    [
        # missing: no speech block
        ("<think>three plus four</think>7<|EOT|>", ["think", "text", "speech"], ["required_present"]),
        # out of order: speech before the visible text
        (f"<think>three plus four</think>{SPEECH}7<|EOT|>", ["think", "text", "speech"], ["required_order"]),
        # text before a think that must come first
        (f"Sure. <think>three plus four</think>7{SPEECH}<|EOT|>", ["think", "text", "speech"], ["required_order"]),
        ("Sure. <think>three plus four</think>7<|EOT|>", ["think"], ["required_order"]),
        # whitespace before it is fine
        ("\n <think>three plus four</think>7<|EOT|>", ["think"], []),
        # unclosed speech
        ("<think>three plus four</think>7<tts_start>seven<audio_12><|EOT|>", ["think", "text", "speech"],
         ["well_formed"]),
        # a closing tag with nothing open
        ("three plus four</think>7<|EOT|>", ["text"], ["well_formed"]),
        # nested: a think inside the think; the stray outer </think> is the second fault
        (f"<think>three <think>plus</think> four</think>7{SPEECH}<|EOT|>", ["think", "text", "speech"],
         ["well_formed"]),
        # a speech block inside the think
        (f"<think>three plus four{SPEECH}</think>7<|EOT|>", ["think", "text"], ["well_formed"]),
        # audio tokens outside speech, a prompt-only tag in the response
        (f"<think>three plus four</think>7<audio_3>{SPEECH}<|EOT|>", ["think", "text", "speech"], ["well_formed"]),
        ("<think>three plus four</think>7<|BOT|>assistant\n7<|EOT|>", ["think", "text"], ["well_formed"]),
        # duplicate think
        (f"<think>three</think><think>plus four</think>7{SPEECH}<|EOT|>", ["think", "text", "speech"],
         ["single_blocks"]),
        # empty think, speech without audio tokens
        (f"<think> </think>7{SPEECH}<|EOT|>", ["think", "text", "speech"], ["non_empty"]),
        ("<think>three plus four</think>7<tts_start>seven<tts_pad><tts_end><|EOT|>", ["think", "text", "speech"],
         ["non_empty"]),
        # unfinished: cut inside the speech, so also unclosed
        ("<think>three plus four</think>7<tts_start>seven<audio_12>", ["think", "text", "speech"],
         ["finished", "well_formed"]),
        # text after <|EOT|> means the turn did not end there
        (f"{GOOD}and more", ["think", "text", "speech"], ["finished"]),
        # padding after <|EOT|> is not text
        (f"{GOOD}<|pad|><|pad|>", ["think", "text", "speech"], []),
    ],
)
def test_format_checks(raw: str, require: list[str], failed: list[str]) -> None:
    assert check_format(raw, require).failed == failed


def test_an_unfinished_rollout_fails_finished_even_with_eot() -> None:
    assert check_format(GOOD, ["think"], finished=False).failed == ["finished"]


@pytest.mark.parametrize(
    ("raw", "failed"),
    [
        ('<tool_call>function\nweather\n{"city": "Paris"}</tool_call><|EOT|>', []),
        ('<think>need the weather</think><tool_call>function\nget.weather-v2\n{}</tool_call><|EOT|>', []),
        ("<tool_call>function\nweather\n{city: Paris}</tool_call><|EOT|>", ["tool_calls_parse"]),  # not JSON
        ('<tool_call>function\nweather\n[1, 2]</tool_call><|EOT|>', ["tool_calls_parse"]),  # not an object
        ('<tool_call>weather\n{"city": "Paris"}</tool_call><|EOT|>', ["tool_calls_parse"]),  # no "function" line
        ('<tool_call>function\nget weather\n{}</tool_call><|EOT|>', ["tool_calls_parse"]),  # a space in the name
        ('<tool_call>function\na\n{}</tool_call><tool_call>function\nb\n{"x": 1}</tool_call><|EOT|>', []),
        ("<tool_call></tool_call><|EOT|>", ["non_empty", "tool_calls_parse"]),
    ],
)
def test_tool_calls(raw: str, failed: list[str]) -> None:
    assert check_format(raw, ["tool_call"]).failed == failed


@pytest.mark.parametrize(
    ("raw", "require", "failed"),
    [
        ("<think>three plus four</think>So <answer>7</answer><|EOT|>", ["think", "answer"], []),
        ("<think>three plus four</think><answer>7</answer><|EOT|>", ["think", "answer"], []),
        # the answer block is not free text
        ("<think>three plus four</think><answer>7</answer><|EOT|>", ["think", "text"], ["required_present"]),
        ("<answer>7</answer> because three plus four<|EOT|>", ["text", "answer"], ["required_order"]),
        ("<think>three plus four</think><answer></answer><|EOT|>", ["think", "answer"], ["non_empty"]),
        ("<answer>7</answer><answer>8</answer><|EOT|>", ["answer"], ["single_blocks"]),
        # parts not required may come anywhere, but a think required first still comes first
        (f"<think>three plus four</think>{SPEECH}<answer>7</answer><|EOT|>", ["think", "answer"], []),
        # nothing required: only well-formedness counts
        ("7<|EOT|>", [], []),
    ],
)
def test_answer_and_text_parts(raw: str, require: list[str], failed: list[str]) -> None:
    assert check_format(raw, require).failed == failed


# --- format: the reward --------------------------------------------------------------


def test_format_reward_is_all_or_nothing_or_the_fraction_passed() -> None:
    rollouts = [
        make_rollout(GOOD),
        make_rollout("<think>three plus four</think>7<|EOT|>"),  # no speech: 6 of 7
        make_rollout("<think>three plus four</think>7<tts_start>seven<audio_12>", finished=False),  # 5 of 7
        # fails well_formed (stray audio), single_blocks, non_empty, required_present: 3 of 7
        make_rollout("<think></think><think>x</think>7<audio_1><|EOT|>"),
    ]
    assert format_reward(rollouts) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(rollouts, partial=True) == pytest.approx([1.0, 6 / 7, 5 / 7, 3 / 7])
    assert format_reward(rollouts, require=["think", "text"]) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(rollouts, require="think") == [1.0, 1.0, 0.0, 0.0]  # one part as a string


def test_format_reward_through_score_with_recipe_params() -> None:
    rollouts = [make_rollout(GOOD), make_rollout("<think>three plus four</think>7<|EOT|>")]
    scores = score(rollouts, [RewardSpec("format", weight=0.5, params={"require": ["think", "speech"],
                                                                       "partial": True})])
    assert scores.components == {"format": pytest.approx([1.0, 6 / 7])}
    assert scores.total == pytest.approx([0.5, 3 / 7])


@pytest.mark.parametrize(
    ("require", "message"),
    [
        (["think", "speach"], "format reward: require=\\['think', 'speach'\\] names the unknown part 'speach'; "
                              "did you mean 'speech'\\? known parts: think, text, answer, speech, tool_call"),
        (["audio"], "unknown part 'audio'; known parts: think, text, answer, speech, tool_call"),
        (["think", "text", "think"], "names think more than once; name each part once"),
    ],
)
def test_format_reward_rejects_bad_require(require: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        format_reward([make_rollout()], require=require)
    with pytest.raises(ValueError, match=message):
        format_reward([], require=require)  # checked even with nothing to score


def test_format_reward_needs_the_raw_text() -> None:
    with pytest.raises(ValueError, match="rollout of prompt 'q3' has an empty raw_text; .*set Rollout.raw_text"):
        format_reward([make_rollout("", prompt_id="q3")])


def test_a_target_rendered_by_the_embedded_tokenizer_is_well_formed() -> None:
    tokenizer = ChatTokenizer(build_tokenizer(n_audio_tokens=20))
    ids = tokenizer.render_response(
        Response(text="7", speech="the answer is seven", think="three plus four"), units=list(range(9))
    )
    parsed = tokenizer.parse_response(ids)
    think_ids = ids[ids.index(tokenizer.special["<think>"]) + 1 : ids.index(tokenizer.special["</think>"])]
    assert parsed.think_tokens == len(think_ids) > 0
    rollout = make_rollout(tokenizer.decode_raw(ids), think=parsed.think, think_tokens=parsed.think_tokens)
    assert format_reward([rollout]) == [1.0]
    assert think_length([rollout], max_tokens=3, unit="words") == [1.0]  # "three plus four" is 3 words
    assert think_length([rollout], max_tokens=len(think_ids)) == [1.0]
    assert think_length([rollout], max_tokens=len(think_ids) - 1) == [0.0]
    cut = make_rollout(tokenizer.decode_raw(ids[:-6]), think=parsed.think, finished=False)  # inside the speech
    assert check_format(cut.raw_text, ["think", "text", "speech"], cut.finished).failed == ["finished", "well_formed"]


# --- think_length --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "graded", "expected"),
    [
        (0, False, 0.0), (0, True, 0.0),  # empty thinking never scores
        (1, False, 1.0), (10, False, 1.0), (11, False, 0.0), (19, False, 0.0),
        (10, True, 1.0),
        (11, True, 0.9),  # (20 - 11) / 10
        (15, True, 0.5),  # (20 - 15) / 10
        (20, True, 0.0), (35, True, 0.0),
    ],
)
def test_think_length_score(length: int, graded: bool, expected: float) -> None:
    assert think_length_score(length, 10, graded) == pytest.approx(expected)


def test_think_size() -> None:
    assert think_size(make_rollout(think="three plus four", think_tokens=5)) == 5
    assert think_size(make_rollout(think="three plus four"), "words") == 3
    assert think_size(make_rollout(think="three plus four"), "chars") == 15
    assert think_size(make_rollout(think="  three\n plus  "), "words") == 2
    assert think_size(make_rollout(think="  three\n plus  "), "chars") == 11  # "three\n plus": inner spaces count
    assert think_size(make_rollout(think="")) == 0
    with pytest.raises(ValueError, match="prompt 'p0' has thinking but Rollout.think_tokens is 0"):
        think_size(make_rollout(think="three"))


def test_think_length_reward() -> None:
    rollouts = [
        make_rollout(think="three plus four"),  # 3 words, 15 characters
        make_rollout(think="three plus four so it is seven"),  # 7 words
        make_rollout("7<|EOT|>", think=""),  # no thinking
        make_rollout("<think>three plus", think="three plus", finished=False),  # cut inside the think
    ]
    assert think_length(rollouts, max_tokens=3, unit="words") == [1.0, 0.0, 0.0, 0.0]
    assert think_length(rollouts, max_tokens=7, unit="words") == [1.0, 1.0, 0.0, 0.0]
    # graded, max 4: 3 words -> 1; 7 words -> (8 - 7) / 4 = 0.25
    assert think_length(rollouts, max_tokens=4, unit="words", graded=True) == pytest.approx([1.0, 0.25, 0.0, 0.0])
    # characters, max 10: 15 chars -> 0, or graded (20 - 15) / 10 = 0.5
    assert think_length(rollouts[:1], max_tokens=10, unit="chars") == [0.0]
    assert think_length(rollouts[:1], max_tokens=10, unit="chars", graded=True) == pytest.approx([0.5])
    assert think_length(rollouts[:1], max_tokens=15, unit="chars") == [1.0]


def test_think_length_through_score_with_defaults() -> None:
    long_think = " ".join(["step"] * 201)
    scores = score([make_rollout(think="three plus four", think_tokens=3), make_rollout(think=long_think, think_tokens=201)],
                   [RewardSpec("think_length")])
    assert scores.components == {"think_length": [1.0, 0.0]}  # default max_tokens 200 tokens


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"unit": "bytes"}, "think_length reward: unit='bytes' is not known; use one of tokens, words, chars"),
        ({"max_tokens": 0}, "think_length reward: max_tokens=0 must be a positive integer"),
        ({"max_tokens": 2.5}, "max_tokens=2.5 must be a positive integer"),
    ],
)
def test_think_length_rejects_bad_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        think_length([make_rollout(think="x")], **params)
