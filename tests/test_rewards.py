"""Rewards: the correctness check (answer extraction, number words, equivalence) and the
registry (names, dotted imports, params, weighted totals, failures, metrics).

Rollouts are built directly; no model is needed. Every expected value is worked out by
hand in the test or its comment.
"""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vocalign.data.synthetic import number_to_words
from vocalign.data.types import Message, Prompt, Rollout
from vocalign.rewards import (
    REQUIRED,
    RewardError,
    RewardSpec,
    get_reward,
    list_rewards,
    registry,
    reward,
    score,
)
from vocalign.rewards.correctness import (
    correctness,
    extract_answer,
    is_correct,
    normalize_answer,
    parse_number,
    same_answer,
    words_to_number,
)
from vocalign.rl.recipe import RecipeError, load_recipe

LEVELS = ["slow", "normal", "fast"]


def make_rollout(text: str = "", *, spoken: str = "", prompt_id: str = "p0", **meta: Any) -> Rollout:
    prompt = Prompt(id=prompt_id, messages=[Message("human", "what is three plus four")], meta=meta)
    return Rollout(
        prompt=prompt, text=text, think="", spoken_text=spoken, audio_tokens=[], waveform=None,
        sample_rate=16000, prompt_ids=[], response_ids=[], logprobs=[],
    )


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Rewards registered by a test disappear after it; the built-ins stay visible."""
    copy = registry._REGISTRY.copy()
    monkeypatch.setattr(registry, "_REGISTRY", copy)
    return copy


# --- number words --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("zero", 0),
        ("seven", 7),
        ("nineteen", 19),
        ("twenty one", 21),
        ("twenty-one", 21),
        ("Ninety Nine", 99),
        ("one hundred five", 105),
        ("one hundred and five", 105),
        ("three hundred twelve", 312),
        ("two thousand and seven", 2007),
        ("one million two thousand three", 1_002_003),
        ("negative twelve", -12),
        ("minus four", -4),
    ],
)
def test_words_to_number(words: str, expected: int) -> None:
    assert words_to_number(words) == expected


def test_words_to_number_inverts_number_to_words() -> None:
    for n in [*range(0, 1200), 20_000, 123_456, 999_999]:
        assert words_to_number(number_to_words(n)) == n


@pytest.mark.parametrize("words", ["", "hundred", "one two", "twenty ten", "seven and", "one thousand two thousand",
                                   "seven apples"])
def test_words_to_number_rejects_what_is_not_one_number(words: str) -> None:
    with pytest.raises(ValueError, match=f"{words!r} is not a number in words"):
        words_to_number(words)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 7), ("7.0", 7.0), ("-2.5", -2.5), ("1,000", 1000), ("seven", 7), ("42.", 42),
     ("the answer is 7", None), ("7 8", None), ("", None),
     # fractions of integers are floats, even when whole
     ("1/2", 0.5), ("4/2", 2.0), ("-\\frac{3}{4}", -0.75), ("\\dfrac{1}{4}", 0.25), ("1/0", None)],
)
def test_parse_number(text: str, expected: int | float | None) -> None:
    value = parse_number(text)
    assert value == expected
    assert type(value) is type(expected)


# --- extraction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reference", "expected"),
    [
        # The tagged answer wins over numbers outside it.
        ("<answer>12</answer> though 13 is close", 12, "12"),
        ("First <answer>4</answer>, finally <ANSWER> 5 </ANSWER>", 5, "5"),
        ("<answer>it is twenty one</answer>", 21, "twenty one"),
        # \boxed{} when there is no tag; braces nest.
        ("So \\boxed{42}. Or maybe 41.", 42, "42"),
        ("\\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", 0.5, "\\frac{1}{2}"),  # the fraction, not its last digit
        ("\\boxed{\\text{the cat}}", "the cat", "the cat"),  # \text{} around the whole box is dropped
        ("\\boxed{x^{2}}", "x^2", "x^{2}"),
        # The last number in digits or words.
        ("3 plus 4 is 7.", 7, "7"),
        ("nine minus two is seven", 7, "seven"),
        ("the answer is twenty-one", 21, "twenty-one"),
        ("it is one hundred and five", 105, "one hundred and five"),
        ("seven fifteen", 15, "fifteen"),  # not one number: 7, then 15
        ("three and four", 4, "four"),
        ("it was -3 degrees", -3, "-3"),
        ("9-2", 7, "2"),  # a minus between numbers is not a sign
        ("about 1,000 people", 1000, "1,000"),
        # "minus" is a sign unless it follows a number.
        ("the answer is minus three", -3, "minus three"),
        ("nine minus two", 7, "two"),
        ("9 minus 2 is 7", 7, "7"),
        # Fractions: the one that ends last, not the digit inside it; a date is not one.
        ("half of it, 1/2", 0.5, "1/2"),
        ("it is -\\frac{3}{4} now", -0.75, "-\\frac{3}{4}"),
        ("on 1/2/2025 it was 3", 3, "3"),
        ("no number here", 7, None),
        # A reference that is not a number: the tagged answer or the whole text.
        ("<answer>The Cat.</answer>", "the cat", "The Cat."),
        ("  the dog barks  ", "the dog barks", "the dog barks"),
    ],
)
def test_extract_answer(text: str, reference: Any, expected: str | None) -> None:
    assert extract_answer(text, reference) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fast", "fast"),
        ("B", "normal"),
        ("(C) I would say", "fast"),
        ("Answer: A", "slow"),
        ("<answer>b.</answer>", "normal"),
        ("It sounds quite fast.", "fast"),
        ("first slow, then normal", "normal"),  # the last option mentioned
        ("The answer is (c).", "fast"),
        ("answer: c", "fast"),  # a lower-case letter that ends the sentence
        ("I think the answer is b", "normal"),
        ("the answer is a fast one", "fast"),  # "a" is the article here, so the option text decides
        ("\\boxed{\\text{C}}", "fast"),
        ("B) normal", "normal"),
        ("D", None),  # only three options
        ("it is loud", None),
    ],
)
def test_extract_answer_multiple_choice(text: str, expected: str | None) -> None:
    assert extract_answer(text, "fast", LEVELS) == expected


# --- equivalence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reference", "expected"),
    [
        ("7", 7, True),
        ("7.0", 7, True),
        ("seven", 7, True),
        ("The answer is 7.", 7, True),
        ("<answer>seven</answer>", 7, True),
        ("7", "seven", True),
        ("seven", "7.0", True),
        ("7", np.int64(7), True),  # reference fields read by `datasets` are numpy numbers
        ("0.1", 0.1, True),
        ("2.50", 2.5, True),
        ("\\boxed{7.0}", 7, True),
        ("\\frac{1}{2}", 0.5, True),
        ("1/2", "0.5", True),
        ("2/4", "\\frac{1}{2}", True),  # by value
        ("1/3", 0.333, False),  # exact values, no tolerance
        ("the answer is minus three", -3, True),
        ("three", -3, False),
        ("7.5", 7, False),
        ("seventy", 7, False),
        ("8", 7, False),
        ("", 7, False),
        ("The cat!", "the  cat", True),
        ("cat", "the cat", False),
        ("fast", "C", True),  # a letter reference is its option
        ("C", "fast", True),
        ("slow", "fast", False),
    ],
)
def test_is_correct(text: str, reference: Any, expected: bool) -> None:
    choices = LEVELS if reference in ("C", "fast", "slow") else None
    assert is_correct(text, reference, choices) is expected


def test_same_answer_and_normalisation() -> None:
    assert normalize_answer("  Hello,   WORLD!! ") == "hello world"
    assert same_answer("1,000", 1000)
    assert same_answer("negative three", -3)
    assert not same_answer(None, 7)


# --- the correctness reward ----------------------------------------------------------


def test_correctness_scores_text_answers() -> None:
    rollouts = [
        make_rollout("The answer is 7.", answer=7),
        make_rollout("It is eight.", answer=7),
        make_rollout("twenty one", answer=21),
        make_rollout("7", question="no answer field here"),
        make_rollout("the cat sat", transcript="The cat sat."),
        make_rollout("nan", answer=float("nan")),  # a missing value in a numeric column
    ]
    assert correctness(rollouts) == [1.0, 0.0, 1.0, None, None, None]
    assert correctness(rollouts, field="transcript") == [None, None, None, None, 1.0, None]


def test_correctness_speech_checks_the_spoken_words() -> None:
    rollouts = [
        make_rollout("7", spoken="the answer is seven", answer=7),
        make_rollout("7", spoken="the answer is eight", answer=7),
        make_rollout("7", spoken="", answer=7),  # said nothing
    ]
    assert correctness(rollouts) == [1.0, 1.0, 1.0]
    assert correctness(rollouts, speech=True) == [1.0, 0.0, 0.0]


def test_correctness_multiple_choice_from_meta() -> None:
    rollouts = [
        make_rollout("It sounds fast.", label="fast", choices=LEVELS),
        make_rollout("(A)", label="fast", choices=LEVELS),
    ]
    assert correctness(rollouts, field="label") == [1.0, 0.0]


# --- the registry --------------------------------------------------------------------


def test_reward_decorator_registers_and_returns_the_function(isolated_registry) -> None:
    @reward("shout")
    def shout(rollouts: list[Rollout], *, bonus: float = 0.5) -> list[float | None]:
        """1 + bonus when the text is upper case.

        More detail that list_rewards leaves out.
        """
        return [1.0 + bonus if r.text.isupper() else 0.0 for r in rollouts]

    assert get_reward("shout") is shout
    assert shout([make_rollout("HI"), make_rollout("hi")]) == [1.5, 0.0]
    info = {i.name: i for i in list_rewards()}
    assert info["shout"].doc == "1 + bonus when the text is upper case."
    assert info["shout"].params == {"bonus": 0.5}
    assert info["correctness"].params == {"field": "answer", "speech": False}
    assert [i.name for i in list_rewards()] == sorted(info)


def test_registering_a_name_twice_is_an_error(isolated_registry) -> None:
    @reward("twice")
    def first(rollouts: list[Rollout]) -> list[float | None]:
        return [1.0] * len(rollouts)

    with pytest.raises(ValueError, match="reward name 'twice' is already registered .*first.*choose another name"):
        @reward("twice")
        def second(rollouts: list[Rollout]) -> list[float | None]:
            return [0.0] * len(rollouts)

    assert get_reward("twice") is first
    with pytest.raises(ValueError, match="contains ':'"):
        reward("a:b")


def test_list_rewards_marks_required_params(isolated_registry) -> None:
    @reward("needs_target")
    def needs_target(rollouts: list[Rollout], target: str, *, scale: float = 1.0) -> list[float | None]:
        return [scale * (r.text == target) for r in rollouts]

    (info,) = [i for i in list_rewards() if i.name == "needs_target"]
    assert info.params == {"target": REQUIRED, "scale": 1.0}
    assert info.doc == ""


def test_unknown_reward_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="reward 'corectness' is not registered; did you mean 'correctness'\\?"):
        get_reward("corectness")
    with pytest.raises(ValueError, match="write 'package.module:function' \\(e.g. 'my.mod:fn'\\)"):
        get_reward("my.mod.fn")


def test_dotted_import_of_a_plain_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "vocalign_test_user_rewards"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        def length_reward(rollouts, *, per_word=0.25):
            return [per_word * len(r.text.split()) for r in rollouts]

        def helper():
            pass

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)

    fn = get_reward(f"{module}:length_reward")
    assert fn([make_rollout("one two three")]) == [0.75]
    scores = score([make_rollout("a b"), make_rollout("a b c d")],
                   [RewardSpec(f"{module}:length_reward", params={"per_word": 0.5})])
    assert scores.components == {f"{module}:length_reward": [1.0, 2.0]}

    with pytest.raises(ValueError, match="has no function 'length_rewrd'; did you mean 'length_reward'\\? "
                                         "its functions: helper, length_reward"):
        get_reward(f"{module}:length_rewrd")
    with pytest.raises(ValueError, match="NOT_A_FUNCTION is a int, not a function"):
        get_reward(f"{module}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="module 'vocalign_no_such_module' cannot be found; check the module path"):
        get_reward("vocalign_no_such_module:fn")
    with pytest.raises(ValueError, match="not of the form 'package.module:function'"):
        get_reward(f"{module}:")


def test_dotted_import_reports_a_missing_dependency_of_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "vocalign_test_broken_rewards"
    (tmp_path / f"{module}.py").write_text("import vocalign_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ValueError, match=f"module '{module}' cannot be imported "
                                         "\\(No module named 'vocalign_missing_dependency'\\)"):
        get_reward(f"{module}:fn")


def test_unknown_and_missing_params_are_errors_naming_the_accepted_ones(isolated_registry) -> None:
    @reward("needs_target")
    def needs_target(rollouts: list[Rollout], target: str, *, scale: float = 1.0) -> list[float | None]:
        return [scale * (r.text == target) for r in rollouts]

    rollouts = [make_rollout("x")]
    with pytest.raises(ValueError, match="reward 'correctness': unknown params 'fild' \\(did you mean 'field'\\?\\); "
                                         "it accepts: field='answer', speech=False"):
        score(rollouts, [RewardSpec("correctness", params={"fild": "label"})])
    with pytest.raises(ValueError, match="reward 'needs_target': params target must be set; "
                                         "it accepts: target=<required>, scale=1.0"):
        score(rollouts, [RewardSpec("needs_target")])
    assert score(rollouts, [RewardSpec("needs_target", params={"target": "x", "scale": 3})]).total == [3.0]


def test_a_reward_taking_any_keywords_accepts_any_params(isolated_registry) -> None:
    @reward("open")
    def open_reward(rollouts: list[Rollout], **params: Any) -> list[float | None]:
        return [float(params["value"])] * len(rollouts)

    assert score([make_rollout()], [RewardSpec("open", params={"value": 4})]).total == [4.0]


# --- scoring -------------------------------------------------------------------------


@pytest.fixture
def fixed_rewards(isolated_registry) -> None:
    @reward("fixed_a")
    def fixed_a(rollouts: list[Rollout]) -> list[float | None]:
        return [1.0, None, 0.0]

    @reward("fixed_b")
    def fixed_b(rollouts: list[Rollout]) -> list[float | None]:
        return [1, 1.0, None]  # an int is a number too


def test_total_leaves_out_none_without_rescaling_the_weights(fixed_rewards: None) -> None:
    rollouts = [make_rollout(prompt_id=f"p{i}") for i in range(3)]
    scores = score(rollouts, [RewardSpec("fixed_a", weight=2.0), RewardSpec("fixed_b", weight=0.5)])
    assert scores.components == {"fixed_a": [1.0, None, 0.0], "fixed_b": [1.0, 1.0, None]}
    # sample 0: 2*1 + 0.5*1 = 2.5; sample 1: a is None, so 0.5*1 = 0.5 (not rescaled to 2.5*1);
    # sample 2: 2*0 and b is None = 0.0
    assert scores.total == [2.5, 0.5, 0.0]
    assert scores.failed == {"fixed_a": 0, "fixed_b": 0}


def test_metrics(fixed_rewards: None) -> None:
    rollouts = [make_rollout(prompt_id=f"p{i}") for i in range(3)]
    metrics = score(rollouts, [RewardSpec("fixed_a", weight=2.0), RewardSpec("fixed_b", weight=0.5)]).metrics()
    assert metrics == pytest.approx({
        "reward/mean": (2.5 + 0.5 + 0.0) / 3,
        "reward/fixed_a": 0.5,  # mean of 1, 0
        "reward/fixed_a/std": 0.5,  # population std of 1, 0
        "reward/fixed_a/none_frac": 1 / 3,
        "reward/fixed_a/failed": 0.0,
        "reward/fixed_b": 1.0,
        "reward/fixed_b/std": 0.0,
        "reward/fixed_b/none_frac": 1 / 3,
        "reward/fixed_b/failed": 0.0,
    })


def test_a_reward_that_never_scores_has_nan_mean_and_total_zero(isolated_registry) -> None:
    @reward("abstains")
    def abstains(rollouts: list[Rollout]) -> list[float | None]:
        return [None] * len(rollouts)

    scores = score([make_rollout(), make_rollout()], [RewardSpec("abstains")])
    assert scores.total == [0.0, 0.0]
    metrics = scores.metrics()
    assert math.isnan(metrics["reward/abstains"]) and math.isnan(metrics["reward/abstains/std"])
    assert metrics["reward/abstains/none_frac"] == 1.0
    assert metrics["reward/mean"] == 0.0


def test_the_same_reward_twice_gets_numbered_components() -> None:
    rollouts = [make_rollout("7", spoken="the answer is eight", answer=7)]
    scores = score(rollouts, [RewardSpec("correctness"), RewardSpec("correctness", weight=0.5,
                                                                     params={"speech": True})])
    assert scores.components == {"correctness#1": [1.0], "correctness#2": [0.0]}
    assert scores.total == [1.0]


def test_score_needs_at_least_one_reward() -> None:
    with pytest.raises(ValueError, match="no rewards to score with"):
        score([make_rollout()], [])


# --- failures ------------------------------------------------------------------------


@pytest.fixture
def flaky(isolated_registry) -> list[int]:
    """A reward that divides by zero on prompts whose id starts with "bad"; returns its batch sizes."""
    calls: list[int] = []

    @reward("flaky")
    def flaky_reward(rollouts: list[Rollout]) -> list[float | None]:
        calls.append(len(rollouts))
        return [1.0 / (0 if r.prompt.id.startswith("bad") else 1) for r in rollouts]

    return calls


FLAKY_BATCH = ["ok-0", "bad-1", "ok-2", "bad-3"]


def test_on_error_raise_names_the_reward_the_prompt_and_the_exception(flaky: list[int]) -> None:
    rollouts = [make_rollout(prompt_id=i) for i in FLAKY_BATCH]
    with pytest.raises(RewardError, match="reward 'flaky' failed on prompt 'bad-1': ZeroDivisionError: "
                                          "float division by zero") as caught:
        score(rollouts, [RewardSpec("flaky")])
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert flaky == [4, 1, 1]  # the batch, then one by one until the first failing sample


@pytest.mark.parametrize(("on_error", "expected"), [("zero", [1.0, 0.0, 1.0, 0.0]), ("skip", [1.0, None, 1.0, None])])
def test_on_error_zero_and_skip_score_only_the_failing_samples(
    flaky: list[int], on_error: str, expected: list[float | None]
) -> None:
    rollouts = [make_rollout(prompt_id=i) for i in FLAKY_BATCH]
    scores = score(rollouts, [RewardSpec("flaky", weight=2.0, on_error=on_error)])
    assert scores.components == {"flaky": expected}
    assert scores.total == [2.0, 0.0, 2.0, 0.0]
    assert scores.failed == {"flaky": 2}
    assert flaky == [4, 1, 1, 1, 1]
    metrics = scores.metrics()
    assert metrics["reward/flaky/failed"] == 2.0
    assert metrics["reward/flaky/none_frac"] == (0.5 if on_error == "skip" else 0.0)
    assert metrics["reward/flaky"] == (1.0 if on_error == "skip" else 0.5)


def test_a_failure_only_on_the_whole_batch(isolated_registry) -> None:
    @reward("batch_only")
    def batch_only(rollouts: list[Rollout]) -> list[float | None]:
        if len(rollouts) > 1:
            raise RuntimeError("batch too large")
        return [0.5]

    rollouts = [make_rollout(prompt_id="a"), make_rollout(prompt_id="b")]
    with pytest.raises(RewardError, match="failed on the batch of 2 rollouts \\(prompts 'a', 'b'\\) but on none of "
                                          "them alone: RuntimeError: batch too large"):
        score(rollouts, [RewardSpec("batch_only")])
    scores = score(rollouts, [RewardSpec("batch_only", on_error="skip")])
    assert scores.components == {"batch_only": [0.5, 0.5]}
    assert scores.failed == {"batch_only": 0}


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0], "reward 'broken' returned 1 scores for 2 rollouts; return exactly one score"),
        ([1.0, "high"], "reward 'broken' returned 'high' \\(str\\) for sample 1; each score must be a finite number"),
        ([float("nan"), 1.0], "reward 'broken' returned nan \\(float\\) for sample 0"),
        (0.5, "reward 'broken' returned a float; a reward returns a list"),
    ],
)
def test_a_reward_returning_the_wrong_thing_is_an_error_even_under_skip(
    isolated_registry: dict, returned: Any, message: str
) -> None:
    @reward("broken")
    def broken(rollouts: list[Rollout]) -> Any:
        return returned

    with pytest.raises(RewardError, match=message):
        score([make_rollout(), make_rollout()], [RewardSpec("broken", on_error="skip")])


def test_scores_may_be_numpy_values_and_bools(isolated_registry) -> None:
    @reward("numpy_scores")
    def numpy_scores(rollouts: list[Rollout]) -> Any:
        return np.array([0.25, 1.0], dtype=np.float32)

    @reward("bool_scores")
    def bool_scores(rollouts: list[Rollout]) -> Any:
        return [True, False]

    scores = score([make_rollout(), make_rollout()], [RewardSpec("numpy_scores"), RewardSpec("bool_scores")])
    assert scores.components == {"numpy_scores": [0.25, 1.0], "bool_scores": [1.0, 0.0]}
    assert all(type(s) is float for s in scores.components["numpy_scores"])


# --- async rewards -------------------------------------------------------------------


def test_an_async_reward_is_awaited(isolated_registry) -> None:
    @reward("slow_judge")
    async def slow_judge(rollouts: list[Rollout], *, value: float = 1.0) -> list[float | None]:
        await asyncio.sleep(0.001)
        return [value if r.text else None for r in rollouts]

    rollouts = [make_rollout("yes"), make_rollout("")]
    specs = [RewardSpec("slow_judge", params={"value": 0.75})]
    assert score(rollouts, specs).components == {"slow_judge": [0.75, None]}

    async def from_a_running_loop() -> list[float]:
        return score(rollouts, specs).total

    assert asyncio.run(from_a_running_loop()) == [0.75, 0.0]


def test_an_async_reward_failing_is_attributed_per_sample(isolated_registry) -> None:
    @reward("async_flaky")
    async def async_flaky(rollouts: list[Rollout]) -> list[float | None]:
        if any(r.text == "boom" for r in rollouts):
            raise ValueError("cannot judge")
        return [1.0] * len(rollouts)

    rollouts = [make_rollout("fine"), make_rollout("boom")]
    scores = score(rollouts, [RewardSpec("async_flaky", on_error="zero")])
    assert scores.components == {"async_flaky": [1.0, 0.0]}
    assert scores.failed == {"async_flaky": 1}


# --- RewardSpec in a recipe ----------------------------------------------------------


@dataclass
class RecipeWithRewards:
    rewards: list[RewardSpec] = field(default_factory=list)


def test_reward_spec_is_a_recipe_section(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""
        rewards:
          - name: correctness
            params: {speech: true}
          - name: my.module:judge
            weight: 0.5
            on_error: skip
    """))
    recipe = load_recipe(path, ["rewards[0].weight=2"], RecipeWithRewards)
    assert recipe.rewards == [
        RewardSpec("correctness", weight=2.0, params={"speech": True}),
        RewardSpec("my.module:judge", weight=0.5, params={}, on_error="skip"),
    ]
    with pytest.raises(RecipeError, match="wieght"):
        path.write_text("rewards:\n  - name: correctness\n    wieght: 2\n")
        load_recipe(path, [], RecipeWithRewards)


def test_reward_spec_checks_on_error_and_weight() -> None:
    with pytest.raises(ValueError, match="reward 'correctness': on_error='ignore' is not known; use one of raise, "
                                         "zero, skip"):
        RewardSpec("correctness", on_error="ignore")
    with pytest.raises(ValueError, match="weight=inf must be a finite number"):
        RewardSpec("correctness", weight=float("inf"))


def test_speech_duration_scores_the_rendered_waveform() -> None:
    import numpy as np

    from vocalign.data.types import Rollout
    from vocalign.rewards import get_reward

    def rollout(seconds: float | None) -> Rollout:
        wav = None if seconds is None else np.zeros(int(24_000 * seconds), np.float32)
        return Rollout(prompt=None, text="", think="", spoken_text="", audio_tokens=[], waveform=wav, sample_rate=24_000,
                       prompt_ids=[], response_ids=[], logprobs=[])

    fn = get_reward("speech_duration")
    scores = fn([rollout(1.0), rollout(1.5), rollout(3.0), rollout(None)], target_s=1.0, tolerance_s=1.0)
    assert scores == pytest.approx([1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="target_s=0 and tolerance_s=1.0 must be positive"):
        fn([rollout(1.0)], target_s=0, tolerance_s=1.0)
