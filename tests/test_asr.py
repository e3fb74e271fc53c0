"""ASR backends: the registry and cache, the shipped embedded recognizer (on real espeak-ng
speech and the policy's detokenizer speech), its training entry point, and Whisper through
`transformers` (a tiny random-weight model and a tokenizer built here, saved and loaded
offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocalign.data import synthetic
from vocalign.data.espeak import synthesize
from vocalign.data.types import SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.rewards.asr import ASRBackend, WhisperASR, available_asr, get_asr
from vocalign.data.speakers import HELD_OUT_VARIANTS
from vocalign.rewards.ctc_asr import VOCABULARY, EmbeddedRecognizer, greedy_decode, log_mel
from vocalign.rewards.training.ctc_asr import TrainConfig, corpus_wer, main, training_variants
from vocalign.rewards.transcripts import normalize_transcript


@pytest.fixture(scope="module")
def detok() -> EspeakUnitDetokenizer:
    return EspeakUnitDetokenizer()


@pytest.fixture(scope="module")
def embedded() -> ASRBackend:
    return get_asr("embedded")


# --- registry and cache ------------------------------------------------------------------


def test_registry_lists_and_explains_unknown_names() -> None:
    assert {"embedded", "whisper"} <= set(available_asr())
    with pytest.raises(ValueError, match="ASR backend 'wav2vec' is not registered; registered ASR backends: .*embedded.*whisper.*@register_asr"):
        get_asr("wav2vec")


def test_get_asr_builds_once_per_name_and_kwargs(embedded: ASRBackend) -> None:
    assert isinstance(embedded, ASRBackend)
    assert get_asr() is embedded
    other = get_asr("embedded", batch_size=4)
    assert other is not embedded and get_asr("embedded", batch_size=4) is other


# --- the embedded recognizer -------------------------------------------------------------


def test_embedded_hears_the_policy_in_every_style(embedded: ASRBackend, detok: EspeakUnitDetokenizer) -> None:
    texts = ["seven", "fourteen", "ninety nine", "the answer is zero"]
    styles = [SpeechStyle(r, p, v) for r in ("slow", "fast") for p in ("low", "high") for v in ("soft", "loud")]
    clips, refs = [], []
    for i, style in enumerate(styles):
        for text in texts[i % 2 :: 2]:
            clips.append(detok.render(detok.encode(text, style)).waveform)
            refs.append(text)
    heard = embedded.transcribe(clips, detok.sample_rate)
    print(list(zip(refs, heard)))
    assert corpus_wer(refs, heard) <= 0.1


def test_embedded_hears_unseen_voices(embedded: ASRBackend) -> None:
    texts = ["what is six plus three", "we meet again on friday", "i can see twelve horses", "loud", "forty two"]
    clips, refs = [], []
    for k, variant in enumerate(HELD_OUT_VARIANTS[:6]):
        text = texts[k % len(texts)]
        clips.append(synthesize(text, f"en-us+{variant}", rate=150 + 20 * k, pitch=30 + 10 * k))
        refs.append(text)
    heard = embedded.transcribe(clips, 16000)
    print(list(zip(refs, heard)))
    assert corpus_wer(refs, heard) <= 0.15


def test_embedded_hears_the_synthetic_tasks(embedded: ASRBackend) -> None:
    prompts = synthetic.arithmetic(8, seed=3, styled=True) + synthetic.transcription(8, seed=3)
    refs = [p.meta.get("question", p.meta.get("transcript")) for p in prompts]
    heard = embedded.transcribe([p.audio[0].waveform for p in prompts], 16000)
    print(list(zip(refs, heard)))
    assert corpus_wer([normalize_transcript(r) for r in refs], heard) <= 0.1


def test_empty_clips_batch_order_and_sample_rates(embedded: ASRBackend, detok: EspeakUnitDetokenizer) -> None:
    seven, twelve = (detok.render(detok.encode(t)).waveform for t in ("seven", "twelve"))
    assert embedded.transcribe([], 16000) == []
    batch = embedded.transcribe([seven, np.zeros(0, np.float32), twelve], 16000)
    assert batch == ["seven", "", "twelve"]
    # One clip at a time gives the same words as the batch: padding does not leak into a clip.
    assert [embedded.transcribe([w], 16000)[0] for w in (twelve, seven)] == ["twelve", "seven"]
    at_22k = EspeakUnitDetokenizer(sample_rate=22050)
    assert embedded.transcribe([at_22k.render(at_22k.encode("eighteen")).waveform], 22050) == ["eighteen"]


def test_vocabulary_covers_the_synthetic_tasks() -> None:
    texts = [p.meta["text"] for p in synthetic.styled_speech(200, seed=1, max_attributes=3)]
    texts += [synthetic.number_to_words(n) for n in range(100)]
    texts += [f"what is {a} plus {b} answer {synthetic.style_phrase(s)}"
              for a, b, s in [("nine", "nine", {"rate": "slow", "pitch": "high", "volume": "loud"}),
                              ("zero", "four", {"rate": "fast", "pitch": "low", "volume": "soft"})]]
    texts += [label for choices in synthetic.PERCEPTION_CHOICES.values() for label in choices]
    missing = {w for t in texts for w in normalize_transcript(t).split()} - set(VOCABULARY)
    assert not missing


def test_held_out_variants_are_never_trained_on() -> None:
    assert not set(HELD_OUT_VARIANTS) & set(training_variants())
    assert set(synthetic.DEFAULT_VOICES) - set(HELD_OUT_VARIANTS) <= set(training_variants())


def test_log_mel_ignores_loudness() -> None:
    wave = synthesize("what is five plus two", "en-us+m3")
    loud, soft = log_mel(wave), log_mel(0.05 * wave)
    assert loud.shape == (len(wave) // 160 + 1, 80)
    assert torch.allclose(loud, soft, atol=1e-3)


def test_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    vocabulary = ["one", "two", "three"]
    path = [0, 1, 1, 0, 1, 3, 3, 0, 2]  # one, (blank), one, three, (blank), two; the last 2 frames are padding
    logits = torch.nn.functional.one_hot(torch.tensor([path]), 4).float()
    assert greedy_decode(logits, torch.tensor([7]), vocabulary) == ["one one three"]


def test_missing_weights_are_explained(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no embedded recognizer in .*ctc_asr train --out"):
        EmbeddedRecognizer.load(tmp_path)


def test_train_entry_point_writes_loadable_weights(tmp_path, detok: EspeakUnitDetokenizer) -> None:
    main(["train", "--out", str(tmp_path), "--minutes", "0.02", "--utterances", "24", "--seed", "5"])
    recognizer = get_asr("embedded", path=str(tmp_path))
    heard = recognizer.transcribe([detok.render(detok.encode("seven")).waveform], 16000)
    assert len(heard) == 1 and set(heard[0].split()) <= set(VOCABULARY)
    assert recognizer.model.config.vocabulary == VOCABULARY
    assert TrainConfig().utterances > 24  # the test trains on a sliver of the real data


# --- Whisper through transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> str:
    """A 2-layer, width-32 Whisper with random weights and a byte-level tokenizer, saved offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = tmp_path_factory.mktemp("whisper")
    tokenizer = WhisperTokenizer({c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, [])
    specials = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_target_positions=64, pad_token_id=end, bos_token_id=end, eos_token_id=end,
        decoder_start_token_id=start, begin_suppress_tokens=None, suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, bos_token_id=end, eos_token_id=end, pad_token_id=end, max_length=64,
        is_multilingual=True, lang_to_id={"<|en|>": ids["<|en|>"]}, no_timestamps_token_id=ids["<|notimestamps|>"],
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
    )
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return str(folder)


def test_whisper_transcribes_a_batch_offline(tiny_whisper: str, detok: EspeakUnitDetokenizer) -> None:
    backend = get_asr("whisper", path=tiny_whisper, max_new_tokens=8, batch_size=2)
    assert isinstance(backend, WhisperASR) and get_asr("whisper", path=tiny_whisper, max_new_tokens=8,
                                                        batch_size=2) is backend
    seven = detok.render(detok.encode("seven")).waveform
    texts = backend.transcribe([seven, np.zeros(0, np.float32), seven, seven[:8000]], 16000)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert texts[1] == "" and texts[0] == texts[2]  # random weights: gibberish, but the same clip, the same text
    # Batches of 2 and one clip at a time agree, as do 16 kHz and 22.05 kHz input of the same speech.
    assert backend.transcribe([seven], 16000) == [texts[0]]
    at_22k = EspeakUnitDetokenizer(sample_rate=22050)
    assert len(backend.transcribe([at_22k.render(at_22k.encode("seven")).waveform], 22050)) == 1


def test_whisper_language_and_task(tiny_whisper: str, detok: EspeakUnitDetokenizer) -> None:
    backend = get_asr("whisper", path=tiny_whisper, language="en", task="transcribe", max_new_tokens=4)
    assert backend.generate_kwargs == {"max_new_tokens": 4, "language": "en", "task": "transcribe"}
    texts = backend.transcribe([detok.render(detok.encode("twelve")).waveform], 16000)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_whisper_bad_path_is_explained(tmp_path) -> None:
    with pytest.raises(ValueError, match="whisper ASR: cannot load .* from"):
        WhisperASR(path=str(tmp_path / "nowhere"))
