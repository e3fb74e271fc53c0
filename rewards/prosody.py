"""Prosody measured from a waveform: speech duration, F0, energy and speaking rate.

`measure(waveform, sample_rate, text)` -> `ProsodyFeatures`: active-speech duration, F0
(librosa `yin`, about 2 ms per second of audio; `pyin` took 190 ms, too slow for a
reward), frame energy and the speaking rate against the duration `expected_seconds`
predicts from the text's phonemes. `vocalign.rewards.paralinguistic` turns these into
style levels relative to a voice's neutral speech.

Units: F0 in Hz per clip; energy in dBFS (20 * log10 of the frame RMS, 0 dB = a
full-scale square wave); rate as the log of measured over expected duration
(`tempo_log`, 0 = the neutral speed of espeak-ng en-us).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import librosa
import numpy as np
from scipy.signal import find_peaks

from vocalign.data.espeak import resample, text_to_phonemes

ANALYSIS_RATE = 16000
_HOP = 160  # 10 ms frames
_RMS_FRAME = 512  # 32 ms energy window
_F0_FRAME = 1024  # 64 ms yin window: four periods of a 60 Hz voice
_PERIODICITY_WINDOW = 512  # samples correlated with themselves one period later

# Frames within TRIM_DB of the loudest frame (and above FLOOR_DB) are speech; silence
# before the first and after the last such frame is trimmed.
TRIM_DB = 35.0
FLOOR_DB = -70.0
# A frame is voiced when it is within VOICED_DB of the loudest frame and correlates with
# itself one yin period later above MIN_PERIODICITY. espeak-ng vowels score 0.9+, fast
# diphthongs ~0.6, fricatives are mostly 20-40 dB below the vowels.
VOICED_DB = 25.0
MIN_PERIODICITY = 0.5
# yin locks onto strong first formants (~400 Hz) of low-pitched vowels when the search
# range allows it, so the reward searches within a factor F0_SEARCH_FACTOR of the voice's
# neutral F0; frames more than F0_OUTLIER_ST from the clip's median are dropped.
F0_SEARCH_FACTOR = 2.2
DEFAULT_F0_RANGE = (45.0, 500.0)
F0_OUTLIER_ST = 8.0
# Syllables from the envelope alone: peaks of the smoothed frame energy at least
# PEAK_PROMINENCE_DB above their surroundings and PEAK_SPACING_S apart.
PEAK_PROMINENCE_DB = 5.0
PEAK_SPACING_S = 0.08
# Shorter than this, a clip has no measurable prosody.
MIN_SPEECH_S = 0.05

# Expected duration of neutral speech from the phonemes of its text: seconds per stressed
# vowel, unstressed vowel, consonant, word, plus a constant. Least squares on espeak-ng
# en-us at rate 175 (the calibration set of calibrate_paralinguistic: 40 number phrases and
# sentences, all pitch and volume levels); residual spread about 7 %.
DURATION_MODEL = {"stressed": 0.135, "unstressed": 0.045, "consonant": 0.050, "word": 0.031, "constant": 0.125}

_VOWEL_START = re.compile(r"^[',]?[aeiouAEIOUV03@]")


@dataclass(frozen=True)
class ProsodyFeatures:
    """What `measure` found in one clip. Pitch fields are None without voiced frames;
    everything but `seconds` is None for a clip with no speech.

    `f0_level_hz` is the geometric mean F0 of the voiced frames (the pitch level used by
    `detect_style`); `f0_p10_hz`/`f0_p90_hz` give its range. `level_db` is the 95th
    percentile of the active frames' RMS in dBFS (the loud, vowel part: less dependent on
    how many consonants a text has than the median, `energy_db`). `syllables` is counted
    from the text's phonemes (`syllables_from_text`) or estimated from energy peaks.
    """

    seconds: float  # active speech, silence trimmed at both ends
    f0_median_hz: float | None = None
    f0_level_hz: float | None = None
    f0_p10_hz: float | None = None
    f0_p90_hz: float | None = None
    energy_db: float | None = None
    level_db: float | None = None
    syllables: float | None = None
    syllables_from_text: bool = False
    expected_seconds: float | None = None  # neutral en-us duration of the text, None without text

    @property
    def has_speech(self) -> bool:
        return self.seconds >= MIN_SPEECH_S and self.energy_db is not None

    @property
    def f0_range_st(self) -> float | None:
        """10th-90th percentile F0 range in semitones."""
        if self.f0_p10_hz is None or self.f0_p90_hz is None:
            return None
        return 12.0 * math.log2(self.f0_p90_hz / self.f0_p10_hz)

    @property
    def syllables_per_second(self) -> float | None:
        if not self.has_speech or not self.syllables:
            return None
        return self.syllables / self.seconds

    @property
    def tempo_log(self) -> float | None:
        """log(measured / expected duration): > 0 is slower than neutral en-us, None without text."""
        if not self.has_speech or not self.expected_seconds:
            return None
        return math.log(self.seconds / self.expected_seconds)


def measure(
    waveform: np.ndarray | None,
    sample_rate: int,
    text: str | None = None,
    *,
    f0_range: tuple[float, float] = DEFAULT_F0_RANGE,
) -> ProsodyFeatures:
    """The prosody of one mono clip; `text` (what is said) makes the rate exact.

    Never raises on empty, silent or very short audio: it returns features with
    `has_speech` False.
    """
    if waveform is None or len(waveform) == 0:
        return ProsodyFeatures(seconds=0.0)
    wav = resample(np.asarray(waveform, dtype=np.float32), int(sample_rate), ANALYSIS_RATE)
    frame_db = _frame_db(wav)
    active = (frame_db > frame_db.max() - TRIM_DB) & (frame_db > FLOOR_DB)
    if not active.any():
        return ProsodyFeatures(seconds=0.0)
    first, last = np.flatnonzero(active)[[0, -1]]
    seconds = (last - first + 1) * _HOP / ANALYSIS_RATE
    if seconds < MIN_SPEECH_S:
        return ProsodyFeatures(seconds=seconds)
    f0 = _voiced_f0(wav, frame_db, f0_range)
    speech_db = frame_db[first : last + 1][active[first : last + 1]]
    syllables, from_text = _syllables(text, frame_db[first : last + 1])
    log_f0 = np.log2(f0) if len(f0) else None
    return ProsodyFeatures(
        seconds=seconds,
        f0_median_hz=float(np.median(f0)) if len(f0) else None,
        f0_level_hz=float(2.0 ** log_f0.mean()) if log_f0 is not None else None,
        f0_p10_hz=float(np.percentile(f0, 10)) if len(f0) else None,
        f0_p90_hz=float(np.percentile(f0, 90)) if len(f0) else None,
        energy_db=float(np.median(speech_db)),
        level_db=float(np.percentile(speech_db, 95)),
        syllables=syllables,
        syllables_from_text=from_text,
        expected_seconds=expected_seconds(text) if text and text.strip() else None,
    )


def _frames(wav: np.ndarray, length: int) -> np.ndarray:
    """(frames, length) windows centred on every hop, as librosa centres yin's."""
    padded = np.pad(wav, (length // 2, length // 2))
    return librosa.util.frame(padded, frame_length=length, hop_length=_HOP, axis=0)


def _frame_db(wav: np.ndarray) -> np.ndarray:
    rms = np.sqrt(np.mean(_frames(wav, _RMS_FRAME) ** 2, axis=1))
    return 20.0 * np.log10(rms + 1e-10)


def _voiced_f0(wav: np.ndarray, frame_db: np.ndarray, f0_range: tuple[float, float]) -> np.ndarray:
    """F0 (Hz) of the voiced frames: yin, kept where the frame is periodic at yin's period."""
    fmin, fmax = f0_range
    if len(wav) < _F0_FRAME:
        wav = np.pad(wav, (0, _F0_FRAME - len(wav)))
    f0 = librosa.yin(wav, fmin=fmin, fmax=fmax, sr=ANALYSIS_RATE, frame_length=_F0_FRAME, hop_length=_HOP)
    windows = _frames(wav, _F0_FRAME)
    n = min(len(f0), len(windows), len(frame_db))
    f0, windows = f0[:n], windows[:n]
    # Correlate a window centred on the frame with the same window one period later.
    period = np.clip(np.round(ANALYSIS_RATE / f0).astype(int), 1, _F0_FRAME - _PERIODICITY_WINDOW - 1)
    start = np.clip(_F0_FRAME // 2 - _PERIODICITY_WINDOW // 2 - period // 2, 0, None)
    cols = start[:, None] + np.arange(_PERIODICITY_WINDOW)[None, :]
    rows = np.arange(n)[:, None]
    a, b = windows[rows, cols], windows[rows, cols + period[:, None]]
    periodicity = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)
    loud = (frame_db[:n] > frame_db.max() - VOICED_DB) & (frame_db[:n] > FLOOR_DB)
    voiced = f0[loud & (periodicity > MIN_PERIODICITY)]
    if len(voiced) == 0:
        return voiced
    semitones = 12.0 * np.log2(voiced / np.median(voiced))
    return voiced[np.abs(semitones) < F0_OUTLIER_ST]


def _syllables(text: str | None, speech_db: np.ndarray) -> tuple[float, bool]:
    if text and text.strip():
        counts = phoneme_counts(text)
        if counts["stressed"] + counts["unstressed"]:
            return float(counts["stressed"] + counts["unstressed"]), True
    smooth = np.convolve(speech_db, np.ones(5) / 5, mode="same")  # 50 ms
    peaks, _ = find_peaks(
        smooth, prominence=PEAK_PROMINENCE_DB, distance=max(1, round(PEAK_SPACING_S * ANALYSIS_RATE / _HOP))
    )
    return float(max(1, len(peaks))), False


@lru_cache(maxsize=4096)
def phoneme_counts(text: str) -> dict[str, int]:
    """Stressed vowels, unstressed vowels, consonants and words in espeak-ng's phonemes of `text`."""
    counts = {"stressed": 0, "unstressed": 0, "consonant": 0, "word": 0}
    phonemes = text_to_phonemes(text)
    for p in phonemes:
        if p == " " or not re.search(r"[A-Za-z0-9@]", p):
            continue
        if _VOWEL_START.match(p):
            counts["stressed" if p[0] in "'," else "unstressed"] += 1
        else:
            counts["consonant"] += 1
    counts["word"] = phonemes.count(" ") + 1 if phonemes else 0
    return counts


def expected_seconds(text: str) -> float:
    """How long espeak-ng en-us takes to say `text` at its neutral rate (DURATION_MODEL)."""
    counts = phoneme_counts(text)
    return DURATION_MODEL["constant"] + sum(DURATION_MODEL[k] * counts[k] for k in counts)
