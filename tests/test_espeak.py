"""The espeak-ng wrapper: voices, prosody settings, resampling and calls from many threads."""

from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import pytest

from vocalign.data.espeak import ESPEAK_RATE_HZ, available_variants, engine, synthesize, text_to_phonemes

TEXT = "what is three plus four"


def _f0(wave: np.ndarray, rate: int) -> float:
    f0, voiced, _ = librosa.pyin(wave, fmin=50, fmax=400, sr=rate, frame_length=1024)
    return float(np.nanmedian(f0[voiced]))


def test_output_is_resampled_from_espeaks_rate():
    assert engine().sample_rate == ESPEAK_RATE_HZ == 22050
    native = synthesize(TEXT, sample_rate=22050)
    at_16k = synthesize(TEXT, sample_rate=16000)
    # same duration, different sample counts (espeak's jitter moves the length by a few ms)
    assert abs(len(native) / 22050 - len(at_16k) / 16000) < 0.05
    assert 0.8 < len(at_16k) / 16000 < 3.0
    assert at_16k.dtype == np.float32 and np.isfinite(at_16k).all() and np.abs(at_16k).max() <= 1.0


def test_rate_pitch_volume_and_voice_change_the_speech():
    slow, fast = synthesize(TEXT, rate=120), synthesize(TEXT, rate=260)
    assert len(slow) > 1.6 * len(fast)
    low, high = synthesize(TEXT, pitch=20), synthesize(TEXT, pitch=90)
    assert _f0(high, 16000) > 1.3 * _f0(low, 16000)
    soft, loud = synthesize(TEXT, volume=30), synthesize(TEXT, volume=190)
    assert np.sqrt(np.mean(loud**2)) > 3 * np.sqrt(np.mean(soft**2))
    assert _f0(synthesize(TEXT, "en-us+f3"), 16000) > 1.4 * _f0(synthesize(TEXT, "en-us+m3"), 16000)
    assert {"f3", "m3", "whisper"} <= set(available_variants())


def test_calls_from_many_threads_are_serialised_and_complete():
    texts = [f"what is {w} plus two" for w in ("one", "three", "five", "seven", "nine", "eleven")] * 4
    alone = {t: len(synthesize(t)) / 16000 for t in set(texts)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        waves = list(pool.map(lambda t: synthesize(t, "en-us+f2"), texts))
    for text, wave in zip(texts, waves):
        assert abs(len(wave) / 16000 - alone[text]) < 0.15, text  # no clip is cut short or mixed with another
        assert np.sqrt(np.mean(wave**2)) > 0.01


def test_phonemes_and_bad_input():
    phonemes = text_to_phonemes("seven")
    assert phonemes == ["s", "'E", "v", "@", "n"]
    with pytest.raises(ValueError, match="empty text"):
        synthesize("   ")
    with pytest.raises(ValueError, match="rate=10 is out of range"):
        synthesize(TEXT, rate=10)
    with pytest.raises(ValueError, match="voice 'en-us\\+nosuch' is not known"):
        synthesize(TEXT, "en-us+nosuch")
