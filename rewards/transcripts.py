"""Transcript rewards: text normalisation, WER/CER, `asr_wer` and `speech_consistency`.

Normalisation makes a transcript comparable however it was written: casefolded,
numbers spelled out in words the way `vocalign.data.synthetic` speaks them ("7" and
"seven" both become "seven"; "one hundred and five" and "105" both "one hundred five"),
apostrophes dropped inside words ("o'clock" -> "oclock"), other punctuation and symbols
turned into spaces. Numbers keep their meaning: "$25.50" -> "twenty five dollars fifty
cents", "7:30" -> "seven thirty", "7:00" -> "seven oclock", "3.5" -> "three point five",
"1,000" -> "one thousand", "21st" -> "twenty first". (Whisper's English normalizer is
not used: it turns "seven o'clock" into "70 clock".)

Both rewards map an error rate to a score with the same shaping: `shape="linear"` gives
1 - min(WER, 1), `shape="exp"` gives exp(-k * WER).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable

import jiwer

from vocalign.data.synthetic import number_to_words
from vocalign.data.types import Rollout
from vocalign.rewards.asr import transcribe_rollouts
from vocalign.rewards.registry import reward

UNITS = ("word", "char")
SHAPES = ("linear", "exp")
TEXT_FIELDS = ("text", "spoken_text", "think", "raw_text")
AGAINST = ("text", "spoken_text", "reference")

_CURRENCIES = {"$": ("dollar", "cent"), "€": ("euro", "cent"), "£": ("pound", "penny")}
_PLURAL = {"penny": "pence"}
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}
_SCALE_WORDS = ("hundred", "thousand", "million", "billion")
_SMALL_NUMBER_WORDS = frozenset(number_to_words(n) for n in range(1, 20)) | {
    number_to_words(10 * n) for n in range(2, 10)}

_INTEGER = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+"
_NUMBER_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], str]]] = []


def _pattern(regex: str) -> Callable[[Callable[[re.Match], str]], Callable[[re.Match], str]]:
    """Register how matches of `regex` are spelled out; patterns are tried in registration order."""

    def register(spell: Callable[[re.Match], str]) -> Callable[[re.Match], str]:
        _NUMBER_PATTERNS.append((re.compile(regex), spell))
        return spell

    return register


# --- numbers to words -------------------------------------------------------------------


def _integer_words(digits: str) -> str:
    """ "1,000" -> "one thousand"; a leading zero ("007") or a huge number is read digit by digit."""
    digits = digits.replace(",", "")
    if (len(digits) > 1 and digits.startswith("0")) or len(digits) > 12:
        return " ".join(number_to_words(int(d)) for d in digits)
    return number_to_words(int(digits))


def _fraction_words(digits: str) -> str:
    return " ".join(number_to_words(int(d)) for d in digits)


def _plural(word: str, amount: int) -> str:
    return word if amount == 1 else _PLURAL.get(word, word + "s")


@_pattern(r"([$€£])\s?(" + _INTEGER + r")(?:\.(\d{2}))?(?!\d)")
def _money(match: re.Match) -> str:
    unit, cent = _CURRENCIES[match.group(1)]
    whole, cents = int(match.group(2).replace(",", "")), int(match.group(3) or 0)
    parts = [f"{_integer_words(match.group(2))} {_plural(unit, whole)}"] if whole or not cents else []
    if cents:
        parts.append(f"{number_to_words(cents)} {_plural(cent, cents)}")
    return " " + " ".join(parts) + " "


@_pattern(r"(?<![\d:])(\d{1,2}):(\d{2})(?![\d:])")
def _clock_time(match: re.Match) -> str:
    hour, minutes = number_to_words(int(match.group(1))), int(match.group(2))
    if minutes == 0:
        return f" {hour} oclock "
    return f" {hour} {'oh ' if minutes < 10 else ''}{number_to_words(minutes)} "


@_pattern(r"(?<![\w.])(\d+)(?:st|nd|rd|th)\b")
def _ordinal(match: re.Match) -> str:
    words = _integer_words(match.group(1)).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " " + " ".join(words) + " "


# A sign counts only where it does not follow a word or number ("9-2" is nine, two).
@_pattern(r"(?:(?<![\w.])([-\u2212]))?(" + _INTEGER + r")(?:\.(\d+))?(\s?%)?")
def _plain_number(match: re.Match) -> str:
    words = _integer_words(match.group(2))
    if match.group(3):
        words += " point " + _fraction_words(match.group(3))
    if match.group(1):
        words = "minus " + words
    if match.group(4):
        words += " percent"
    return " " + words + " "


def spell_out_numbers(text: str) -> str:
    """`text` with every number in digits written in words (see the module doc)."""
    for regex, spell in _NUMBER_PATTERNS:
        text = regex.sub(spell, text)
    return text


# --- normalisation and error rates -----------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """`text` lowercased, numbers in words, apostrophes dropped, other punctuation and symbols
    as spaces, "and" inside a number and "a" before a scale word made as `number_to_words` writes them."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\b([ap])\.m\.", r"\1m", text)  # "7 p.m." -> "7 pm", not "7 p m"
    text = spell_out_numbers(text)
    text = re.sub(r"(?<=\w)['\u2019](?=\w)", "", text)
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    words = text.split()
    out: list[str] = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "and" and out and out[-1] in _SCALE_WORDS and following in _SMALL_NUMBER_WORDS:
            continue  # "one hundred and five" -> "one hundred five"
        if word == "a" and following in _SCALE_WORDS:
            word = "one"  # "a hundred" -> "one hundred"
        out.append(word)
    return " ".join(out)


def word_error_rate(reference: str, hypothesis: str, unit: str = "word", normalize: bool = True) -> float:
    """Edit distance / reference length, in words (WER) or characters (CER, `unit="char"`).

    Both texts are normalised first (`normalize_transcript`) unless `normalize=False`. For
    CER the spaces are removed, so it suits languages written without them. An empty
    reference gives 0.0 against an empty hypothesis and 1.0 against any other.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not known; use 'word' (WER) or 'char' (CER)")
    if normalize:
        reference, hypothesis = normalize_transcript(reference), normalize_transcript(hypothesis)
    if unit == "char":
        reference, hypothesis = "".join(reference.split()), "".join(hypothesis.split())
    if not reference.strip():
        return 0.0 if not hypothesis.strip() else 1.0
    if not hypothesis.strip():
        return 1.0  # every reference unit deleted
    if unit == "char":
        return float(jiwer.process_characters(reference, hypothesis).cer)
    return float(jiwer.process_words(reference, hypothesis).wer)


def shaped_score(error_rate: float, shape: str = "linear", k: float = 3.0) -> float:
    """An error rate as a reward in [0, 1]: 1 - min(rate, 1) ("linear") or exp(-k * rate) ("exp")."""
    if shape == "linear":
        return 1.0 - min(error_rate, 1.0)
    if shape == "exp":
        return math.exp(-k * error_rate)
    raise ValueError(f"shape={shape!r} is not known; use one of {', '.join(SHAPES)}")


def _check_params(unit: str, shape: str, k: float) -> None:
    """Fail on a bad param before any (slow) ASR runs."""
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not known; use 'word' (WER) or 'char' (CER, for text without spaces)")
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not known; use one of {', '.join(SHAPES)}")
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ValueError(f"k={k!r} must be a positive number (the decay of shape 'exp')")


def _reference_text(value: object) -> str | None:
    """A meta reference as text (numbers accepted: 7 -> "7"), or None when there is none."""
    if value is None:
        return None
    text = str(value)
    return text if normalize_transcript(text) else None


# --- rewards -------------------------------------------------------------------------------


@reward("asr_wer")
def asr_wer(
    rollouts: list[Rollout],
    *,
    field: str = "text",
    reference_key: str = "transcript",
    unit: str = "word",
    shape: str = "linear",
    k: float = 3.0,
) -> list[float | None]:
    """Transcript accuracy: 1 - min(WER, 1) of the response's `field` against meta[reference_key]; None without one.

    For transcription tasks, where the model writes what it heard. `unit: char` scores CER;
    `shape: exp` gives exp(-k * WER).
    """
    _check_params(unit, shape, k)
    if field not in TEXT_FIELDS:
        raise ValueError(f"field={field!r} is not a text of a rollout; use one of {', '.join(TEXT_FIELDS)}")
    scores: list[float | None] = []
    for rollout in rollouts:
        reference = _reference_text(rollout.meta.get(reference_key))
        if reference is None:
            scores.append(None)
            continue
        scores.append(shaped_score(word_error_rate(reference, getattr(rollout, field), unit), shape, k))
    return scores


@reward("speech_consistency")
def speech_consistency(
    rollouts: list[Rollout],
    *,
    against: str = "text",
    reference_key: str = "transcript",
    asr: str = "embedded",
    asr_kwargs: dict | None = None,
    unit: str = "word",
    shape: str = "linear",
    k: float = 3.0,
) -> list[float | None]:
    """Does the speech say what it should? ASR of each rollout's waveform scored against its text.

    `against`: "text" (the visible answer: "7" agrees with spoken "seven"), "spoken_text"
    (the text tokens interleaved with the speech) or "reference" (meta[reference_key]).
    The ASR backend `asr` (built with `asr_kwargs`) runs once on the whole batch. A rollout
    without speech scores 0.0 (speech was expected and is missing); None only when the text
    to compare with is missing or empty.
    """
    _check_params(unit, shape, k)
    if against not in AGAINST:
        raise ValueError(f"against={against!r} is not known; use one of {', '.join(AGAINST)}")
    expected = [_comparison_text(r, against, reference_key) for r in rollouts]
    heard = transcribe_rollouts(rollouts, asr, only=[i for i, text in enumerate(expected) if text is not None],
                                **(asr_kwargs or {}))
    scores: list[float | None] = []
    for text, transcript in zip(expected, heard):
        if text is None:
            scores.append(None)
        elif transcript is None:
            scores.append(0.0)  # no speech
        else:
            scores.append(shaped_score(word_error_rate(text, transcript, unit), shape, k))
    return scores


def _comparison_text(rollout: Rollout, against: str, reference_key: str) -> str | None:
    if against == "reference":
        return _reference_text(rollout.meta.get(reference_key))
    text = getattr(rollout, against)
    return text if normalize_transcript(text) else None
