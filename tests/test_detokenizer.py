"""The speech detokenizer: units from text, espeak-ng audio from units, the registry.

Every test renders real espeak-ng speech; prosody is checked by measuring it (duration,
median F0 with librosa's pyin, RMS). Run with `-s` to see the measured numbers.
"""

from __future__ import annotations

import hashlib

import librosa
import numpy as np
import pytest

from vocalign.data.espeak import synthesize, text_to_phonemes
from vocalign.data.types import STYLE_LEVELS, Audio, SpeechStyle
from vocalign.model.detokenizer import (
    CLAUSE_PAUSE,
    PROSODY_SETTINGS,
    UNITS,
    WORD_BOUNDARY,
    EspeakUnitDetokenizer,
    SpeechDetokenizer,
    available_detokenizers,
    build_detokenizer,
    nearest_unit,
    phonemes_to_units,
    register_detokenizer,
)

SENTENCE = "the answer is seven"

# Sentences in the style of the synthetic tasks, plus a few with punctuation.
TEST_SENTENCES = [
    SENTENCE,
    "what is five plus three",
    "what is twelve minus four, answer slowly and in a high voice",
    "the train leaves at nine forty five",
    "i can see twelve horses on the roof",
    "please paint the chair yellow",
    "is the voice female or male?",
    "transcribe the audio",
    "she said: \"yes\". we meet again on thursday",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="module")
def detok() -> EspeakUnitDetokenizer:
    return EspeakUnitDetokenizer()


def speak(detok: EspeakUnitDetokenizer, text: str, **style: str) -> Audio:
    return detok.render(detok.encode(text, SpeechStyle(**style)))


def median_f0(audio: Audio) -> float:
    f0, voiced, _ = librosa.pyin(audio.waveform, fmin=50, fmax=500, sr=audio.sample_rate, frame_length=1024)
    return float(np.nanmedian(f0[voiced]))


def rms(audio: Audio) -> float:
    return float(np.sqrt(np.mean(audio.waveform**2)))


# ------------------------------------------------------------- text -> units -> audio


def test_round_trip_matches_direct_synthesis(detok):
    units = detok.text_to_units(SENTENCE)
    assert units[:3] == ["<rate_normal>", "<pitch_normal>", "<volume_normal>"]
    assert units.count(WORD_BOUNDARY) == len(SENTENCE.split()) - 1
    for text in TEST_SENTENCES[:6]:
        audio = detok.render(detok.encode(text))
        direct = synthesize(text, sample_rate=16000)
        direct_s = len(direct) / 16000
        print(f"\n{text!r}: units {audio.seconds:.3f} s, direct {direct_s:.3f} s")
        assert audio.sample_rate == 16000 and audio.waveform.dtype == np.float32
        assert 0.15 < audio.seconds / len(text.split()) < 0.6
        assert abs(audio.seconds - direct_s) < 0.05 * direct_s
        # the same speech, not just the same length: loudness agrees too
        assert abs(rms(audio) - float(np.sqrt(np.mean(direct**2)))) < 0.1 * rms(audio)


def test_clause_punctuation_becomes_a_pause(detok):
    units = detok.text_to_units("seven, eight")
    pause = [WORD_BOUNDARY, *CLAUSE_PAUSE, WORD_BOUNDARY]
    assert units == detok.text_to_units("seven") + pause + detok.text_to_units("eight")[3:]
    assert detok.text_to_units("seven eight.") == detok.text_to_units("seven eight")
    with_comma, without = detok.render(detok.encode("seven, eight")), detok.render(detok.encode("seven eight"))
    direct = len(synthesize("seven, eight")) / 16000
    print(
        f"\n'seven, eight': units {with_comma.seconds:.3f} s, direct {direct:.3f} s, "
        f"no comma {without.seconds:.3f} s"
    )
    assert with_comma.seconds > without.seconds + 0.15
    assert abs(with_comma.seconds - direct) < 0.05 * direct


def test_render_at_other_sample_rate_and_voice():
    detok = EspeakUnitDetokenizer(sample_rate=22050)
    ids = detok.encode(SENTENCE)
    male, female = detok.render(ids), detok.render(ids, voice="en-us+f3")
    f0_male, f0_female = median_f0(male), median_f0(female)
    print(f"\nvoice en-us: {male.seconds:.3f} s F0 {f0_male:.0f} Hz; en-us+f3: F0 {f0_female:.0f} Hz")
    assert male.sample_rate == 22050
    assert abs(male.seconds - len(synthesize(SENTENCE, sample_rate=22050)) / 22050) < 0.05
    assert f0_female > 1.3 * f0_male
    with pytest.raises(ValueError, match="no-such-voice"):
        detok.render(ids, voice="no-such-voice")


def test_pitch_units_change_f0(detok):
    f0 = {level: median_f0(speak(detok, SENTENCE, pitch=level)) for level in STYLE_LEVELS["pitch"]}
    print(f"\nmedian F0 (Hz): {', '.join(f'{k} {v:.1f}' for k, v in f0.items())}")
    assert f0["low"] * 1.1 < f0["normal"] < f0["high"] / 1.25
    assert f0["high"] > 1.5 * f0["low"]


def test_rate_units_change_duration(detok):
    secs = {level: speak(detok, SENTENCE, rate=level).seconds for level in STYLE_LEVELS["rate"]}
    print(f"\nduration (s): {', '.join(f'{k} {v:.3f}' for k, v in secs.items())}")
    assert secs["slow"] > 1.25 * secs["normal"] > 1.25**2 * secs["fast"]
    assert secs["slow"] > 1.7 * secs["fast"]


def test_volume_units_change_rms(detok):
    level_rms = {level: rms(speak(detok, SENTENCE, volume=level)) for level in STYLE_LEVELS["volume"]}
    print(f"\nRMS: {', '.join(f'{k} {v:.4f}' for k, v in level_rms.items())}")
    assert level_rms["loud"] > 1.5 * level_rms["normal"] > 1.5**2 * level_rms["soft"]
    assert level_rms["loud"] > 4 * level_rms["soft"]


def test_prosody_unit_applies_from_where_it_appears(detok):
    first, second = detok.encode("seven eight"), detok.encode("nine ten")
    ids = {u: k for k, u in enumerate(detok.units)}
    low = [ids["<pitch_low>"]] + first[3:]
    high = [ids["<pitch_high>"]] + second[3:]
    mixed = detok.render(low + high + [ids["<pitch_low>"]])  # a trailing unit changes nothing
    part_low, part_high = detok.render(low), detok.render(high)
    split = len(part_low.waveform)
    head = Audio(mixed.waveform[:split], mixed.sample_rate)
    tail = Audio(mixed.waveform[split:], mixed.sample_rate)
    print(
        f"\nmid-utterance pitch change: {mixed.seconds:.3f} s "
        f"(pieces {part_low.seconds:.3f} + {part_high.seconds:.3f}); "
        f"F0 before {median_f0(head):.0f} Hz, after {median_f0(tail):.0f} Hz"
    )
    assert abs(mixed.seconds - part_low.seconds - part_high.seconds) < 0.02
    assert median_f0(tail) > 1.4 * median_f0(head)


def test_nothing_to_speak_gives_empty_audio(detok):
    for ids in ([], [0, 4, 8], [0, detok.units.index(WORD_BOUNDARY), 5]):
        audio = detok.render(ids)
        assert isinstance(audio, Audio) and audio.sample_rate == 16000
        assert audio.waveform.shape == (0,) and audio.waveform.dtype == np.float32
    assert detok.text_to_units("") == ["<rate_normal>", "<pitch_normal>", "<volume_normal>"]


def test_out_of_range_ids_are_rejected(detok):
    n = len(detok.units)
    for bad in (n, -1, 10_000):
        with pytest.raises(ValueError, match=rf"id {bad} is out of range.* {n} units"):
            detok.render(detok.encode(SENTENCE) + [bad])
    with pytest.raises(ValueError, match="not an integer"):
        detok.render([1.5])
    assert detok.render(np.array(detok.encode(SENTENCE), dtype=np.int64)).seconds > 0.5


# ---------------------------------------------------------------------- inventory


def test_inventory_is_fixed_and_has_no_duplicates():
    assert len(UNITS) == len(set(UNITS)) == 130
    expected_prosody = [f"<{attr}_{level}>" for attr, levels in STYLE_LEVELS.items() for level in levels]
    assert UNITS[:9] == expected_prosody and UNITS[9] == WORD_BOUNDARY
    assert {f"<{a}_{lv}>" for a, lvs in PROSODY_SETTINGS.items() for lv in lvs} == set(expected_prosody)
    # audio token ids of trained checkpoints depend on this exact order
    assert hashlib.sha256("\n".join(UNITS).encode()).hexdigest()[:12] == "242a6c03e28a"
    assert EspeakUnitDetokenizer().units == EspeakUnitDetokenizer(sample_rate=8000).units == UNITS


def test_espeak_phonemes_of_test_inputs_are_in_the_inventory(detok):
    texts = TEST_SENTENCES + [" ".join(str(n) for n in range(1001)), " ".join("abcdefghijklmnopqrstuvwxyz")]
    # what text_to_phonemes leaves of espeak's pauses "_:", "_|", "_!" (documented in phonemes_to_units)
    markers = {" ", ":", "|", "!"}
    for text in texts:
        raw = text_to_phonemes(text)
        missing = {p for p in raw if p not in UNITS and p not in markers and not p.startswith(":")}
        assert not missing, f"{text[:40]!r}: phonemes {missing} are not in the inventory"
        units = detok.text_to_units(text)
        assert set(units) <= set(UNITS)
        if not any(c in text for c in ",;:.!?"):  # punctuation adds pauses (tested above)
            assert units[3:] == phonemes_to_units(raw)


def test_unknown_phonemes_map_to_nearest_unit_or_are_dropped(detok):
    assert nearest_unit("'i:") == "'i:"
    assert nearest_unit(",aI3") == ",aI3"
    assert nearest_unit("'a:") == "'a"  # long a is not in en-us speech we collected: its short form
    assert nearest_unit("a#:") == "a#"
    assert nearest_unit("u") == "'u"  # only stressed "u" was seen
    assert nearest_unit("xyz") is None
    assert phonemes_to_units([" ", "h", "xyz", " ", " ", ":", "|", ":j", "'i:", " "]) == [
        "h", WORD_BOUNDARY, "_:", "_:", "j", "'i:"
    ]
    # odd spellings make espeak emit phonemes outside the inventory; encoding still works
    ids = detok.encode("aaaa tolkien alwaysinline")
    assert all(0 <= i < len(UNITS) for i in ids)
    assert detok.render(ids).seconds > 0.5


# ----------------------------------------------------------------------- registry


def test_registry_builds_by_name_and_names_the_known_ones():
    detok = build_detokenizer("espeak_units", sample_rate=24000, voice="en-us+m3")
    assert isinstance(detok, EspeakUnitDetokenizer) and isinstance(detok, SpeechDetokenizer)
    assert detok.sample_rate == 24000 and detok.voice == "en-us+m3"
    assert "espeak_units" in available_detokenizers()
    with pytest.raises(ValueError, match=r"'cosyvoice9' is not known; known: .*espeak_units"):
        build_detokenizer("cosyvoice9")
    with pytest.raises(ValueError, match="already registered"):
        register_detokenizer("espeak_units")(EspeakUnitDetokenizer)


@register_detokenizer("tests.tone")
class ToneDetokenizer:
    """A detokenizer of a different kind: unit k is a 50 ms tone at 200 + 100*k Hz."""

    units = ["tone0", "tone1", "tone2"]
    sample_rate = 8000

    def render(self, unit_ids, voice=None) -> Audio:
        t = np.arange(400) / self.sample_rate
        tones = [np.sin(2 * np.pi * (200 + 100 * k) * t) for k in unit_ids]
        return Audio(np.concatenate(tones).astype(np.float32) if tones else np.zeros(0, np.float32), 8000)


def test_a_registered_plugin_is_built_and_rendered_through_the_interface():
    detok: SpeechDetokenizer = build_detokenizer("tests.tone")
    audio = detok.render([2, 0])
    assert audio.seconds == pytest.approx(0.1)
    spectrum = np.abs(np.fft.rfft(audio.waveform[:400]))
    assert np.argmax(spectrum) * detok.sample_rate / 400 == pytest.approx(400)
