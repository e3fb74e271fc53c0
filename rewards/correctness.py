"""Answer correctness: does the answer in a response equal the reference answer?

Where the answer is looked for, in order: inside the last `<answer>…</answer>`, else
inside the last `\\boxed{…}` (a `\\text{…}` around its whole content is dropped), else
the whole response. What is looked for there depends
on the reference:
- a number (7, 2.5, "7", "seven", "1/2"): the last number, in digits ("-3", "1,000",
  "2.50"), in words ("twenty one", "twenty-one", "one hundred and five", "minus three"
  where "minus" does not follow a number) or as a fraction of integers ("1/2",
  "\\frac{1}{2}"); numbers are compared by exact value, so "7", "7.0" and "seven" are the
  same answer, and so are "0.5" and "\\frac{1}{2}";
- with `choices` in meta (multiple choice): the option given as its letter ("B", "(B)",
  "answer: B", "the answer is b." where a lower-case letter ends the sentence) or as its
  text (the last option mentioned); the reference may be either;
- anything else: the whole answer, compared after normalising case, punctuation and
  spaces ("The cat." equals "the cat").
"""

from __future__ import annotations

import math
import numbers
import re
import unicodedata
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward

_DIGITS = {w: i for i, w in enumerate("one two three four five six seven eight nine".split(), start=1)}
_TEENS = {w: i for i, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split(), start=10)}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NEGATIVE = ("negative", "minus")
# Words that may be part of a number found in running text. "minus" is left out: in
# "nine minus two" it is the operator, not a sign.
_NUMBER_WORDS = {"zero", "hundred", "and", "negative", *_DIGITS, *_TEENS, *_TENS, *_SCALES}

_UNITS = {**_DIGITS, **_TEENS}
_DIGIT_NUMBER = r"[-+\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
# In running text a sign only counts when it does not follow a word ("9-2" holds 9 and 2).
_DIGIT_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# A fraction of integers, "1/2" or LaTeX's "\frac{1}{2}" (also \dfrac, \tfrac); not part of a date like 1/2/2025.
_FRACTION = r"[-+\u2212]?(?:\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}|(\d+)/(\d+))"
_FRACTION_IN_TEXT = re.compile(r"(?<![\w./])" + _FRACTION + r"(?![\w/])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LATEX_TEXT = re.compile(r"\s*\\(?:text|textbf|mathrm|mbox)\{(.*)\}\s*", re.DOTALL)
# A capital letter in parentheses or after "option"/"choice"/"answer (is)"; after those
# words a lower-case letter counts only when it ends the sentence ("the answer is b."),
# since "the answer is a fast one" uses the article "a".
_CHOICE_LETTER = re.compile(
    r"\(([A-Z])\)"
    r"|(?i:\b(?:option|choice|answer(?:\s+is)?))\s*[:\-]?\s*\(?(?:([A-Z])(?![A-Za-z])|([a-z])\)?(?=\s*(?:[.!?]|$)))"
)


# --- numbers -------------------------------------------------------------------------


def words_to_number(text: str) -> int:
    """The integer that `text` spells in English words, e.g. "twenty one" -> 21.

    The inverse of `vocalign.data.synthetic.number_to_words`, also accepting hyphens
    ("twenty-one"), "and" after hundred or a scale ("one hundred and five"), scales up
    to billions and a leading "negative"/"minus".
    """
    value = _parse_number_words(_word_tokens(text))
    if value is None:
        raise ValueError(
            f"{text!r} is not a number in words; write it like 'twenty one', 'one hundred and five' "
            "or 'two thousand three hundred'"
        )
    return value


def parse_number(text: str) -> int | float | None:
    """The number `text` is as a whole, in digits ("7", "-2.5", "1,000"), in words
    ("seven") or as a fraction ("1/2", "\\frac{1}{2}"); None when it is not one number.
    A trailing full stop is allowed. Integers written without a decimal point or a
    fraction bar are ints ("7" -> 7); the others floats ("7.0" -> 7.0, "4/2" -> 2.0)."""
    value = _number_value(text)
    if value is None:
        return None
    written_as_integer = value.denominator == 1 and not re.search(r"[./]|frac", _strip_number(text))
    return int(value) if written_as_integer else float(value)


def _strip_number(text: str) -> str:
    return text.strip().rstrip(".!?").strip()


def _number_value(text: str) -> Fraction | None:
    """The exact value of `text` as one number (see parse_number), or None."""
    text = _strip_number(text)
    if re.fullmatch(_DIGIT_NUMBER, text):
        return Fraction(Decimal(text.replace(",", "").replace("\u2212", "-")))
    fraction = re.fullmatch(_FRACTION, text)
    if fraction:
        numerator, denominator = (int(g) for g in fraction.groups() if g is not None)
        if denominator == 0:
            return None
        sign = -1 if text[0] in "-\u2212" else 1
        return sign * Fraction(numerator, denominator)
    words = _parse_number_words(_word_tokens(text))
    return None if words is None else Fraction(words)


def _word_tokens(text: str) -> list[str]:
    return text.casefold().replace("-", " ").replace(",", " ").split()


def _parse_number_words(tokens: Sequence[str]) -> int | None:
    """The value of `tokens` as one number in words, or None."""
    sign = 1
    if tokens and tokens[0] in _NEGATIVE:
        sign, tokens = -1, tokens[1:]
    if list(tokens) == ["zero"]:
        return 0
    if not tokens:
        return None
    total, i, previous_scale = 0, 0, None
    while i < len(tokens):
        group, i = _parse_group(tokens, i)
        if group is None:
            return None
        if i < len(tokens) and tokens[i] in _SCALES:
            scale = _SCALES[tokens[i]]
            if previous_scale is not None and scale >= previous_scale:
                return None  # "one thousand two thousand"
            total, previous_scale, i = total + group * scale, scale, i + 1
            if i < len(tokens) - 1 and tokens[i] == "and":
                i += 1
        elif i == len(tokens):
            total += group
        else:
            return None
    return sign * total


def _parse_group(tokens: Sequence[str], i: int) -> tuple[int | None, int]:
    """A number below 1000 in words starting at tokens[i] ("three hundred and twelve")."""
    start, value = i, 0
    if i + 1 < len(tokens) and tokens[i] in _DIGITS and tokens[i + 1] == "hundred":
        value, i = 100 * _DIGITS[tokens[i]], i + 2
        if i + 1 < len(tokens) and tokens[i] == "and" and (tokens[i + 1] in _UNITS or tokens[i + 1] in _TENS):
            i += 1
    if i < len(tokens) and tokens[i] in _TENS:
        value, i = value + _TENS[tokens[i]], i + 1
        if i < len(tokens) and tokens[i] in _DIGITS:
            value, i = value + _DIGITS[tokens[i]], i + 1
    elif i < len(tokens) and tokens[i] in _UNITS:
        value, i = value + _UNITS[tokens[i]], i + 1
    return (value, i) if i > start else (None, start)


def _last_number(text: str) -> str | None:
    """The text of the last number in `text`, in digits, in words or as a fraction.

    The number that ends last wins, and of two ending at the same place the longer one
    ("1/2" over its "2").
    """
    found: list[tuple[int, str]] = [(m.start(), m.group()) for m in _DIGIT_NUMBER_IN_TEXT.finditer(text)]
    found += [(m.start(), m.group()) for m in _FRACTION_IN_TEXT.finditer(text)]
    for run in _number_word_runs(text):
        i = 0
        while i < len(run):
            # The longest stretch from run[i] that is one number: "seven fifteen" is 7 then 15.
            for j in range(len(run), i, -1):
                if _parse_number_words([word for word, _, _ in run[i:j]]) is not None:
                    found.append((run[i][1], text[run[i][1]:run[j - 1][2]]))
                    i = j
                    break
            else:
                i += 1
    return max(found, key=lambda f: (f[0] + len(f[1]), len(f[1])))[1] if found else None


def _number_word_runs(text: str) -> list[list[tuple[str, int, int]]]:
    """Stretches of number words joined only by spaces or hyphens, as (word, start, end).

    "minus" starts a stretch (a sign) only when it does not follow a number: "is minus
    three" is -3, but in "nine minus two" and "9 minus 2" it is the operator.
    """
    runs: list[list[tuple[str, int, int]]] = []
    previous_end = None
    for match in re.finditer(r"[^\W\d_]+", text):
        word = match.group().casefold()
        if word == "minus" and not _follows_number(text[: match.start()]):
            runs.append([(word, match.start(), match.end())])
            previous_end = match.end()
            continue
        if word not in _NUMBER_WORDS:
            previous_end = None
            continue
        joined = previous_end is not None and re.fullmatch(r"[\s-]*", text[previous_end:match.start()])
        if not joined:
            runs.append([])
        runs[-1].append((word, match.start(), match.end()))
        previous_end = match.end()
    return runs


def _follows_number(before: str) -> bool:
    """Whether the text `before` a word ends with a number (digits or a number word)."""
    last = before.rstrip(" \t\n-").rpartition(" ")[2].casefold()
    return bool(last) and (last[-1].isdigit() or last in _NUMBER_WORDS)


# --- extraction and comparison -------------------------------------------------------


def normalize_answer(text: str) -> str:
    """`text` casefolded, with punctuation turned into spaces and runs of spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def extract_answer(text: str, reference: Any, choices: Sequence[str] | None = None) -> str | None:
    """The part of `text` that is compared with `reference` (see the module doc), or None
    when there is nothing of the right kind: no number for a numeric reference, no
    option for a multiple-choice one."""
    scope = _marked_answer(text)
    if scope is None:
        scope = text
    if choices:
        return _chosen_option(scope, choices)
    if _reference_number(reference) is not None:
        return _last_number(scope)
    return scope.strip()


def same_answer(answer: str | None, reference: Any) -> bool:
    """Whether `answer` equals `reference`: by value when both are numbers, else as
    normalised strings."""
    if answer is None or reference is None:
        return False
    got, expected = _number_value(answer), _reference_number(reference)
    if got is not None and expected is not None:
        return got == expected
    return normalize_answer(answer) == normalize_answer(str(reference))


def is_correct(text: str, reference: Any, choices: Sequence[str] | None = None) -> bool:
    """Whether the answer in `text` equals `reference` (an option or its letter when `choices` are given)."""
    if choices:
        reference = _option_of_reference(reference, choices)
    return same_answer(extract_answer(text, reference, choices), reference)


def _reference_number(reference: Any) -> Fraction | None:
    if isinstance(reference, bool):
        return None
    if isinstance(reference, numbers.Integral):  # numpy integers too (rows from `datasets`)
        return Fraction(int(reference))
    if isinstance(reference, numbers.Real):
        if not math.isfinite(reference):
            return None
        return Fraction(repr(float(reference)))  # the shortest decimal that is this float: 0.1 -> 1/10
    if isinstance(reference, str):
        return _number_value(reference)
    return None


def _marked_answer(text: str) -> str | None:
    """The content of the last <answer>…</answer>, else of the last \\boxed{…} (unwrapping \\text{…})."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                boxed = text[begin:i]
                wrapped = _LATEX_TEXT.fullmatch(boxed)
                return wrapped.group(1) if wrapped else boxed
            depth -= 1
    return None  # never closed


def _chosen_option(text: str, choices: Sequence[str]) -> str | None:
    """The option `text` picks: the whole text is one, or a letter, else the last option mentioned."""
    options = [normalize_answer(str(c)) for c in choices]
    said = normalize_answer(text)
    if said in options:
        return str(choices[options.index(said)])
    alone = re.fullmatch(r"\W*([A-Za-z])\W*", text)
    letters = [alone.group(1).upper()] if alone else [(a or b or c).upper() for a, b, c in _CHOICE_LETTER.findall(text)]
    if letters and ord(letters[-1]) - ord("A") < len(choices):
        return str(choices[ord(letters[-1]) - ord("A")])
    mentioned = []
    for index, option in enumerate(options):
        if not option:
            continue
        for match in re.finditer(rf"(?<!\S){re.escape(option)}(?!\S)", said):
            mentioned.append((match.end(), len(option), index))  # the latest, then the longest, wins
    return str(choices[max(mentioned)[2]]) if mentioned else None


def _option_of_reference(reference: Any, choices: Sequence[str]) -> Any:
    """A reference given as a letter ("B") becomes its option's text."""
    options = [normalize_answer(str(c)) for c in choices]
    if isinstance(reference, str) and normalize_answer(reference) not in options:
        letter = re.fullmatch(r"\W*([A-Za-z])\W*", reference)
        if letter and ord(letter.group(1).upper()) - ord("A") < len(choices):
            return str(choices[ord(letter.group(1).upper()) - ord("A")])
    return reference


# --- the reward ----------------------------------------------------------------------


@reward("correctness")
def correctness(rollouts: list[Rollout], *, field: str = "answer", speech: bool = False) -> list[float | None]:
    """1.0 when the response's answer equals meta[field] (numbers by value), else 0.0; None without meta[field].

    `speech=True` checks the words the model spoke (`spoken_text`) instead of its text.
    Multiple choice when meta has `choices`. A NaN reference (a missing value in a
    numeric column read by `datasets` or pandas) counts as no reference.
    """
    scores: list[float | None] = []
    for rollout in rollouts:
        reference = rollout.meta.get(field)
        if reference is None or (isinstance(reference, numbers.Real) and math.isnan(reference)):
            scores.append(None)
            continue
        response = rollout.spoken_text if speech else rollout.text
        scores.append(1.0 if is_correct(response, reference, rollout.meta.get("choices")) else 0.0)
    return scores
