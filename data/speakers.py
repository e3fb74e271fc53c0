"""Who speaks the synthetic tasks, and in what acoustic conditions.

Speakers are espeak-ng voices: an English language voice (an accent) plus a variant (a
timbre). Variants in `HELD_OUT_VARIANTS` are never used for training, by the tasks'
default voice pool or by the embedded recognizer, so an evaluation on the "heldout"
pool measures voices the project's models have not heard.

Voice pools (`voice_pool(name)`):
- "train": every accent of `ACCENTS` with the plain voice and every variant espeak-ng
  ships except the held-out ones (about 560 speakers);
- "heldout": every accent with the held-out variants only;
- "default": the 12 en-us variants the tasks used before the pools existed
  (`DEFAULT_VOICES`, whose genders are known: the perception task's gender questions).

Acoustic conditions (`Conditions`) are drawn per clip, on top of the speaker:
- prosody: rate, pitch and volume drawn from `PROSODY_RANGES[name]`. "train" covers
  slow to fast speech, low to high pitch and soft to loud; "wide" lies outside it
  (never trained on); "narrow" is the neutral band the tasks used to draw from;
- timbre warp: the waveform resampled by a factor in `WARP_RANGE` (shifting its pitch,
  formants and tempo together, as a shorter or longer vocal tract would), so that a
  model hears more timbres than espeak-ng's variants;
- noise: background noise (white, pink or brown) at a signal-to-noise ratio drawn from
  `NOISE_LEVELS[name]`, on a share of the clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vocalign.data.espeak import Voice, available_variants

# English language voices: the accents of the speaker pool.
ACCENTS = ("en-us", "en-us-nyc", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")

# About one variant in ten, whispered, robotic and two of DEFAULT_VOICES among them;
# never trained on (by the tasks' "train" pool or the embedded recognizer).
HELD_OUT_VARIANTS = ("Andy", "Lee", "anika", "belinda", "edward2", "f4", "iven3", "klatt4", "m6",
                     "robosoft3", "whisperf")

FEMALE_VOICES = ("f1", "f2", "f3", "f4", "f5")
MALE_VOICES = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
DEFAULT_VOICES = FEMALE_VOICES + MALE_VOICES
VOICE_GENDER = {**{v: "female" for v in FEMALE_VOICES}, **{v: "male" for v in MALE_VOICES}}

VOICE_POOLS = ("train", "heldout", "default")


def voice_pool(name: str) -> list[Voice]:
    """The speakers of a named pool (see the module docstring), in a fixed order."""
    if name == "default":
        return [Voice("en-us", v) for v in DEFAULT_VOICES]
    if name == "train":
        variants = [""] + [v for v in available_variants() if v not in HELD_OUT_VARIANTS]
    elif name == "heldout":
        variants = [v for v in HELD_OUT_VARIANTS if v in set(available_variants())]
    else:
        raise ValueError(f"voice pool {name!r} is not known; use one of {', '.join(VOICE_POOLS)}, or a list of voices")
    return [Voice(accent, v) for accent in ACCENTS for v in variants]


def resolve_voices(voices: str | Sequence[str | Voice]) -> list[Voice]:
    """Voice objects for `voices`: a pool name, or a list whose items are Voice objects,
    "lang+variant" specs ("en-gb+m3") or bare en-us variant names ("f3")."""
    if isinstance(voices, str):
        return voice_pool(voices)
    out = []
    for v in voices:
        if isinstance(v, Voice):
            out.append(v)
        elif "+" in v:
            name, _, variant = v.partition("+")
            out.append(Voice(name, variant))
        else:
            out.append(Voice("en-us", v))
    if not out:
        raise ValueError("voices is empty; give a pool name (train, heldout, default) or at least one espeak-ng variant")
    known = set(available_variants())
    unknown = [v.spec for v in out if v.variant and v.variant not in known]
    if unknown:
        raise ValueError(f"voices {unknown} are not espeak-ng variants; see vocalign.data.espeak.available_variants()")
    return out


# espeak-ng settings (words per minute, pitch 0-99, volume 0-200) that the prosody of a
# question is drawn from: one interval, or two (one is picked at random) for "wide".
PROSODY_RANGES: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {
    "narrow": {"rate": ((165, 185),), "pitch": ((46, 54),), "volume": ((92, 108),)},
    "train": {"rate": ((125, 245),), "pitch": ((15, 85),), "volume": ((50, 170),)},
    "wide": {"rate": ((108, 118), (260, 320)), "pitch": ((0, 8), (92, 99)), "volume": ((25, 40), (180, 200))},
}
# Timbre warp: resampling factors (> 1: higher and faster) and the share of clips warped.
WARP_RANGE = {"none": (1.0, 1.0), "train": (0.9, 1.1)}
# Noise: (share of clips, lowest SNR dB, highest SNR dB).
NOISE_LEVELS = {"none": (0.0, 0.0, 0.0), "train": (0.25, 20.0, 40.0), "heavy": (1.0, 0.0, 10.0)}
NOISE_COLOURS = ("white", "pink", "brown")


@dataclass(frozen=True)
class Conditions:
    """The acoustic conditions clips are drawn in (names of PROSODY_RANGES, WARP_RANGE, NOISE_LEVELS)."""

    prosody: str = "train"
    warp: str = "train"
    noise: str = "train"

    def __post_init__(self) -> None:
        for field, table in (("prosody", PROSODY_RANGES), ("warp", WARP_RANGE), ("noise", NOISE_LEVELS)):
            if getattr(self, field) not in table:
                raise ValueError(f"{field}={getattr(self, field)!r} is not known; use one of {', '.join(table)}")

    def draw_prosody(self, rng: np.random.Generator) -> dict[str, int]:
        """espeak-ng rate, pitch and volume for one clip."""
        out = {}
        for attribute, intervals in PROSODY_RANGES[self.prosody].items():
            lo, hi = intervals[int(rng.integers(len(intervals)))] if len(intervals) > 1 else intervals[0]
            out[attribute] = int(rng.integers(lo, hi + 1))
        return out

    def draw_warp(self, rng: np.random.Generator) -> float:
        lo, hi = WARP_RANGE[self.warp]
        return float(rng.uniform(lo, hi)) if hi > lo else 1.0

    def draw_noise(self, rng: np.random.Generator) -> tuple[str, float] | None:
        """(colour, SNR in dB) of the clip's background noise, or None for a clean clip."""
        share, lo, hi = NOISE_LEVELS[self.noise]
        if rng.random() >= share:
            return None
        return NOISE_COLOURS[int(rng.integers(len(NOISE_COLOURS)))], float(rng.uniform(lo, hi))


def add_noise(wav: np.ndarray, colour: str, snr_db: float, seed: int) -> np.ndarray:
    """`wav` plus `colour` noise at `snr_db` below the speech's power (its frames above -40 dB of the peak)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(len(wav))
    if colour == "white":
        noise = white
    else:  # shape the spectrum: power falls as 1/f (pink) or 1/f^2 (brown)
        spectrum = np.fft.rfft(white)
        f = np.maximum(np.arange(len(spectrum)), 1.0)
        spectrum /= np.sqrt(f) if colour == "pink" else f
        noise = np.fft.irfft(spectrum, n=len(wav))
    frames = wav[: len(wav) // 160 * 160].reshape(-1, 160)
    power = (frames**2).mean(axis=1) if len(frames) else np.array([np.mean(wav**2)])
    speech_power = power[power > power.max() * 1e-4].mean() if power.max() > 0 else 0.0
    noise *= np.sqrt(speech_power / (np.mean(noise**2) + 1e-20) / 10 ** (snr_db / 10))
    return (wav + noise).astype(np.float32)
