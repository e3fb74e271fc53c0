"""The embedded Step-Audio-2-style policy: sizes, frame rates, generation, log-probs, LoRA,
saving, the tokenizer and chat format, and the path from text to speech tokens to audio.

Everything runs the real model (random init, ~2.5M parameters) on espeak-ng speech.
Run with `-s` to see the parameter counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocalign.data.espeak import synthesize
from vocalign.data.types import Audio, Message, Prompt, Response
from vocalign.model import chat
from vocalign.model.loading import embedded_policy, load_policy, save_policy
from vocalign.model.policy import Policy, PromptBatch, Sampling
from vocalign.model.step_audio2 import encoder_frames
from vocalign.model.tokenizer import build_tokenizer

SR = 16000


def speech(text: str, seconds: float | None = None) -> Audio:
    """espeak-ng speech of `text`, padded with silence or cut to `seconds` when given."""
    w = synthesize(text, sample_rate=SR)
    if seconds is not None:
        n = int(seconds * SR)
        w = np.pad(w[:n], (0, max(0, n - len(w))))
    return Audio(w, SR)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def policy() -> Policy:
    return embedded_policy(seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    """Prompts of different lengths: audio only, system + text + audio, text only."""
    return [
        Prompt("add", [Message("human", "", speech("what is five plus three"))]),
        Prompt("hello", [Message("system", "be brief"), Message("human", "say it slowly", speech("hello"))]),
        Prompt("text", [Message("human", "what is two plus two")]),
    ]


@pytest.fixture(scope="module")
def batch(policy: Policy, prompts: list[Prompt]) -> PromptBatch:
    return policy.encode_prompts(prompts)


def generation_logprobs(policy: Policy, batch: PromptBatch, gens, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Policy.logprobs of the generated sequences, the logprobs generation returned), both [B, R]."""
    seq = policy.sequences(
        [batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens], [batch.encoded[g.prompt_index] for g in gens]
    )
    with torch.no_grad():
        scored = policy.logprobs(seq, temperature)
    sampled = torch.zeros_like(scored)
    for r, g in enumerate(gens):
        sampled[r, : len(g.logprobs)] = torch.tensor(g.logprobs)
    return scored, sampled


@torch.no_grad()
def greedy(policy: Policy, batch: PromptBatch, i: int, max_new_tokens: int) -> list[int]:
    """Argmax decoding of prompt i with a full forward per step: no KV cache, no padding."""
    prompt, out = batch.ids[i], []
    for _ in range(max_new_tokens):
        ids = torch.tensor([prompt + out])
        embeds = torch.cat([
            policy.model.input_embeddings(ids[:, : len(prompt)], batch.encoded[i]),
            policy.model.input_embeddings(ids[:, len(prompt) :], None),
        ], dim=1)
        logits, _ = policy.model.decode(embeds, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        out.append(int(logits[0, -1].argmax()))
        if out[-1] == policy.tokenizer.eot_id:
            break
    return out


# -------------------------------------------------------------------------- sizes and rates


def test_parameter_count_is_the_stated_small_size(policy: Policy):
    parts = {name: sum(p.numel() for p in getattr(policy.model, name).parameters()) for name in ("encoder", "adaptor", "lm")}
    total = sum(p.numel() for p in policy.model.parameters())
    print(f"embedded policy: {total:,} parameters ({', '.join(f'{k} {v:,}' for k, v in parts.items())})")
    assert total == sum(parts.values())
    assert 1_000_000 < total < 5_000_000


def test_encoder_is_25hz_adaptor_12_5hz_and_placeholders_match(policy: Policy):
    clip = speech("the answer is seven", seconds=2.0)
    encoded = policy.model.encode_audio([clip.waveform])[0]
    with torch.no_grad():
        adapted = policy.model.adaptor(encoded.unsqueeze(0))[0]
    assert encoded.shape[0] == 50  # 2 s at 25 Hz
    assert adapted.shape == (25, policy.model.config.text["hidden_size"])  # 2 s at 12.5 Hz, in the LM width
    assert policy.model.audio_placeholders(len(clip.waveform)) == 25

    batch = policy.encode_prompts([Prompt("two-seconds", [Message("human", "transcribe", clip)])])
    patch = policy.tokenizer.special[chat.AUDIO_PATCH]
    assert batch.ids[0].count(patch) == adapted.shape[0]
    text = policy.tokenizer.hf.decode(batch.ids[0])
    assert text == f"<|BOT|>human\ntranscribe<audio_start>{'<audio_patch>' * 25}<audio_end><|EOT|><|BOT|>assistant\n"


def test_too_long_audio_is_refused_with_the_limit(policy: Policy):
    with pytest.raises(ValueError, match=r"at most 4\.00 s"):
        policy.model.encode_audio([np.zeros(5 * SR, dtype=np.float32)])


# -------------------------------------------------------------------------- generation


def test_logprobs_match_generation_for_a_left_padded_batch(policy: Policy, batch: PromptBatch):
    assert len({len(ids) for ids in batch.ids}) == 3  # three prompt lengths: rows are left-padded
    for temperature in (1.0, 0.7):
        gens = policy.generate(batch, n=3, sampling=Sampling(temperature=temperature, max_new_tokens=16), seed=1)
        assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(3) for j in range(3)]
        for g in gens:
            assert len(g.logprobs) == len(g.response_ids) > 0
            assert all(lp <= 0 for lp in g.logprobs)
        assert len({tuple(g.response_ids) for g in gens}) > 1
        scored, sampled = generation_logprobs(policy, batch, gens, temperature)
        assert torch.allclose(scored, sampled, atol=1e-5), (scored - sampled).abs().max()


def test_a_response_may_contain_the_audio_placeholder_token(policy: Policy, batch: PromptBatch):
    """A sampled <audio_patch> in a response is a plain token, as generation embedded it;
    only the prompt's placeholders take audio frames."""
    patch = policy.tokenizer.special[chat.AUDIO_PATCH]
    response = [patch, patch, policy.tokenizer.eot_id]
    seq = policy.sequences([batch.ids[0]], [response], [batch.encoded[0]])
    with torch.no_grad():
        scored = policy.logprobs(seq)[0]
        ids = torch.tensor([batch.ids[0] + response])
        P = len(batch.ids[0])
        embeds = torch.cat([
            policy.model.input_embeddings(ids[:, :P], batch.encoded[0]),
            policy.model.get_submodule("lm").get_input_embeddings()(ids[:, P:]),
        ], dim=1)
        logits, _ = policy.model.decode(embeds, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        expected = logits[0, P - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
    assert torch.allclose(scored, expected, atol=1e-5)


def test_max_new_tokens_caps_every_response(policy: Policy, batch: PromptBatch):
    gens = policy.generate(batch, n=4, sampling=Sampling(max_new_tokens=5), seed=3)
    eot = policy.tokenizer.eot_id
    for g in gens:
        assert 1 <= len(g.response_ids) <= 5
        assert g.finished == (g.response_ids[-1] == eot)
        assert eot not in g.response_ids[:-1]
        if not g.finished:
            assert len(g.response_ids) == 5


def test_tiny_temperature_and_tiny_top_p_give_the_greedy_tokens(policy: Policy, batch: PromptBatch):
    """Cached, padded, batched sampling picks the argmax of an uncached single-prompt forward."""
    expected = [greedy(policy, batch, i, 12) for i in range(3)]
    near_greedy = policy.generate(batch, n=2, sampling=Sampling(temperature=1e-6, max_new_tokens=12), seed=5)
    nucleus_of_one = policy.generate(batch, n=2, sampling=Sampling(top_p=1e-6, max_new_tokens=12), seed=6)
    for g in near_greedy + nucleus_of_one:
        assert g.response_ids == expected[g.prompt_index]


def test_top_p_samples_only_from_the_nucleus(policy: Policy, batch: PromptBatch):
    top_p = 0.3
    gens = policy.generate(batch, n=4, sampling=Sampling(top_p=top_p, max_new_tokens=10), seed=7)
    seq = policy.sequences(
        [batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens], [batch.encoded[g.prompt_index] for g in gens]
    )
    with torch.no_grad():
        probs = policy.response_logits(seq).float().softmax(-1)
    for r, g in enumerate(gens):
        for t, token in enumerate(g.response_ids):
            p = probs[r, t]
            mass_above = float(p[p > p[token]].sum())  # probability of the tokens ranked before it
            assert mass_above < top_p
    # the log-probs reported stay those of the full (un-truncated) distribution
    scored, sampled = generation_logprobs(policy, batch, gens, 1.0)
    assert torch.allclose(scored, sampled, atol=1e-5)


def test_a_prompt_samples_the_same_alone_or_in_a_batch(policy: Policy, prompts: list[Prompt]):
    """Seeds are per (seed, prompt id, sample) and left padding changes nothing: the text-only
    prompt gets the same samples alone as in the middle of a batch of longer audio prompts."""
    sampling = Sampling(temperature=1.0, max_new_tokens=12)
    alone = policy.generate(policy.encode_prompts([prompts[2]]), n=3, sampling=sampling, seed=11)
    together = policy.generate(policy.encode_prompts([prompts[0], prompts[2], prompts[1]]), n=3, sampling=sampling, seed=11)
    in_batch = [g for g in together if g.prompt_index == 1]
    assert [g.response_ids for g in alone] == [g.response_ids for g in in_batch]
    assert np.allclose([lp for g in alone for lp in g.logprobs], [lp for g in in_batch for lp in g.logprobs], atol=1e-5)
    assert len({tuple(g.response_ids) for g in alone}) > 1  # the samples of one prompt differ from each other
    reseeded = policy.generate(policy.encode_prompts([prompts[2]]), n=3, sampling=sampling, seed=12)
    assert [g.response_ids for g in reseeded] != [g.response_ids for g in alone]


def test_a_clip_encodes_the_same_alone_or_in_a_batch(policy: Policy, prompts: list[Prompt]):
    short, longer = prompts[1].audio[0].waveform, prompts[0].audio[0].waveform
    with torch.no_grad():
        alone = policy.model.encode_audio([short])[0]
        in_batch = policy.model.encode_audio([longer, short])[1]
    assert alone.shape == in_batch.shape
    assert alone.shape[0] == encoder_frames(len(short))
    assert torch.allclose(alone, in_batch, atol=1e-5)


# -------------------------------------------------------------------------- saving


def test_save_and_load_round_trip(policy: Policy, batch: PromptBatch, tmp_path):
    save_policy(policy, tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = load_policy(tmp_path)

    before, after = policy.model.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.tokenizer.hf.get_vocab() == policy.tokenizer.hf.get_vocab()
    assert loaded.tokenizer.audio_offset == policy.tokenizer.audio_offset
    assert len(loaded.detokenizer.units) == loaded.tokenizer.n_audio

    reloaded_batch = loaded.encode_prompts(batch.prompts)
    assert reloaded_batch.ids == batch.ids
    sampling = Sampling(temperature=0.8, max_new_tokens=10)
    gens = policy.generate(batch, n=2, sampling=sampling, seed=21)
    regens = loaded.generate(reloaded_batch, n=2, sampling=sampling, seed=21)
    assert [g.response_ids for g in gens] == [g.response_ids for g in regens]
    seq = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                           [batch.encoded[g.prompt_index] for g in gens])
    with torch.no_grad():
        assert torch.equal(policy.response_logits(seq), loaded.response_logits(seq))


# -------------------------------------------------------------------------- LoRA


def test_lora_freezes_audio_trains_adapters_and_keeps_the_base_as_reference(batch: PromptBatch):
    policy = embedded_policy(seed=0)
    gens = policy.generate(batch, n=1, sampling=Sampling(max_new_tokens=8), seed=0)
    seq = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                           [batch.encoded[g.prompt_index] for g in gens])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return policy.response_logits(seq)

    base = logits()
    policy.enable_lora(r=4, alpha=8)
    assert not any(p.requires_grad for p in policy.model.encoder.parameters())
    assert not any(p.requires_grad for p in policy.model.adaptor.parameters())
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    state = policy.trainable_state()
    assert state and all("lora_" in k for k in state)
    assert len(state) == len(trainable)

    # lora_B starts at zero (the adapter is a no-op); perturb it so that it is not
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    adapted = logits()
    assert not torch.allclose(adapted, base, atol=1e-3)
    with policy.reference():
        assert torch.allclose(logits(), base, atol=1e-6)
    assert torch.allclose(logits(), adapted)  # adapters are back on after the reference

    saved = policy.trainable_state()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(logits(), adapted, atol=1e-3)
    policy.load_trainable_state(saved)
    assert all(torch.equal(v, saved[k]) for k, v in policy.trainable_state().items())
    assert torch.allclose(logits(), adapted, atol=1e-6)
    with pytest.raises(ValueError, match="keys this policy does not"):
        policy.load_trainable_state({"base_model.model.not_a_layer.lora_A.weight": torch.zeros(1)})


# -------------------------------------------------------------------------- tokenizer and chat


def test_tokenizer_is_built_offline_and_deterministically(policy: Policy):
    rebuilt = build_tokenizer(policy.tokenizer.n_audio)
    assert rebuilt.get_vocab() == policy.tokenizer.hf.get_vocab()
    assert policy.tokenizer.n_audio == len(policy.detokenizer.units)
    assert len(policy.tokenizer) == policy.model.config.text["vocab_size"]
    ids = policy.tokenizer.text_ids("what is 12 plus 7.5, Bob?")
    assert policy.tokenizer.hf.decode(ids) == "what is 12 plus 7.5, Bob?"


def test_assistant_turn_round_trip_with_think_text_interleaved_speech_and_tool_call(policy: Policy):
    tok = policy.tokenizer
    units = policy.detokenizer.encode("eight")  # 3 prosody units + 2 phonemes
    tool = 'function\nweb_search\n{"query": "weather in paris"}'
    response = Response(text=f"the answer is 8 {chat.TOOL_CALL_START}{tool}{chat.TOOL_CALL_END}", speech="8",
                        think="five plus three makes eight")
    ids = tok.render_response(response, units)

    assert ids[0] == tok.special[chat.THINK_START] and ids[-1] == tok.eot_id
    start, end = ids.index(tok.special[chat.TTS_START]), ids.index(tok.special[chat.TTS_END])
    # 1 text : 4 audio; the text ("8", one token) runs out first, so <tts_pad> takes its next slot
    (eight,) = tok.text_ids("8")
    audio = tok.audio_ids(units)
    assert len(audio) == 5
    assert ids[start + 1 : end] == [eight, *audio[:4], tok.special[chat.TTS_PAD], audio[4]]
    # with more text than audio, the text left over follows the last audio block
    first, *rest = tok.text_ids("eight")
    assert tok.render_response(Response(text="", speech="eight"), units[:4]) == [
        tok.special[chat.TTS_START], first, *tok.audio_ids(units[:4]), *rest, tok.special[chat.TTS_END], tok.eot_id
    ]

    parsed = tok.parse_response(ids)
    assert parsed.think == "five plus three makes eight"
    assert parsed.text == "the answer is 8"
    assert parsed.spoken_text == "8"
    assert parsed.audio_ids == units
    assert parsed.tool_calls == [tool]
    assert parsed.finished
    assert not tok.parse_response(ids[:-1]).finished


# -------------------------------------------------------------------------- detokenizer path


def test_text_to_speech_tokens_to_waveform(policy: Policy):
    tok, detok = policy.tokenizer, policy.detokenizer
    units = detok.encode("the answer is seven")
    ids = tok.render_response(Response(text="7", speech="the answer is seven"), units)
    parsed = tok.parse_response(ids)
    assert parsed.audio_ids == units and parsed.text == "7"
    audio = detok.render(parsed.audio_ids)
    assert audio.sample_rate == SR
    # four words at ~175 words per minute, with espeak's lead-in and trailing silence
    assert 0.8 < audio.seconds < 3.0, audio.seconds
    assert float(np.sqrt(np.mean(audio.waveform**2))) > 0.01
