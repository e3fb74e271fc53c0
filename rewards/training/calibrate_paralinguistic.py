"""Calibrate and check the paralinguistic level thresholds on synthetic speech.

    python -m vocalign.rewards.training.calibrate_paralinguistic

Seeded; about a minute on one core. It

1. builds a calibration set: (a) the policy detokenizer's speech (voice en-us) of short
   number answers and sentences in all 27 rate x pitch x volume styles, and (b)
   perception-task speech (`data.synthetic.perception`, one attribute off normal per clip,
   settings jittered) by CALIBRATION_VOICES;
2. fits the duration model and the thresholds on it and prints them beside the constants
   in `rewards/paralinguistic.py` (which is what the reward uses);
3. evaluates the constants on held-out speech: other texts and seeds with white noise
   added at HELD_OUT_SNR_DB for (a), other voices (HELD_OUT_VOICES) for (b); prints the
   accuracy and a 3x3 confusion table per attribute, and the reward's throughput.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vocalign.data.synthetic import FEMALE_VOICES, MALE_VOICES, number_to_words, perception, sentence
from vocalign.data.types import STYLE_LEVELS, Message, Prompt, Rollout, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.rewards import paralinguistic as para
from vocalign.rewards import prosody

CALIBRATION_VOICES = FEMALE_VOICES[:3] + MALE_VOICES[:3]
HELD_OUT_VOICES = FEMALE_VOICES[3:] + MALE_VOICES[3:]
HELD_OUT_SNR_DB = 30.0
SAMPLE_RATE = 16000


@dataclass
class Clip:
    """A clip with the style it was spoken in."""

    waveform: np.ndarray
    text: str
    voice: str
    style: dict[str, str]


# ---------------------------------------------------------------------- the speech


def answer_texts(rng: np.random.Generator, count: int, exclude: set[str] = frozenset()) -> list[str]:
    """Short texts the demo policy speaks: one or two number words, 'the answer is N', a sentence."""
    makers = (
        lambda: number_to_words(int(rng.integers(0, 100))),
        lambda: f"{number_to_words(int(rng.integers(0, 20)))} {number_to_words(int(rng.integers(0, 20)))}",
        lambda: f"the answer is {number_to_words(int(rng.integers(0, 20)))}",
        lambda: sentence(rng),
    )
    texts: list[str] = []
    while len(texts) < count:
        text = makers[len(texts) % len(makers)]()
        if text not in exclude and text not in texts:
            texts.append(text)
    return texts


def detokenizer_clips(texts: Sequence[str], snr_db: float | None, seed: int) -> list[Clip]:
    """Every text in all 27 styles, as the policy's detokenizer renders them."""
    detok = EspeakUnitDetokenizer(sample_rate=SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    clips = []
    for text in texts:
        for levels in itertools.product(*STYLE_LEVELS.values()):
            style = dict(zip(STYLE_LEVELS, levels))
            wav = detok.render(detok.encode(text, SpeechStyle(**style))).waveform
            clips.append(Clip(add_noise(wav, snr_db, rng), text, detok.voice, style))
    return clips


def add_noise(wav: np.ndarray, snr_db: float | None, rng: np.random.Generator) -> np.ndarray:
    if snr_db is None or len(wav) == 0:
        return wav
    rms = float(np.sqrt(np.mean(wav**2)))
    return (wav + rng.normal(0.0, rms * 10 ** (-snr_db / 20), len(wav))).astype(np.float32)


def perception_clips(n: int, seed: int, voices: Sequence[str]) -> list[Clip]:
    """Perception-task clips; the attribute asked about has its label, the others are normal."""
    clips = []
    for prompt in perception(n, seed, attributes=("rate", "pitch", "volume"), voices=voices):
        style = {attr: "normal" for attr in STYLE_LEVELS}
        style[prompt.meta["attribute"]] = prompt.meta["label"]
        audio = prompt.messages[-1].audio
        clips.append(Clip(audio.waveform, prompt.meta["text"], prompt.meta["voice"], style))
    return clips


# ------------------------------------------------------------------- measurements


def features_of(clips: Sequence[Clip], with_text: bool = True) -> list[prosody.ProsodyFeatures]:
    out = []
    for clip in clips:
        baseline = para.voice_baseline(clip.voice)
        text = clip.text if with_text else None
        out.append(prosody.measure(clip.waveform, SAMPLE_RATE, text, f0_range=baseline.f0_range))
    return out


def fit_duration_model(clips: Sequence[Clip], features: Sequence[prosody.ProsodyFeatures]) -> dict[str, float]:
    """Least squares seconds ~ phoneme counts, on the neutral-rate clips."""
    keys = ("stressed", "unstressed", "consonant", "word")
    rows, seconds = [], []
    for clip, f in zip(clips, features):
        if clip.style["rate"] == "normal" and f.has_speech:
            counts = prosody.phoneme_counts(clip.text)
            rows.append([counts[k] for k in keys] + [1.0])
            seconds.append(f.seconds)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(seconds), rcond=None)
    return dict(zip((*keys, "constant"), (round(float(c), 3) for c in coef)))


def fit_threshold(below: np.ndarray, above: np.ndarray) -> float:
    """The cut between two classes with the fewest errors; the middle of the widest such gap."""
    values = np.unique(np.concatenate([below, above]))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    errors = np.array([(below >= c).sum() + (above < c).sum() for c in cuts])
    best = np.flatnonzero(errors == errors.min())
    # Among the best cuts, the longest run of consecutive ones, then its middle value.
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    run = max(runs, key=lambda r: values[min(r[-1], len(values) - 1)] - values[max(r[0] - 1, 0)])
    lo, hi = values[max(run[0] - 1, 0)], values[min(run[-1], len(values) - 1)]
    return round(float((lo + hi) / 2), 2)


def fit_thresholds(
    clips: Sequence[Clip], features: Sequence[prosody.ProsodyFeatures]
) -> dict[str, tuple[float, float]]:
    found = {}
    values = [para.relative_prosody(f, para.voice_baseline(c.voice)) for c, f in zip(clips, features)]
    for attribute, levels in STYLE_LEVELS.items():
        by_level = {
            level: np.array([v[attribute] for c, v in zip(clips, values) if attribute in v and c.style[attribute] == level])
            for level in levels
        }
        found[attribute] = (
            fit_threshold(by_level[levels[0]], by_level[levels[1]]),
            fit_threshold(by_level[levels[1]], by_level[levels[2]]),
        )
    return found


def confusion(clips: Sequence[Clip], features: Sequence[prosody.ProsodyFeatures], attribute: str) -> np.ndarray:
    """3x3 counts: rows the true level, columns the detected one (a 4th column: not measured)."""
    levels = STYLE_LEVELS[attribute]
    table = np.zeros((3, 4), dtype=int)
    for clip, f in zip(clips, features):
        detected = para.detect_style(f, para.voice_baseline(clip.voice)).get(attribute)
        table[levels.index(clip.style[attribute]), levels.index(detected) if detected else 3] += 1
    return table


def report(name: str, clips: Sequence[Clip], features: Sequence[prosody.ProsodyFeatures]) -> dict[str, float]:
    print(f"\n== {name}: {len(clips)} clips")
    accuracy = {}
    for attribute, levels in STYLE_LEVELS.items():
        table = confusion(clips, features, attribute)
        accuracy[attribute] = float(np.trace(table[:, :3]) / table.sum())
        print(f"{attribute}: accuracy {accuracy[attribute]:.3f}   (rows: true level, columns: detected)")
        print("  " + " " * 8 + "".join(f"{lvl:>8s}" for lvl in (*levels, "none")))
        for level, row in zip(levels, table):
            print("  " + f"{level:>8s}" + "".join(f"{n:8d}" for n in row))
    return accuracy


def throughput(clips: Sequence[Clip], n: int = 128) -> float:
    """Rollouts per second of the reward over `n` clips (one call, as a trainer makes it)."""
    rollouts = [
        Rollout(
            prompt=Prompt(id=f"p{i}", messages=[Message("human", "")], meta={"style": {"rate": c.style["rate"]}}),
            text="", think="", spoken_text=c.text, audio_tokens=[], waveform=c.waveform, sample_rate=SAMPLE_RATE,
            prompt_ids=[], response_ids=[], logprobs=[],
        )
        for i, c in enumerate(itertools.islice(itertools.cycle(clips), n))
    ]
    para.paralinguistic(rollouts[:2])  # baseline synthesis and first-call set-up are not per-step costs
    start = time.perf_counter()
    para.paralinguistic(rollouts)
    return n / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40, help="texts per detokenizer set (x27 styles)")
    parser.add_argument("--perception", type=int, default=360, help="perception clips per set")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)

    start = time.perf_counter()
    cal_texts = answer_texts(np.random.default_rng(0), args.texts)
    cal_a = detokenizer_clips(cal_texts, snr_db=None, seed=0)
    cal_b = perception_clips(args.perception, seed=0, voices=CALIBRATION_VOICES)
    cal = cal_a + cal_b
    cal_features = features_of(cal)
    print(f"calibration: {len(cal_a)} detokenizer clips ({len(cal_texts)} texts x 27 styles, en-us), "
          f"{len(cal_b)} perception clips (voices {', '.join(CALIBRATION_VOICES)})")
    print(f"duration model fitted on (a): {fit_duration_model(cal_a, cal_features[: len(cal_a)])}")
    print(f"                 in use     : {prosody.DURATION_MODEL}")
    fitted = fit_thresholds(cal, cal_features)
    in_use = {"rate": para.RATE_THRESHOLDS_LOG, "pitch": para.PITCH_THRESHOLDS_ST, "volume": para.VOLUME_THRESHOLDS_DB}
    for attribute in STYLE_LEVELS:
        print(f"{attribute} thresholds fitted: {fitted[attribute]}   in use: {in_use[attribute]}")
    envelope_fit = fit_thresholds(cal, features_of(cal, with_text=False))["rate"]
    print(f"rate thresholds without text (envelope) fitted: {envelope_fit}   in use: {para.ENVELOPE_RATE_THRESHOLDS_LOG}")
    report("calibration set (a)+(b)", cal, cal_features)

    held_texts = answer_texts(np.random.default_rng(1), args.texts, exclude=set(cal_texts))
    held_a = detokenizer_clips(held_texts, snr_db=HELD_OUT_SNR_DB, seed=1)
    held_b = perception_clips(args.perception, seed=1, voices=HELD_OUT_VOICES)
    results = {
        "a": report(f"HELD-OUT (a) detokenizer speech, en-us, {len(held_texts)} new texts x 27 styles, "
                    f"noise at {HELD_OUT_SNR_DB:.0f} dB SNR", held_a, features_of(held_a)),
        "b": report(f"HELD-OUT (b) perception speech, voices {', '.join(HELD_OUT_VOICES)}, voice known",
                    held_b, features_of(held_b)),
        "a_no_text": report("HELD-OUT (a) without the text (rate from the envelope)", held_a,
                            features_of(held_a, with_text=False)),
    }
    rate = throughput(held_a)
    mean_seconds = np.mean([c.waveform.size for c in held_a]) / SAMPLE_RATE
    print(f"\nreward throughput: {rate:.0f} rollouts/s (one thread, {mean_seconds:.2f} s mean clip)")
    print(f"total time {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
