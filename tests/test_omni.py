"""Qwen2.5-Omni through vocalign: a tiny random model saved as the released checkpoints are
(model/omni_tiny.py); its thinker, talker and token2wav load through `OmniSpeech`, sample
text and speech codes with their log-probabilities, and the training forward gives those
log-probabilities again, teacher-forced, to 1e-5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.data.types import Message, Prompt
from vocalign.model.omni_tiny import write_tiny_omni
from vocalign.model.policy import Sampling
from vocalign.model.qwen2_5_omni import OUTPUT_RATE, OmniCheckpointError, OmniSpeech

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_omni(tmp_path_factory.mktemp("qwen2.5-omni"), seed=0)


@pytest.fixture(scope="module")
def omni(released: Path) -> OmniSpeech:
    return OmniSpeech.load(released)


def _prompts() -> list[Prompt]:
    spoken = make_task("arithmetic", 1, seed=3)[0]  # a spoken question
    typed = Prompt(id="typed", messages=[Message("human", "say hello there, slowly")])
    return [spoken, typed]


def test_the_released_layout_loads_with_its_voices(released: Path, omni: OmniSpeech) -> None:
    assert {"config.json", "model.safetensors", "spk_dict.pt", "preprocessor_config.json", "tokenizer.json"} <= {
        p.name for p in released.iterdir()}
    assert omni.speakers == ["Chelsie", "Ethan"]
    assert omni.inputs(_prompts()[0]).features is not None and omni.inputs(_prompts()[1]).features is None


def test_samples_carry_the_logprobs_the_training_forward_gives(omni: OmniSpeech) -> None:
    sampling = Sampling(temperature=1.0, max_new_tokens=8)
    for prompt in _prompts():
        for speaker in ("Chelsie", "Ethan"):
            s = omni.sample(prompt, sampling, seed=1, speaker=speaker, max_codes=24)
            assert len(s.text_ids) >= 2 and 1 <= len(s.codes) <= 24
            text, speech, _ = omni.logprobs(prompt, s.text_ids, s.codes, speaker=speaker)
            assert text.requires_grad and speech.requires_grad
            assert text.detach() == pytest.approx(torch.tensor(s.text_logprobs), abs=1e-5)
            assert speech.detach() == pytest.approx(torch.tensor(s.code_logprobs), abs=1e-5)
            spoken = [c for c in s.codes if c not in omni.code_stops]
            assert s.sample_rate == OUTPUT_RATE and s.waveform.dtype == np.float32
            assert len(s.waveform) == len(spoken) * 2 * 240  # two mel frames a code, 240 samples a frame
            assert np.isfinite(s.waveform).all() and np.abs(s.waveform).max() > 0


def test_sampling_is_seeded_per_prompt_and_sample(omni: OmniSpeech) -> None:
    prompt, sampling = _prompts()[0], Sampling(temperature=1.5, max_new_tokens=8)
    a, b = (omni.sample(prompt, sampling, seed=4, index=0, max_codes=16) for _ in range(2))
    c = omni.sample(prompt, sampling, seed=4, index=1, max_codes=16)
    assert (a.text_ids, a.codes) == (b.text_ids, b.codes) and np.array_equal(a.waveform, b.waveform)
    assert (a.text_ids, a.codes) != (c.text_ids, c.codes)


def test_the_talker_reads_the_thinker_detached(omni: OmniSpeech) -> None:
    """The talker's log-probabilities give no gradient to the thinker; the thinker's do."""
    prompt = _prompts()[1]
    s = omni.sample(prompt, Sampling(max_new_tokens=6), seed=2, max_codes=12)
    omni.zero_grad()
    _, speech, _ = omni.logprobs(prompt, s.text_ids, s.codes)
    speech.sum().backward()
    thinker = [p.grad for p in omni.hf.thinker.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    talker = [p.grad for p in omni.hf.talker.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert not thinker and talker
    omni.zero_grad()
    text, _, _ = omni.logprobs(prompt, s.text_ids, s.codes)
    text.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in omni.hf.thinker.parameters())
    omni.zero_grad()


def test_a_folder_that_is_not_qwen2_5_omni_is_named(released: Path, tmp_path: Path, omni: OmniSpeech) -> None:
    other = tmp_path / "other"
    shutil.copytree(released, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_audio"}))
    with pytest.raises(OmniCheckpointError, match=r"config.json says model_type 'qwen2_audio'.*not a Qwen2.5-Omni"):
        OmniSpeech.load(other)
    missing = tmp_path / "missing"
    shutil.copytree(released, missing)
    (missing / "preprocessor_config.json").unlink()
    with pytest.raises(OmniCheckpointError, match=r"preprocessor_config.json is missing \(the Whisper feature extractor"):
        OmniSpeech.load(missing)
    with pytest.raises(OmniCheckpointError, match="is not a folder"):
        OmniSpeech.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"speaker 'Serena' is not one of this checkpoint's voices \(Chelsie, Ethan"):
        omni.sample(_prompts()[1], Sampling(max_new_tokens=4), seed=0, speaker="Serena")


def test_a_group_decodes_together_as_its_samples_do_alone(omni: OmniSpeech) -> None:
    """Four samples of one prompt in one batch: each is the sample drawn alone with its index
    (the same text and codes; log-probabilities within 1e-5; the same waveform)."""
    prompt, sampling = _prompts()[0], Sampling(temperature=1.2, max_new_tokens=8)
    group = omni.sample_group(prompt, sampling, seed=5, indices=[0, 1, 2, 3], max_codes=20)
    for index, together in enumerate(group):
        alone = omni.sample(prompt, sampling, seed=5, index=index, max_codes=20)
        assert (together.text_ids, together.codes) == (alone.text_ids, alone.codes)
        assert together.text_logprobs == pytest.approx(alone.text_logprobs, abs=1e-5)
        assert together.code_logprobs == pytest.approx(alone.code_logprobs, abs=1e-5)
        assert (together.waveform is None) == (alone.waveform is None)
        if alone.waveform is not None:
            assert np.array_equal(together.waveform, alone.waveform)
    assert len({tuple(s.codes) for s in group}) > 1  # the samples differ
