"""Seeded synthetic preference pairs for training a reward model in the project's domain.

Each pair is a spoken-arithmetic question ("what is three plus four") with a chosen and
a rejected response as text, the way a policy's answer reads in text ("7") or in its
speech's transcript ("the answer is seven"). The chosen response is preferred for one
reason per pair, named by its `kind`, so accuracy can be reported per reason:

- `heard`: an answer that restates the question asked ("three plus four is seven") over
  one that answers a misheard question ("three plus five is eight": one operand or the
  operator changed, its arithmetic right), the failure of a model that hears badly;
- `correct`: the right number over a wrong one, both in the same wording, so only the
  arithmetic tells them apart (half the wrong numbers are off by one: near misses);
- `on_topic`: an answer over a refusal or an off-topic ramble;
- `concise`: an answer over the same answer repeated (a degenerate loop, common in
  sampled speech);
- `polite`: an answer over the same answer with an insult around it.

`heard` and `correct` need the reward model to check the response against the question;
in the other kinds chosen and rejected share the right answer, so the model must learn
what is wrong besides the number. DEFAULT_KINDS leaves `heard` and `correct` out: the
default reward model (2 layers, width 64) does not learn them in the recipe's minute of
CPU training (held-out accuracy 0.52 for `heard` after 800 steps on 8,000 pairs, 0.63
for `correct` after 400 steps, each trained alone); they are there for bigger models
and longer runs. All randomness comes from
`numpy.random.default_rng(seed)`; held-out pairs come from another seed with every
(question, chosen, rejected) triple seen in training removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vocalign.data.synthetic import number_to_words
from vocalign.data.types import Prompt

PAIR_KINDS = ("heard", "on_topic", "concise", "polite", "correct")
DEFAULT_KINDS = ("on_topic", "concise", "polite")

# How an answer is worded; {d} is the number in digits, {w} in words, {q} the question's sum.
_ANSWER_WORDINGS = ("{d}", "{w}", "the answer is {w}", "the answer is {d}", "{q} is {w}", "it is {w}")
# Answers that restate the question; {q} is the question's sum ("three plus four").
_RESTATEMENTS = ("{q} is {w}", "{q} is {d}", "{q} equals {w}", "{q} makes {w}")
_REFUSALS = (
    "sorry, i cannot help with that",
    "i do not know",
    "i would rather not answer that question",
    "let us talk about something else",
    "i like the blue sky today",
    "the red ball is on the table",
    "my cat sleeps on the chair all morning",
)
_REPEATS = ("{a} {a} {a}", "{a} {a} {a} {a} {a}", "{a}, {a}, {a}, {a}")
_INSULTS = (
    "{a}, obviously, you idiot",
    "ugh, {a}. stop asking me such dumb questions",
    "{a}. even a child knows that",
    "are you stupid? {a}",
)
_COURTESIES = ("{a}", "sure, {a}", "{a}, i hope that helps", "good question: {a}")


@dataclass(frozen=True)
class PreferencePair:
    """A question with the response preferred to another, and why (`kind`, see PAIR_KINDS)."""

    question: str
    chosen: str
    rejected: str
    kind: str
    # the spoken question (its audio and chat turn) for a reward model that hears; None: text only
    prompt: Prompt | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """What makes two pairs the same training example."""
        return (self.question, self.chosen, self.rejected)


def preference_pairs(
    n: int, seed: int, kinds: Sequence[str] = DEFAULT_KINDS, max_operand: int = 9
) -> list[PreferencePair]:
    """`n` pairs, the kinds in turn (so every kind gets n / len(kinds)), drawn with `seed`."""
    if n < 1:
        raise ValueError(f"preference_pairs: n={n} must be at least 1")
    _check_kinds(kinds)
    if max_operand < 1:
        raise ValueError(f"preference_pairs: max_operand={max_operand} must be at least 1 (wrong answers need room)")
    rng = np.random.default_rng(seed)
    return [_pair(kinds[i % len(kinds)], rng, max_operand) for i in range(n)]


def held_out_pairs(
    n: int, seed: int, seen: Iterable[PreferencePair], kinds: Sequence[str] = DEFAULT_KINDS, max_operand: int = 9
) -> list[PreferencePair]:
    """`n` pairs drawn with `seed`, none of which repeats a (question, chosen, rejected) of `seen`.

    Drawn in rounds with the kinds in turn, so the kinds stay balanced when some
    draws are dropped as repeats.
    """
    _check_kinds(kinds)
    excluded = {pair.key for pair in seen}
    rng = np.random.default_rng(seed)
    pairs: list[PreferencePair] = []
    for _ in range(100 * n):  # a bound: a tiny domain could run out of new pairs
        if len(pairs) == n:
            return pairs
        pair = _pair(kinds[len(pairs) % len(kinds)], rng, max_operand)
        if pair.key not in excluded:
            excluded.add(pair.key)
            pairs.append(pair)
    raise ValueError(
        f"held_out_pairs: found only {len(pairs)} of {n} pairs not seen in training; ask for fewer held-out "
        "pairs or raise max_operand"
    )


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in PAIR_KINDS]
    if not kinds or unknown:
        raise ValueError(f"preference pair kinds {list(kinds)} must be a non-empty list of {', '.join(PAIR_KINDS)}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _operation(rng: np.random.Generator, max_operand: int) -> tuple[int, str, int]:
    """(a, "plus" or "minus", b); a minus never goes negative."""
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
    op = "plus" if rng.random() < 0.5 else "minus"
    return (b, op, a) if op == "minus" and b > a else (a, op, b)


def _spoken(a: int, op: str, b: int) -> tuple[str, int]:
    """("three plus four", 7)"""
    return f"{number_to_words(a)} {op} {number_to_words(b)}", a + b if op == "plus" else a - b


def _question(rng: np.random.Generator, max_operand: int) -> tuple[tuple[int, str, int], str, int]:
    """((3, "plus", 4), "what is three plus four", 7)."""
    operation = _operation(rng, max_operand)
    spoken, answer = _spoken(*operation)
    return operation, f"what is {spoken}", answer


def _misheard(rng: np.random.Generator, operation: tuple[int, str, int], max_operand: int) -> tuple[int, str, int]:
    """The question with one word misheard: an operand or the operator changed ("three plus five")."""
    a, op, b = operation
    while True:
        part = int(rng.integers(3))
        if part == 1:
            other = (a, "minus" if op == "plus" else "plus", b)
        else:
            value = int(rng.integers(0, max_operand + 1))
            other = (value, op, b) if part == 0 else (a, op, value)
        if other != operation and not (other[1] == "minus" and other[2] > other[0]):
            return other


def _wrong_answer(rng: np.random.Generator, answer: int, max_operand: int) -> int:
    if rng.random() < 0.5:  # a near miss
        return answer + 1 if answer == 0 or rng.random() < 0.5 else answer - 1
    others = [v for v in range(2 * max_operand + 1) if v != answer]
    return others[int(rng.integers(len(others)))]


def _worded(wording: str, value: int, spoken: str) -> str:
    return wording.format(d=value, w=number_to_words(value), q=spoken)


def spoken_pairs(prompts: Sequence[Prompt], seed: int, kinds: Sequence[str] = PAIR_KINDS, max_operand: int = 9,
                 exclude: Iterable[PreferencePair] = ()) -> list[PreferencePair]:
    """A pair per spoken arithmetic prompt (the `arithmetic` task's, whose meta holds the
    operands and operator), the kinds in turn, each carrying its prompt: the question as
    heard. Pairs repeating a (question, chosen, rejected) of `exclude` are drawn again
    (a held-out set's rule)."""
    _check_kinds(kinds)
    excluded = {p.key for p in exclude}
    rng = np.random.default_rng(seed)
    pairs = []
    for i, prompt in enumerate(prompts):
        if "operands" not in prompt.meta or "op" not in prompt.meta:
            raise ValueError(f"spoken preference pairs: prompt {prompt.id!r} is not a spoken arithmetic question "
                             "(its meta has no operands and op); make the questions with the arithmetic task")
        a, b = prompt.meta["operands"]
        for _ in range(100):
            pair = _pair(kinds[i % len(kinds)], rng, max_operand, (int(a), str(prompt.meta["op"]), int(b)))
            if pair.key not in excluded:
                break
        pairs.append(PreferencePair(pair.question, pair.chosen, pair.rejected, pair.kind, prompt))
    return pairs


def _pair(kind: str, rng: np.random.Generator, max_operand: int,
          operation: tuple[int, str, int] | None = None) -> PreferencePair:
    if operation is None:
        operation, question, answer = _question(rng, max_operand)
    else:
        spoken_question, answer = _spoken(*operation)
        question = f"what is {spoken_question}"
    spoken = _spoken(*operation)[0]
    wording = _pick(rng, _ANSWER_WORDINGS)
    right = _worded(wording, answer, spoken)
    if kind == "heard":
        wording = _pick(rng, _RESTATEMENTS)
        misheard, other_answer = _spoken(*_misheard(rng, operation, max_operand))
        return PreferencePair(question, _worded(wording, answer, spoken), _worded(wording, other_answer, misheard), kind)
    if kind == "correct":
        return PreferencePair(question, right, _worded(wording, _wrong_answer(rng, answer, max_operand), spoken), kind)
    if kind == "on_topic":
        return PreferencePair(question, right, _pick(rng, _REFUSALS), kind)
    if kind == "concise":
        return PreferencePair(question, right, _pick(rng, _REPEATS).format(a=right), kind)
    return PreferencePair(question, _pick(rng, _COURTESIES).format(a=right), _pick(rng, _INSULTS).format(a=right), kind)
