"""Paralinguistic fidelity: does the speech have the requested rate, pitch and volume?

Three steps, each a small function:

1. `measure(waveform, sample_rate, text)` -> `ProsodyFeatures` (`vocalign.rewards.prosody`):
   active-speech duration, F0, frame energy and the speaking rate.
2. `voice_baseline(voice)` -> `VoiceBaseline`: the same features of the voice's neutral
   speech (espeak-ng at rate 175, pitch 50, volume 100), synthesized once per process.
   Levels are relative to it: a female voice's "low" is near a male voice's "high".
3. `detect_style(features, baseline)` -> {"rate": "slow", "pitch": "normal", ...}, with
   thresholds calibrated on synthetic speech (`python -m
   vocalign.rewards.training.calibrate_paralinguistic` measures them and the accuracy).

The `paralinguistic` reward scores each rollout's waveform against `meta["style"]`. With
`backend="classifier"` it scores instead with a `transformers` audio classifier's
probability of the label in `meta[label_key]` (an emotion, say; see `audio_classifier`).

Units: F0 in Hz per clip, compared in semitones (12 * log2 of a ratio); energy in dBFS
(20 * log10 of the frame RMS, 0 dB = a full-scale square wave); rate as the log of
measured over expected duration (`tempo_log`, 0 = the neutral speed of espeak-ng en-us).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vocalign.data.espeak import synthesize
from vocalign.data.types import STYLE_LEVELS, Rollout
from vocalign.rewards.prosody import ANALYSIS_RATE, F0_SEARCH_FACTOR, ProsodyFeatures, measure
from vocalign.rewards.registry import reward

# Level thresholds, relative to the voice's baseline, as (below -> first level, above ->
# last level). Calibrated with `python -m vocalign.rewards.training.calibrate_paralinguistic` on
# the policy detokenizer's speech (40 texts x 27 styles, voice en-us) and 360 perception-task
# clips of 6 voices (f1-f3, m1-m3); each threshold is the middle of the widest gap that
# makes the fewest errors between two adjacent levels. Held out (other texts, noise at
# 30 dB SNR; other voices) they give 96-100 % per attribute; see that module.
PITCH_THRESHOLDS_ST = (-2.67, 2.96)  # `f0_level_hz` vs the voice's, in semitones: low below, high above
VOLUME_THRESHOLDS_DB = (-4.86, 2.51)  # `level_db` vs the voice's, in dB: soft below, loud above
RATE_THRESHOLDS_LOG = (-0.20, 0.23)  # log speed vs the voice's, from the text's phonemes: slow below, fast above
# The same without text (syllables counted as energy peaks): far less reliable, ~64 % held out.
ENVELOPE_RATE_THRESHOLDS_LOG = (-0.08, 0.33)


# ------------------------------------------------------------------ voice baselines

# What a voice's neutral speech is measured on: short number answers (as the demo's
# policy speaks them) and sentences, so the baseline sits between their intonations.
BASELINE_TEXTS = (
    "seven",
    "fourteen",
    "twenty one",
    "eighteen twelve",
    "the answer is seven",
    "what is five plus three",
    "i can see twelve horses on the roof",
    "the train leaves at nine fifteen",
)
NEUTRAL_SETTINGS = {"rate": 175, "pitch": 50, "volume": 100}  # espeak-ng's defaults


@dataclass(frozen=True)
class VoiceBaseline:
    """A voice's neutral prosody: the medians of its features over BASELINE_TEXTS."""

    voice: str
    f0_hz: float
    level_db: float
    tempo_log: float
    syllables_per_second: float  # from the envelope alone, for clips without text

    @property
    def f0_range(self) -> tuple[float, float]:
        """The F0 search range for this voice's speech (see F0_SEARCH_FACTOR)."""
        return self.f0_hz / F0_SEARCH_FACTOR, self.f0_hz * F0_SEARCH_FACTOR


@lru_cache(maxsize=64)
def voice_baseline(voice: str = "en-us") -> VoiceBaseline:
    """The neutral prosody of espeak-ng voice `voice` ("en-us", "en-us+f3"), synthesized
    and measured once per process (about 0.1 s)."""
    clips = [synthesize(text, voice, sample_rate=ANALYSIS_RATE, **NEUTRAL_SETTINGS) for text in BASELINE_TEXTS]
    rough = [measure(wav, ANALYSIS_RATE, text) for wav, text in zip(clips, BASELINE_TEXTS)]
    f0_rough = float(np.median([f.f0_level_hz for f in rough if f.f0_level_hz]))
    search = (f0_rough / F0_SEARCH_FACTOR, f0_rough * F0_SEARCH_FACTOR)
    features = [measure(wav, ANALYSIS_RATE, text, f0_range=search) for wav, text in zip(clips, BASELINE_TEXTS)]
    envelope = [measure(wav, ANALYSIS_RATE, f0_range=search) for wav in clips]
    return VoiceBaseline(
        voice=voice,
        f0_hz=float(2.0 ** np.median([math.log2(f.f0_level_hz) for f in features if f.f0_level_hz])),
        level_db=float(np.median([f.level_db for f in features])),
        tempo_log=float(np.median([f.tempo_log for f in features])),
        syllables_per_second=float(np.median([f.syllables_per_second for f in envelope])),
    )


# -------------------------------------------------------------------- style levels

_THRESHOLDS = {"pitch": PITCH_THRESHOLDS_ST, "volume": VOLUME_THRESHOLDS_DB}
# Graded scores fall by a factor e per this distance outside the requested level's band.
GRADE_SCALE = {"rate": 0.15, "pitch": 2.0, "volume": 2.0}


@lru_cache(maxsize=8192)
def text_reference(voice: str, text: str) -> ProsodyFeatures:
    """The features of `text` said by `voice` in neutral speech (NEUTRAL_SETTINGS), synthesized once per text.

    Pitch and loudness depend on the words as well as the voice: a lone number word has
    about 2.5 semitones less F0 than the sentences of a voice's baseline (its intonation
    falls), so on short answers a neutral pitch sat on the low threshold (16% of neutral
    number answers 0-18 were called "low"). Compared with the same words said neutrally,
    it sits at 0.
    """
    baseline = voice_baseline(voice)
    wav = synthesize(text, voice, sample_rate=ANALYSIS_RATE, **NEUTRAL_SETTINGS)
    return measure(wav, ANALYSIS_RATE, text, f0_range=baseline.f0_range)


def relative_prosody(
    features: ProsodyFeatures, baseline: VoiceBaseline, reference: ProsodyFeatures | None = None
) -> dict[str, float]:
    """Each measurable attribute on its axis relative to the voice, in STYLE_LEVELS order
    (larger = the last level): pitch in semitones, volume in dB, rate as a log speed ratio
    (> 0 = faster than the voice's neutral speech).

    With `reference` (the same words said neutrally, `text_reference`), pitch and volume
    are relative to it rather than to the voice's average over its baseline texts.
    """
    if not features.has_speech:
        return {}
    out: dict[str, float] = {}
    if features.tempo_log is not None:
        out["rate"] = baseline.tempo_log - features.tempo_log
    elif features.syllables_per_second:
        out["rate"] = math.log(features.syllables_per_second / baseline.syllables_per_second)
    if features.f0_level_hz is not None:
        f0 = reference.f0_level_hz if reference is not None and reference.f0_level_hz else baseline.f0_hz
        out["pitch"] = 12.0 * math.log2(features.f0_level_hz / f0)
    if features.level_db is not None:
        level = reference.level_db if reference is not None and reference.level_db is not None else baseline.level_db
        out["volume"] = features.level_db - level
    return out


def level_thresholds(attribute: str, from_text: bool = True) -> tuple[float, float]:
    """(below -> first level, above -> last level) on `relative_prosody`'s axis."""
    if attribute == "rate":
        return RATE_THRESHOLDS_LOG if from_text else ENVELOPE_RATE_THRESHOLDS_LOG
    return _THRESHOLDS[attribute]


def detect_style(
    features: ProsodyFeatures, baseline: VoiceBaseline, reference: ProsodyFeatures | None = None
) -> dict[str, str]:
    """The level of each attribute that can be measured ({"rate": "slow", ...}); an
    attribute that cannot (pitch without voiced frames) is left out. `reference`: see
    `relative_prosody`."""
    style = {}
    for attribute, value in relative_prosody(features, baseline, reference).items():
        low, high = level_thresholds(attribute, features.syllables_from_text)
        levels = STYLE_LEVELS[attribute]
        style[attribute] = levels[0] if value < low else levels[2] if value > high else levels[1]
    return style


def analyse(
    waveform: np.ndarray, sample_rate: int, text: str | None, voice: str
) -> tuple[dict[str, float], dict[str, str], bool]:
    """A clip's prosody against `voice`'s neutral speech: (`relative_prosody`, `detect_style`,
    whether the rate came from `text`). With `text` (the words said), pitch and volume are
    measured against those words said neutrally (`text_reference`)."""
    baseline = voice_baseline(voice)
    features = measure(waveform, sample_rate, text, f0_range=baseline.f0_range)
    reference = text_reference(voice, text) if text else None
    return (relative_prosody(features, baseline, reference), detect_style(features, baseline, reference),
            features.syllables_from_text)


def level_score(attribute: str, value: float, level: str, from_text: bool = True) -> float:
    """1.0 inside `level`'s band, falling as exp(-distance / GRADE_SCALE) outside it."""
    low, high = level_thresholds(attribute, from_text)
    band = dict(zip(STYLE_LEVELS[attribute], ((-math.inf, low), (low, high), (high, math.inf))))[level]
    distance = max(band[0] - value, value - band[1], 0.0)
    return math.exp(-distance / GRADE_SCALE[attribute])


# ------------------------------------------------------------------------ the reward

BACKENDS = ("acoustic", "classifier")
# What text the speaking rate is measured against (see `paralinguistic`).
RATE_TEXTS = ("transcript", "spoken_text", "none")
# What the attributes a prompt does not request are scored on (see `paralinguistic`).
UNREQUESTED = ("ignore", "normal")


@reward("paralinguistic")
def paralinguistic(
    rollouts: list[Rollout],
    *,
    backend: str = "acoustic",
    style_key: str = "style",
    voice: str = "en-us",
    voice_key: str | None = None,
    graded: bool = False,
    classifier_path: str | None = None,
    label_key: str = "emotion",
    classifier_score: str = "probability",
    rate_text: str = "transcript",
    asr: str = "embedded",
    unrequested: str = "ignore",
    unrequested_weight: float = 0.5,
) -> list[float | None]:
    """Fraction of the requested style attributes (meta[style_key]) the speech has; None without a request.

    acoustic (default): meta[style_key] is {attribute: level}, e.g. {"rate": "slow"};
    levels are measured relative to the speaking voice's neutral speech: `voice` (the
    policy detokenizer's espeak voice), or meta[voice_key] when set and present. The
    rate compares the speech's duration with the duration of the words said, taken from
    `rate_text`: "transcript" (what the `asr` recognizer hears in the waveform, one
    batched call), "spoken_text" (the text the policy wrote beside its audio tokens: a
    policy can game it by speaking fewer or more sounds than it writes) or "none"
    (energy peaks alone, less accurate). `graded` gives partial credit near the
    requested level. A response without speech scores 0.0.
    classifier: the probability (or, with classifier_score="argmax", 1.0 for the top
    label) that a transformers audio classifier at `classifier_path` gives meta[label_key].
    """
    if backend == "classifier":
        return _classifier_scores(rollouts, classifier_path, label_key, classifier_score)
    if backend != "acoustic":
        raise ValueError(f"paralinguistic: backend={backend!r} is not known; use one of {', '.join(BACKENDS)}")
    if rate_text not in RATE_TEXTS:
        raise ValueError(f"paralinguistic: rate_text={rate_text!r} is not known; use one of {', '.join(RATE_TEXTS)}")
    if unrequested not in UNREQUESTED:
        raise ValueError(f"paralinguistic: unrequested={unrequested!r} is not known; use one of {', '.join(UNREQUESTED)}")
    if not unrequested_weight >= 0:
        raise ValueError(f"paralinguistic: unrequested_weight={unrequested_weight!r} must be >= 0")
    expected = [_expected_style(r, style_key, unrequested, unrequested_weight) for r in rollouts]
    texts = _rate_texts(rollouts, expected, rate_text, asr)
    return [_acoustic_score(r, text, want, voice, voice_key, graded) for r, text, want in zip(rollouts, texts, expected)]


def _expected_style(
    rollout: Rollout, style_key: str, unrequested: str, unrequested_weight: float
) -> dict[str, tuple[str, float]] | None:
    """{attribute: (level, weight)} the speech is scored on; None for a prompt without meta[style_key].

    The requested attributes weigh 1. With unrequested="normal", every other attribute is
    expected at its neutral level with `unrequested_weight` (a prompt whose meta holds an
    empty request, {}, then asks for neutral speech).
    """
    requested = rollout.meta.get(style_key)
    if requested is None:
        return None
    _check_style(requested, rollout, style_key)
    want = {attribute: (level, 1.0) for attribute, level in requested.items()}
    if unrequested == "normal" and unrequested_weight > 0:
        for attribute in STYLE_LEVELS:
            want.setdefault(attribute, ("normal", unrequested_weight))
    return want or None


def _rate_texts(
    rollouts: Sequence[Rollout], expected: Sequence[dict | None], rate_text: str, asr: str
) -> list[str | None]:
    """The words each rollout said, for its rate; transcribed only where a rate is scored."""
    if rate_text == "none":
        return [None] * len(rollouts)
    if rate_text == "spoken_text":
        return [r.spoken_text.strip() or None for r in rollouts]
    from vocalign.rewards.asr import transcribe_rollouts

    heard = transcribe_rollouts(rollouts, asr, only=[i for i, want in enumerate(expected) if want and "rate" in want])
    return [text.strip() or None if text is not None else None for text in heard]


def _acoustic_score(
    rollout: Rollout, text: str | None, expected: dict[str, tuple[str, float]] | None, voice: str,
    voice_key: str | None, graded: bool,
) -> float | None:
    if not expected:
        return None
    if rollout.waveform is None or len(rollout.waveform) == 0:
        return 0.0
    speaker = rollout.meta.get(voice_key) if voice_key else None
    values, detected, from_text = analyse(rollout.waveform, rollout.sample_rate, text, speaker or voice)
    score = total = 0.0
    for attribute, (level, weight) in expected.items():
        if attribute not in values:
            match = 0.0  # silence, or no voiced frame to take a pitch from
        elif graded:
            match = level_score(attribute, values[attribute], level, from_text)
        else:
            match = 1.0 if detected[attribute] == level else 0.0
        score, total = score + weight * match, total + weight
    return score / total


def _check_style(requested: object, rollout: Rollout, style_key: str) -> None:
    where = f"paralinguistic: prompt {rollout.prompt.id!r} meta[{style_key!r}]={requested!r}"
    if not isinstance(requested, dict):
        raise ValueError(f"{where} must be a dict {{attribute: level}}, e.g. {{'rate': 'slow'}}")
    for attribute, level in requested.items():
        if attribute not in STYLE_LEVELS:
            raise ValueError(f"{where}: attribute {attribute!r} is not known; use {', '.join(STYLE_LEVELS)}")
        if level not in STYLE_LEVELS[attribute]:
            raise ValueError(
                f"{where}: {attribute} level {level!r} is not known; use {', '.join(STYLE_LEVELS[attribute])}"
            )


def _classifier_scores(
    rollouts: Sequence[Rollout], classifier_path: str | None, label_key: str, classifier_score: str
) -> list[float | None]:
    if not classifier_path:
        raise ValueError(
            "paralinguistic: backend='classifier' needs classifier_path, a transformers audio-classification "
            "model folder or hub id (AutoModelForAudioClassification + AutoFeatureExtractor)"
        )
    from vocalign.rewards.audio_classifier import SCORE_MODES, load_classifier

    if classifier_score not in SCORE_MODES:
        raise ValueError(
            f"paralinguistic: classifier_score={classifier_score!r} is not known; use one of {', '.join(SCORE_MODES)}"
        )
    classifier = load_classifier(classifier_path)
    scores: list[float | None] = [None] * len(rollouts)
    heard: list[int] = []
    for i, rollout in enumerate(rollouts):
        label = rollout.meta.get(label_key)
        if label is None:
            continue
        classifier.label_index(label)  # an unknown label fails before any audio is classified
        if rollout.waveform is None or len(rollout.waveform) == 0:
            scores[i] = 0.0
        else:
            heard.append(i)
    if heard:
        found = classifier.label_scores(
            [rollouts[i].waveform for i in heard],
            [rollouts[i].sample_rate for i in heard],
            [rollouts[i].meta[label_key] for i in heard],
            mode=classifier_score,
        )
        for i, value in zip(heard, found):
            scores[i] = value
    return scores
