"""The paralinguistic reward: features, levels and scores on real espeak-ng speech, and
the audio-classifier backend on a tiny random model saved to a temporary folder."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vocalign.data.espeak import synthesize
from vocalign.data.types import Message, Prompt, Rollout, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.rewards import paralinguistic as para
from vocalign.rewards import prosody
from vocalign.rewards.registry import get_reward

SR = 16000


@pytest.fixture(scope="module")
def detok() -> EspeakUnitDetokenizer:
    return EspeakUnitDetokenizer(sample_rate=SR)


def speak(detok: EspeakUnitDetokenizer, text: str, **style: str) -> np.ndarray:
    return detok.render(detok.encode(text, SpeechStyle(**style))).waveform


def rollout(waveform: np.ndarray | None, meta: dict, spoken_text: str = "", sample_rate: int = SR) -> Rollout:
    prompt = Prompt(id="p0", messages=[Message("human", "")], meta=meta)
    return Rollout(
        prompt=prompt, text="", think="", spoken_text=spoken_text, audio_tokens=[], waveform=waveform,
        sample_rate=sample_rate, prompt_ids=[], response_ids=[], logprobs=[],
    )


def detected(waveform: np.ndarray, text: str | None, voice: str = "en-us") -> dict[str, str]:
    baseline = para.voice_baseline(voice)
    return para.detect_style(prosody.measure(waveform, SR, text, f0_range=baseline.f0_range), baseline)


# --------------------------------------------------------------------- features


def test_sine_f0_is_measured_within_two_percent():
    t = np.arange(SR) / SR
    features = prosody.measure((0.3 * np.sin(2 * np.pi * 200.0 * t)).astype(np.float32), SR)
    assert features.has_speech
    assert features.f0_median_hz == pytest.approx(200.0, rel=0.02)
    assert features.f0_range_st < 0.5  # a steady tone has no pitch range


def test_sine_at_another_sample_rate_is_resampled_first():
    t = np.arange(22050) / 22050
    features = prosody.measure((0.3 * np.sin(2 * np.pi * 150.0 * t)).astype(np.float32), 22050)
    assert features.f0_median_hz == pytest.approx(150.0, rel=0.02)
    assert features.seconds == pytest.approx(1.0, abs=0.03)


def test_half_amplitude_is_six_db_quieter(detok):
    wav = speak(detok, "the answer is seven")
    full, half = prosody.measure(wav, SR), prosody.measure(0.5 * wav, SR)
    assert full.energy_db - half.energy_db == pytest.approx(20 * math.log10(2), abs=0.05)
    assert full.level_db - half.level_db == pytest.approx(20 * math.log10(2), abs=0.05)


def test_silence_is_trimmed_from_the_duration(detok):
    wav = speak(detok, "fourteen")
    padded = np.concatenate([np.zeros(SR // 2, np.float32), wav, np.zeros(SR, np.float32)])
    assert prosody.measure(padded, SR).seconds == pytest.approx(prosody.measure(wav, SR).seconds, abs=0.011)


@pytest.mark.parametrize(
    "waveform", [None, np.zeros(0, np.float32), np.zeros(SR, np.float32), np.ones(320, np.float32) * 0.1]
)
def test_empty_silent_and_very_short_clips_have_no_speech(waveform):
    features = prosody.measure(waveform, SR, "seven")
    assert not features.has_speech
    assert features.syllables_per_second is None and features.tempo_log is None
    assert para.relative_prosody(features, para.voice_baseline()) == {}


def test_phoneme_counts_of_seven():
    # espeak-ng en-us: s 'E v @ n -> one stressed vowel, one unstressed, three consonants
    assert prosody.phoneme_counts("seven") == {"stressed": 1, "unstressed": 1, "consonant": 3, "word": 1}
    expected = 0.125 + 0.135 + 0.045 + 3 * 0.050 + 0.031
    assert prosody.expected_seconds("seven") == pytest.approx(expected)


# ------------------------------------------------------------------------ levels


@pytest.mark.parametrize("text", ["fourteen", "eighteen twelve", "the answer is seven"])
def test_opposite_levels_are_told_apart(detok, text):
    assert detected(speak(detok, text, rate="slow"), text)["rate"] == "slow"
    assert detected(speak(detok, text, rate="fast"), text)["rate"] == "fast"
    assert detected(speak(detok, text, pitch="low"), text)["pitch"] == "low"
    assert detected(speak(detok, text, pitch="high"), text)["pitch"] == "high"
    assert detected(speak(detok, text, volume="soft"), text)["volume"] == "soft"
    assert detected(speak(detok, text, volume="loud"), text)["volume"] == "loud"


def test_neutral_speech_is_normal_on_every_attribute(detok):
    text = "i can see twelve horses on the roof"
    assert detected(speak(detok, text), text) == {"rate": "normal", "pitch": "normal", "volume": "normal"}


def test_pitch_is_relative_to_the_voice():
    # A female voice's low pitch is higher in Hz than the male en-us voice's normal, yet low for her.
    text = "the train leaves at nine fifteen"
    female_low = synthesize(text, "en-us+f2", pitch=20, sample_rate=SR)
    male_normal = synthesize(text, "en-us", sample_rate=SR)
    assert prosody.measure(female_low, SR).f0_level_hz > prosody.measure(male_normal, SR).f0_level_hz
    assert detected(female_low, text, voice="en-us+f2")["pitch"] == "low"
    assert detected(male_normal, text)["pitch"] == "normal"


def test_rate_without_text_orders_slow_below_fast(detok):
    text = "the train leaves at nine forty five"
    baseline = para.voice_baseline()
    slow = para.relative_prosody(prosody.measure(speak(detok, text, rate="slow"), SR, f0_range=baseline.f0_range), baseline)
    fast = para.relative_prosody(prosody.measure(speak(detok, text, rate="fast"), SR, f0_range=baseline.f0_range), baseline)
    assert slow["rate"] < 0 < fast["rate"]


# ------------------------------------------------------------------------ reward


def test_reward_is_registered():
    assert get_reward("paralinguistic") is para.paralinguistic


def test_reward_scores_match_opposite_partial_and_no_request(detok):
    text = "seventeen"
    slow_high = speak(detok, text, rate="slow", pitch="high")
    rows = [
        rollout(slow_high, {"style": {"rate": "slow", "pitch": "high"}}, text),  # both match
        rollout(slow_high, {"style": {"rate": "fast", "pitch": "low"}}, text),  # both opposite
        rollout(slow_high, {"style": {"rate": "slow", "volume": "loud"}}, text),  # one of two
        rollout(slow_high, {}, text),  # no request
        rollout(None, {"style": {"rate": "slow"}}, text),  # no speech
    ]
    assert para.paralinguistic(rows) == [1.0, 0.0, 0.5, None, 0.0]


def test_unrequested_attributes_can_be_expected_neutral(detok):
    text = "seventeen"
    fast = speak(detok, text, rate="fast")  # pitch and volume normal
    fast_high = speak(detok, text, rate="fast", pitch="high")
    rows = [
        rollout(fast, {"style": {"rate": "fast"}}, text),  # the request, and neutral elsewhere
        rollout(fast_high, {"style": {"rate": "fast"}}, text),  # the request, but a high pitch nobody asked for
        rollout(fast_high, {"style": {}}, text),  # asked for nothing: all three expected normal; only the volume is
        rollout(speak(detok, text), {"style": {}}, text),
        rollout(fast, {}, text),  # not a style prompt at all
    ]
    # requested attributes weigh 1, the others `unrequested_weight`: (1 + 0.5 * 0) / (1 + 0.5 + 0.5) = 0.75
    assert para.paralinguistic(rows, unrequested="normal") == [1.0, 0.75, pytest.approx(1 / 3), 1.0, None]
    assert para.paralinguistic(rows, unrequested="normal", unrequested_weight=0.0) == [1.0, 1.0, None, None, None]
    assert para.paralinguistic(rows) == [1.0, 1.0, None, None, None]  # the default ignores them
    with pytest.raises(ValueError, match="unrequested='neutral' is not known; use one of ignore, normal"):
        para.paralinguistic(rows, unrequested="neutral")


def test_graded_scores_are_one_inside_and_fall_outside(detok):
    text = "the answer is seven"
    loud = speak(detok, text, volume="loud")
    rows = [rollout(loud, {"style": {"volume": level}}, text) for level in ("loud", "normal", "soft")]
    loud_score, normal_score, soft_score = para.paralinguistic(rows, graded=True)
    assert loud_score == 1.0
    assert 0.0 < soft_score < normal_score < 1.0


def test_voice_key_picks_the_rows_voice():
    text = "please paint the chair yellow"
    high = synthesize(text, "en-us+f4", pitch=85, sample_rate=SR)
    row = rollout(high, {"style": {"pitch": "high"}, "voice": "en-us+f4"}, text)
    assert para.paralinguistic([row], voice_key="voice") == [1.0]


@pytest.mark.parametrize(
    ("style", "message"),
    [("slow", "must be a dict"), ({"speed": "slow"}, "attribute 'speed' is not known"),
     ({"rate": "quick"}, "rate level 'quick' is not known; use slow, normal, fast")],
)
def test_bad_style_requests_name_the_row(detok, style, message):
    row = rollout(speak(detok, "seven"), {"style": style}, "seven")
    with pytest.raises(ValueError, match=message) as error:
        para.paralinguistic([row])
    assert "'p0'" in str(error.value)


def test_the_rate_reads_what_was_heard_not_what_the_policy_wrote(detok):
    # "fourteen" said at a normal rate, but the policy wrote "four" beside it: against the
    # written text the speech is far too long for its words ("slow"); the recognizer hears
    # "fourteen", and against that the rate is normal
    row = rollout(speak(detok, "fourteen"), {"style": {"rate": "normal"}}, "four")
    assert para.paralinguistic([row], rate_text="spoken_text") == [0.0]
    assert para.paralinguistic([row]) == [1.0]  # rate_text="transcript", the default
    with pytest.raises(ValueError, match="rate_text='words' is not known; use one of transcript, spoken_text, none"):
        para.paralinguistic([row], rate_text="words")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend='emotion' is not known; use one of acoustic, classifier"):
        para.paralinguistic([], backend="emotion")


# ------------------------------------------------------------ classifier backend

LABELS = ["angry", "happy", "neutral", "sad"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> str:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=8,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )
    folder = tmp_path_factory.mktemp("emotion_classifier")
    Wav2Vec2ForSequenceClassification(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    return str(folder)


def test_classifier_backend_scores_probabilities_of_named_labels(detok, classifier_dir):
    clips = [
        speak(detok, "seven"),
        speak(detok, "the answer is fourteen", rate="slow"),
        synthesize("hello", sample_rate=22050),
    ]
    rows = [
        rollout(clips[0], {"emotion": "happy"}),
        rollout(clips[1], {"emotion": "SAD"}),  # labels match case-insensitively
        rollout(clips[2], {"emotion": "neutral"}, sample_rate=22050),
        rollout(clips[0], {}),  # no label: no score
        rollout(None, {"emotion": "angry"}),  # no speech
    ]
    scores = para.paralinguistic(rows, backend="classifier", classifier_path=classifier_dir)
    assert len(scores) == 5 and scores[3] is None and scores[4] == 0.0
    assert all(0.0 < s < 1.0 for s in scores[:3])
    assert para.paralinguistic(rows, backend="classifier", classifier_path=classifier_dir) == scores  # deterministic

    from vocalign.rewards.audio_classifier import load_classifier

    classifier = load_classifier(classifier_dir)
    assert load_classifier(classifier_dir) is classifier  # cached per process
    probs = classifier.probabilities(clips[:2], [SR, SR])
    assert probs.shape == (2, len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert scores[0] == pytest.approx(float(probs[0, LABELS.index("happy")]), rel=1e-4)
    top = [LABELS[k] for k in probs.argmax(axis=1)]
    argmax = para.paralinguistic(
        [rollout(clips[0], {"emotion": top[0]}), rollout(clips[0], {"emotion": next(x for x in LABELS if x != top[0])})],
        backend="classifier", classifier_path=classifier_dir, classifier_score="argmax",
    )
    assert argmax == [1.0, 0.0]


def test_classifier_errors_name_what_to_fix(detok, classifier_dir):
    row = rollout(speak(detok, "seven"), {"emotion": "hapy"})
    with pytest.raises(ValueError, match=r"has no label 'hapy'; did you mean 'happy'\?"):
        para.paralinguistic([row], backend="classifier", classifier_path=classifier_dir)
    with pytest.raises(ValueError, match="needs classifier_path"):
        para.paralinguistic([row], backend="classifier")
    with pytest.raises(ValueError, match="classifier_score='top' is not known"):
        para.paralinguistic([row], backend="classifier", classifier_path=classifier_dir, classifier_score="top")
