"""Speaker pools and acoustic conditions of the synthetic tasks (`vocalign.data.speakers`)."""

from __future__ import annotations

import numpy as np
import pytest

from vocalign.data.espeak import available_variants
from vocalign.data.render import draw_clip, render_clips
from vocalign.data.speakers import (
    ACCENTS,
    HELD_OUT_VARIANTS,
    NOISE_LEVELS,
    PROSODY_RANGES,
    Conditions,
    add_noise,
    resolve_voices,
    voice_pool,
)
from vocalign.data.tasks import make_task
from vocalign.rewards.training.ctc_asr import training_variants


def test_the_train_and_heldout_pools_never_share_a_variant() -> None:
    train, heldout = voice_pool("train"), voice_pool("heldout")
    assert len(train) > 500 and {v.name for v in train} == set(ACCENTS)
    assert {v.variant for v in heldout} == set(HELD_OUT_VARIANTS) & set(available_variants())
    assert not {v.variant for v in train} & {v.variant for v in heldout}
    # the embedded recognizer never trained on the held-out variants either
    assert not set(training_variants()) & set(HELD_OUT_VARIANTS)
    assert [v.spec for v in voice_pool("default")][:2] == ["en-us+f1", "en-us+f2"]


def test_voice_lists_and_errors() -> None:
    assert [v.spec for v in resolve_voices(["f3", "en-gb+m2"])] == ["en-us+f3", "en-gb+m2"]
    with pytest.raises(ValueError, match="voice pool 'everyone' is not known"):
        resolve_voices("everyone")
    with pytest.raises(ValueError, match=r"not espeak-ng variants"):
        resolve_voices(["nobody"])
    with pytest.raises(ValueError, match="prosody='quick' is not known"):
        Conditions(prosody="quick")


def test_wide_prosody_lies_outside_the_trained_ranges() -> None:
    rng = np.random.default_rng(0)
    train = PROSODY_RANGES["train"]
    for _ in range(200):
        drawn = Conditions(prosody="wide").draw_prosody(rng)
        for attribute, value in drawn.items():
            (lo, hi), = train[attribute]
            assert not lo <= value <= hi, (attribute, value)


def test_noise_is_added_at_the_drawn_snr() -> None:
    t = np.arange(16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for colour in ("white", "pink", "brown"):
        noisy = add_noise(speech, colour, 10.0, seed=1)
        snr = 10 * np.log10(np.mean(speech**2) / np.mean((noisy - speech) ** 2))
        assert snr == pytest.approx(10.0, abs=0.5)
    assert np.array_equal(add_noise(speech, "pink", 20.0, seed=3), add_noise(speech, "pink", 20.0, seed=3))
    share, lo, hi = NOISE_LEVELS["train"]
    drawn = [Conditions().draw_noise(np.random.default_rng(s)) for s in range(400)]
    noisy_share = np.mean([d is not None for d in drawn])
    assert abs(noisy_share - share) < 0.07 and all(lo <= d[1] <= hi for d in drawn if d)


def test_a_warp_makes_the_clip_shorter_and_higher() -> None:
    rng = np.random.default_rng(0)
    voices = voice_pool("default")[:1]
    plain = draw_clip(rng, "the red cup is on the table", voices, conditions=Conditions(prosody="narrow", warp="none", noise="none"))
    warped = type(plain)(**{**plain.__dict__, "warp": 1.1})
    a, b = render_clips([plain, warped], 16000)
    assert len(b) == pytest.approx(len(a) / 1.1, rel=0.01)


def test_tasks_take_the_pools_and_conditions_and_stay_reproducible() -> None:
    kwargs = dict(voices="heldout", prosody="wide", noise="heavy", min_operand=10, max_operand=12)
    first = make_task("arithmetic", 6, 5, **kwargs)
    again = make_task("arithmetic", 6, 5, **kwargs)
    for p, q in zip(first, again):
        assert np.array_equal(p.messages[-1].audio.waveform, q.messages[-1].audio.waveform)
        assert all(10 <= x <= 12 for x in p.meta["operands"])
    styled = make_task("arithmetic", 200, 1, styled=True, style_in="text", no_request=0.25)
    none = [p for p in styled if p.meta["style"] == {}]
    assert 30 <= len(none) <= 70 and all(p.messages[-1].content == "" for p in none)
    with pytest.raises(ValueError, match="need 0 <= min_operand <= max_operand"):
        make_task("arithmetic", 1, 0, min_operand=5, max_operand=2)
