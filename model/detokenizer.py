"""Speech detokenizers: the audio tokens an LM speaks -> a waveform.

Step-Audio 2 emits CosyVoice 2 audio tokens and renders them with flow matching +
HiFi-GAN. Every detokenizer here has the same small interface (`SpeechDetokenizer`):
an inventory `units` (audio token k of the LM means `units[k]`), a `sample_rate`, and
`render(unit_ids, voice) -> Audio`. Implementations are registered by name with
`@register_detokenizer(name)` and built with `build_detokenizer(name, **kw)`, so a real
checkpoint plugs its own token2wav in without touching the rest of the stack.

The embedded default, `EspeakUnitDetokenizer` ("espeak_units"), uses units a small
model can learn: 9 prosody-control tokens, a word boundary and espeak-ng en-us phoneme
mnemonics, rendered by espeak-ng.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from vocalign.data.espeak import synthesize, text_to_phonemes
from vocalign.data.types import STYLE_LEVELS, Audio, SpeechStyle


@runtime_checkable
class SpeechDetokenizer(Protocol):
    """Turns a sequence of audio unit ids (indices into `units`) into speech."""

    units: list[str]
    sample_rate: int

    def render(self, unit_ids: Sequence[int], voice: str | None = None) -> Audio:
        """The waveform of `unit_ids`; `voice` is a timbre the detokenizer knows (None = default)."""
        ...


# ------------------------------------------------------------------------- registry

_DETOKENIZERS: dict[str, Callable[..., SpeechDetokenizer]] = {}

_Factory = TypeVar("_Factory", bound=Callable[..., SpeechDetokenizer])


def register_detokenizer(name: str) -> Callable[[_Factory], _Factory]:
    """Class/factory decorator: make a detokenizer buildable as `build_detokenizer(name)`."""

    def register(factory: _Factory) -> _Factory:
        if name in _DETOKENIZERS:
            raise ValueError(
                f"speech detokenizer {name!r} is already registered (by {_DETOKENIZERS[name]!r}); pick another name"
            )
        _DETOKENIZERS[name] = factory
        return factory

    return register


def available_detokenizers() -> list[str]:
    return sorted(_DETOKENIZERS)


def build_detokenizer(name: str, **kwargs) -> SpeechDetokenizer:
    """Build the detokenizer registered as `name`, passing `kwargs` to its constructor."""
    if name not in _DETOKENIZERS:
        raise ValueError(
            f"speech detokenizer {name!r} is not known; known: {', '.join(available_detokenizers())}. "
            "Register a new one with @register_detokenizer(name)."
        )
    detokenizer = _DETOKENIZERS[name](**kwargs)
    detokenizer.registered_name = name  # what a saved policy records, to build it again
    return detokenizer


# -------------------------------------------------------------- the espeak inventory

# espeak-ng settings per prosody token. The levels are far apart so that a listener (or
# an F0/RMS/duration measurement) tells them apart on any voice: slow/fast speech lasts
# about 1.4x/0.7x as long as normal, low/high pitch has about 0.8x/1.45x its F0, and
# soft/loud about 0.35x/1.85x its RMS.
PROSODY_SETTINGS: dict[str, dict[str, int]] = {
    "rate": {"slow": 120, "normal": 175, "fast": 260},  # words per minute (espeak 80-450)
    "pitch": {"low": 20, "normal": 50, "high": 85},  # espeak 0-99
    "volume": {"soft": 35, "normal": 100, "loud": 190},  # espeak 0-200
}


def prosody_unit(attribute: str, level: str) -> str:
    """The unit that sets `attribute` (rate/pitch/volume) to `level`, e.g. "<rate_slow>"."""
    return f"<{attribute}_{level}>"


PROSODY_UNITS = [
    "<rate_slow>", "<rate_normal>", "<rate_fast>",
    "<pitch_low>", "<pitch_normal>", "<pitch_high>",
    "<volume_soft>", "<volume_normal>", "<volume_loud>",
]
WORD_BOUNDARY = "<wb>"
PAUSE = "_:"  # espeak's short pause (~0.06 s); espeak itself writes it around quotes and "and"

# espeak-ng en-us phoneme mnemonics, as `text_to_phonemes` writes them, collected once
# (offline) from the numbers 0-1000 written as digits, the letters a-z, the words of the
# synthetic tasks, ~700 common English words and a few sentences with punctuation;
# sorted. Pasted as a literal so the inventory (and so every audio token id) is the same
# on every machine and for every espeak-ng build.
#
# Stress stays attached to its vowel ("'i:", ",i:" and "i:" are three units) rather than
# being a unit of its own. A unit is then always one sound: the model cannot emit a
# stray stress mark (before a consonant, twice, at a word's end) that espeak would
# misplace or drop, and stress, which drives espeak's vowel length and intonation, is
# chosen with the vowel itself. The cost is ~60 more units than separate marks would
# take (120 phonemes instead of ~60), small next to Step-Audio 2's 6.6K audio tokens.
PHONEME_UNITS = [
    "'0", "'3:", "'A:", "'A@", "'E", "'I", "'I2", "'O2", "'O:", "'O@", "'OI", "'U", "'U@",
    "'V", "'a", "'aI", "'aI3", "'aI@", "'aU", "'aa", "'e@", "'eI", "'i:", "'i@", "'i@3",
    "'o@", "'oU", "'u", "'u:",
    ",0", ",3:", ",@", ",A:", ",E", ",I", ",O2", ",O@", ",OI", ",U", ",U@", ",V", ",a",
    ",aI", ",aI3", ",aU", ",aa", ",e@", ",eI", ",i:", ",i@", ",i@3", ",o@", ",oU", ",u:",
    "0", "3", "3:", ";", "?", "@", "@-", "@2", "@L", "A@", "D", "E", "I", "I#", "I2", "N",
    "O2", "O:", "O@", "OI", "S", "T", "U", "U@", "V", "Z", "_:", "a", "a#", "aI", "aI3",
    "aI@", "aU", "aa", "b", "d", "dZ", "e@", "eI", "f", "g", "h", "i", "i:", "i@", "i@3",
    "j", "k", "l", "m", "n", "n-", "o@", "oU", "p", "r", "r-", "s", "t", "t#", "t2", "tS",
    "u:", "v", "w", "z",
]

# The inventory: audio token k of the LM is UNITS[k]. Append only; never reorder.
UNITS = PROSODY_UNITS + [WORD_BOUNDARY] + PHONEME_UNITS

_PHONEMES = frozenset(PHONEME_UNITS)
# Stress marks to try, nearest first, for a phoneme with primary ('), secondary (,) or no stress.
_STRESS_ORDER = {"'": ("'", ",", ""), ",": (",", "", "'"), "": ("", ",", "'")}
# Trailing characters that mark a variant of a base phoneme ("a#", "t2", "i@3", "@-", "3:").
_VARIANT_MARKS = ":#23-"
# What `text_to_phonemes` leaves of espeak's pause phonemes "_:", "_|" and "_!" once it
# has split on "_": a leading ":" is a short pause; "|" and "!" are zero-length marks.
_ZERO_LENGTH_MARKS = ("|", "!")
# espeak pauses at clause punctuation when it reads text, but its phoneme output does not
# show those pauses, so `text_to_units` puts them in: a word of 4 short pauses (~0.25 s,
# close to espeak's own pause at a comma) at each , ; : . ! ? followed by a space or the end.
_CLAUSE_BREAK = re.compile(r"[,;:.!?]+[\"')\]]*(?=\s|$)")
CLAUSE_PAUSE = [PAUSE] * 4


def nearest_unit(phoneme: str) -> str | None:
    """The inventory unit for an espeak phoneme mnemonic, or None to drop it.

    A known phoneme maps to itself. An unknown one maps to the closest known unit by
    mnemonic: first the same vowel with another stress (primary -> secondary -> none;
    secondary -> none -> primary; none -> secondary -> primary), then the same with its
    trailing variant marks (`:`, `#`, `2`, `3`, `-`) stripped one at a time, e.g.
    "a#:" -> "a#", "'a:" -> "'a". A phoneme with no such neighbour is dropped (None).
    """
    stress = phoneme[0] if phoneme[:1] in _STRESS_ORDER else ""
    base = phoneme[len(stress) :]
    while base:
        for mark in _STRESS_ORDER[stress]:
            if mark + base in _PHONEMES:
                return mark + base
        if base[-1] not in _VARIANT_MARKS:
            return None
        base = base[:-1]
    return None


def phonemes_to_units(phonemes: Iterable[str]) -> list[str]:
    """Map `text_to_phonemes` output to inventory units (`<wb>` for its ' ' entries).

    Pause fragments (":" from espeak's "_:") become the `_:` unit, zero-length marks
    ("|", "!") are dropped, unknown phonemes go through `nearest_unit`. Word boundaries
    are never doubled nor left at either end.
    """
    units: list[str] = []
    for p in phonemes:
        if p == " ":
            if units and units[-1] != WORD_BOUNDARY:
                units.append(WORD_BOUNDARY)
            continue
        if p in _ZERO_LENGTH_MARKS:
            continue
        if p.startswith(":") and p not in _PHONEMES:
            units.append(PAUSE)
            p = p[1:]
            if not p:
                continue
        unit = nearest_unit(p)
        if unit is not None:
            units.append(unit)
    while units and units[-1] == WORD_BOUNDARY:
        units.pop()
    return units


# --------------------------------------------------------------------- the renderer


@register_detokenizer("espeak_units")
class EspeakUnitDetokenizer:
    """Phoneme units plus prosody controls, spoken by espeak-ng (see `UNITS`).

    A prosody unit may appear anywhere and applies from there on, to the end or until
    another unit of the same kind. Each change of prosody between phonemes starts a new
    espeak-ng utterance (espeak takes rate/pitch/volume per call), so a change in the
    middle of speech also brings a phrase break; prosody units before the first phoneme
    just set the starting values. Unset attributes are "normal". Clause breaks are
    pauses only: espeak's clause-final intonation at punctuation is not reproduced.

    Phonemes are spoken through espeak's `[[...]]` phoneme input, joined within a word
    by espeak's phoneme separator "|" (so that "a" then "I" is not read as the diphthong
    "aI"), with a space at each `<wb>`.
    """

    units: list[str]
    sample_rate: int

    def __init__(self, sample_rate: int = 16000, voice: str = "en-us") -> None:
        if int(sample_rate) <= 0:
            raise ValueError(f"EspeakUnitDetokenizer sample_rate={sample_rate} must be a positive number of Hz")
        self.units = list(UNITS)
        self.sample_rate = int(sample_rate)
        self.voice = voice
        self._ids = {u: k for k, u in enumerate(self.units)}
        self._prosody = {
            prosody_unit(attr, level): (attr, value)
            for attr, values in PROSODY_SETTINGS.items()
            for level, value in values.items()
        }

    # -- text -> units -------------------------------------------------------------
    def text_to_units(self, text: str, style: SpeechStyle | None = None) -> list[str]:
        """The units that speak `text` in `style`.

        Its 3 prosody units (rate, pitch, volume) come first, then the phoneme units with
        `<wb>` between words and `CLAUSE_PAUSE` between clauses. Phonemes espeak writes
        that are not in the inventory map to their `nearest_unit`, or are dropped when
        there is none; encoding never fails on a phoneme.
        """
        style = style or SpeechStyle()
        units = [prosody_unit(attr, getattr(style, attr)) for attr in STYLE_LEVELS]
        spoken = False
        for clause in _CLAUSE_BREAK.split(text):
            phonemes = phonemes_to_units(text_to_phonemes(clause)) if clause.strip() else []
            if phonemes:
                units += [WORD_BOUNDARY, *CLAUSE_PAUSE, WORD_BOUNDARY] if spoken else []
                units += phonemes
                spoken = True
        return units

    def encode(self, text: str, style: SpeechStyle | None = None) -> list[int]:
        """`text_to_units` as unit ids (the LM's audio token indices)."""
        return [self._ids[u] for u in self.text_to_units(text, style)]

    # -- units -> waveform ---------------------------------------------------------
    def render(self, unit_ids: Sequence[int], voice: str | None = None) -> Audio:
        """Speak `unit_ids` with espeak-ng voice `voice` (e.g. "en-us+f3"; None = `self.voice`).

        Returns a zero-length Audio when there is no phoneme to speak.
        """
        settings = {attr: values["normal"] for attr, values in PROSODY_SETTINGS.items()}
        pieces: list[np.ndarray] = []
        words: list[list[str]] = [[]]
        for unit in self._units_of(unit_ids):
            if unit in self._prosody:
                attr, value = self._prosody[unit]
                if value != settings[attr] and words[0]:
                    pieces.append(self._speak(words, settings, voice))
                    words = [[]]
                settings[attr] = value
            elif unit == WORD_BOUNDARY:
                if words[-1]:
                    words.append([])
            else:
                words[-1].append(unit)
        if words[0]:
            pieces.append(self._speak(words, settings, voice))
        waveform = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return Audio(np.clip(waveform, -1.0, 1.0).astype(np.float32, copy=False), self.sample_rate)

    def _units_of(self, unit_ids: Sequence[int]) -> list[str]:
        units = []
        for i in unit_ids:
            try:
                k = operator.index(i)
            except TypeError:
                raise ValueError(f"audio unit id {i!r} is not an integer; pass the detokenizer's unit ids") from None
            if not 0 <= k < len(self.units):
                raise ValueError(
                    f"audio unit id {k} is out of range: the espeak_units inventory has {len(self.units)} "
                    f"units (ids 0..{len(self.units) - 1}); check that the tokenizer was built for this detokenizer"
                )
            units.append(self.units[k])
        return units

    def _speak(self, words: list[list[str]], settings: dict[str, int], voice: str | None) -> np.ndarray:
        text = " ".join("|".join(w) for w in words if w)
        return synthesize(text, voice=voice or self.voice, sample_rate=self.sample_rate, phonemes=True, **settings)
