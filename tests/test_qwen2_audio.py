"""Qwen2-Audio (`transformers`-native) behind `Policy`: features, forward, generation,
log-probs, per-prompt seeding, LoRA, and loading a checkpoint whose tokenizer lacks our
chat tokens. The model is a tiny random `Qwen2AudioForConditionalGeneration` (~0.3M
parameters) built from a config; the audio is espeak-ng speech. Nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

from vocalign.data.espeak import synthesize
from vocalign.data.types import Audio, Message, Prompt
from vocalign.model import chat
from vocalign.model.features import log_mel
from vocalign.model.hf_audio import Qwen2AudioLM, add_chat_tokens, load_qwen2_audio_policy, valid_mel_frames
from vocalign.model.loading import save_policy
from vocalign.model.policy import Policy, PromptBatch, Sampling
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer

SR = 16000
WINDOW_SECONDS = 4.0  # the tiny encoder's fixed window: 2 * max_source_positions mel frames


def tiny_qwen2_audio(vocab_size: int, audio_token_id: int, seed: int = 0) -> Qwen2AudioForConditionalGeneration:
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder", num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2,
            encoder_ffn_dim=128, d_model=64, max_source_positions=int(WINDOW_SECONDS * 50),
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        ),
        audio_token_index=audio_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2AudioForConditionalGeneration(config).eval()


def qwen_like_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Qwen2-Audio's own special tokens and none of vocalign's."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials, show_progress=False
    )
    bpe.train_from_iterator(["what is five plus three", "human assistant system", "hello there, say it slowly"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def policy() -> Policy:
    tokenizer = build_tokenizer(16)
    hf_model = tiny_qwen2_audio(len(tokenizer), tokenizer.convert_tokens_to_ids(chat.AUDIO_PATCH))
    return Policy(Qwen2AudioLM(hf_model), ChatTokenizer(tokenizer))


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return [
        Prompt("add", [Message("human", "", Audio(synthesize("what is five plus three"), SR))]),
        Prompt("hello", [Message("system", "be brief"), Message("human", "say it slowly", Audio(synthesize("hello"), SR))]),
    ]


@pytest.fixture(scope="module")
def batch(policy: Policy, prompts: list[Prompt]) -> PromptBatch:
    return policy.encode_prompts(prompts)


def sequences_of(policy: Policy, batch: PromptBatch, gens):
    return policy.sequences(
        [batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens], [batch.encoded[g.prompt_index] for g in gens]
    )


def sampled_logprobs(gens, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for r, g in enumerate(gens):
        out[r, : len(g.logprobs)] = torch.tensor(g.logprobs)
    return out


# -------------------------------------------------------------------------- audio path


def test_features_and_placeholders_are_those_of_qwen2_audio(policy: Policy, prompts: list[Prompt]):
    clips = [p.audio[0].waveform for p in prompts]
    whisper = WhisperFeatureExtractor(feature_size=80, chunk_length=int(WINDOW_SECONDS))
    features = whisper(clips, sampling_rate=SR, padding="max_length", return_attention_mask=True, return_tensors="pt")
    ours = log_mel(clips, 80, int(WINDOW_SECONDS * 100))
    assert torch.allclose(ours, features["input_features"], atol=1e-5)
    assert features["attention_mask"].sum(-1).tolist() == [valid_mel_frames(len(w)) for w in clips]

    encoded = policy.model.encode_audio(clips)
    for w, frames, mel_len in zip(clips, encoded, features["attention_mask"].sum(-1).tolist()):
        qwen_count = (((mel_len - 1) // 2 + 1) - 2) // 2 + 1  # Qwen2AudioProcessor's placeholder count
        assert policy.model.audio_placeholders(len(w)) == qwen_count == frames.shape[0]
        assert abs(frames.shape[0] - len(w) / SR * 25) <= 1  # 25 Hz


def test_wrapper_reproduces_the_hf_models_own_forward(policy: Policy, batch: PromptBatch):
    hf_model = policy.model.hf_model
    clips = [p.audio[0].waveform for p in batch.prompts]
    mel = log_mel(clips, 80, int(WINDOW_SECONDS * 100))
    mel_mask = torch.tensor([[1] * valid_mel_frames(len(w)) + [0] * (mel.shape[-1] - valid_mel_frames(len(w))) for w in clips])
    for i, ids in enumerate(batch.ids):
        ids = torch.tensor([ids])
        with torch.no_grad():
            theirs = hf_model(
                input_ids=ids, input_features=mel[i : i + 1], feature_attention_mask=mel_mask[i : i + 1],
                attention_mask=torch.ones_like(ids),
            ).logits
            embeds = policy.model.input_embeddings(ids, batch.encoded[i])
            ours, _ = policy.model.decode(embeds, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_bad_inputs_are_refused_with_what_to_do(policy: Policy):
    with pytest.raises(TypeError, match="Qwen2AudioForConditionalGeneration"):
        Qwen2AudioLM(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"at most 4\.00 s"):
        policy.model.encode_audio([np.zeros(5 * SR, dtype=np.float32)])


# -------------------------------------------------------------------------- generation


def test_generation_logprobs_match_the_training_forward(policy: Policy, batch: PromptBatch):
    assert len(batch.ids[0]) != len(batch.ids[1])  # left padding in play
    for temperature in (1.0, 0.7):
        gens = policy.generate(batch, n=3, sampling=Sampling(temperature=temperature, max_new_tokens=12), seed=1)
        assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(2) for j in range(3)]
        assert all(len(g.logprobs) == len(g.response_ids) <= 12 for g in gens)
        assert len({tuple(g.response_ids) for g in gens}) > 1
        with torch.no_grad():
            scored = policy.logprobs(sequences_of(policy, batch, gens), temperature)
        sampled = sampled_logprobs(gens, scored)
        assert torch.allclose(scored, sampled, atol=1e-5), (scored - sampled).abs().max()


def test_an_audio_prompt_samples_the_same_alone_or_in_a_batch(policy: Policy, prompts: list[Prompt]):
    """The encoder masks its padding (as Qwen2-Audio does), so a clip encodes the same in any batch."""
    sampling = Sampling(max_new_tokens=10)
    alone = policy.generate(policy.encode_prompts([prompts[1]]), n=2, sampling=sampling, seed=4)
    together = policy.generate(policy.encode_prompts([prompts[0], prompts[1]]), n=2, sampling=sampling, seed=4)
    assert [g.response_ids for g in alone] == [g.response_ids for g in together if g.prompt_index == 1]


# -------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapters_on_the_language_model(prompts: list[Prompt]):
    tokenizer = build_tokenizer(16)
    policy = Policy(Qwen2AudioLM(tiny_qwen2_audio(len(tokenizer), tokenizer.convert_tokens_to_ids(chat.AUDIO_PATCH))),
                    ChatTokenizer(tokenizer))
    batch = policy.encode_prompts(prompts)
    seq = sequences_of(policy, batch, policy.generate(batch, n=2, sampling=Sampling(max_new_tokens=6), seed=0))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return policy.response_logits(seq)

    base = logits()
    policy.enable_lora(r=4, alpha=8)
    for part in (policy.model.encoder, policy.model.adaptor, policy.model.lm_head):
        assert not any(p.requires_grad for p in part.parameters())
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("lm.") and "lora_" in n for n in trainable)
    state = policy.trainable_state()
    assert len(state) == len(trainable) and all("lora_" in k for k in state)

    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    adapted = logits()
    assert not torch.allclose(adapted, base, atol=1e-3)
    with policy.reference():
        assert torch.allclose(logits(), base, atol=1e-6)

    saved = policy.trainable_state()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn_like(p))
    policy.load_trainable_state(saved)
    assert torch.allclose(logits(), adapted, atol=1e-6)


# -------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_without_chat_tokens_gets_them_and_round_trips(prompts: list[Prompt], tmp_path):
    # A "released" checkpoint: Qwen's own special tokens, none of ours, Whisper features.
    qwen_tok = qwen_like_tokenizer()
    released = tmp_path / "released"
    tiny_qwen2_audio(len(qwen_tok), qwen_tok.convert_tokens_to_ids("<|AUDIO|>")).save_pretrained(released)
    qwen_tok.save_pretrained(released)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(released)

    policy = load_qwen2_audio_policy(released, detokenizer="espeak_units")
    tok, model = policy.tokenizer, policy.model
    n_units = len(policy.detokenizer.units)
    assert tok.n_audio == n_units
    assert len(tok) == len(qwen_tok) + len(chat.SPECIAL_TOKENS) + n_units
    assert model.lm.get_input_embeddings().num_embeddings == len(tok) == model.lm_head.out_features
    assert model.audio_token_id == tok.special[chat.AUDIO_PATCH]
    embed, head = model.lm.get_input_embeddings().weight, model.lm_head.weight
    vocab = tok.hf.get_vocab()
    for ours, theirs in [(chat.BOT, "<|im_start|>"), (chat.EOT, "<|im_end|>"), (chat.AUDIO_PATCH, "<|AUDIO|>")]:
        assert torch.equal(embed[vocab[ours]], embed[vocab[theirs]]) and torch.equal(head[vocab[ours]], head[vocab[theirs]])
    assert torch.allclose(embed[tok.audio_offset], embed[: len(qwen_tok)].mean(0))

    batch = policy.encode_prompts(prompts)
    assert policy.tokenizer.hf.decode(batch.ids[0]).startswith("<|BOT|>human\n<audio_start><audio_patch>")
    gens = policy.generate(batch, n=2, sampling=Sampling(max_new_tokens=8), seed=2)
    seq = sequences_of(policy, batch, gens)
    with torch.no_grad():
        assert torch.allclose(policy.logprobs(seq), sampled_logprobs(gens, seq.response_mask), atol=1e-5)

    # Saved with its tokenizer, it loads back unchanged (no tokens added twice).
    saved = tmp_path / "saved"
    save_policy(policy, saved)
    reloaded = load_qwen2_audio_policy(saved, detokenizer="espeak_units")
    assert reloaded.tokenizer.hf.get_vocab() == vocab
    before, after = policy.model.state_dict(), reloaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    regens = reloaded.generate(reloaded.encode_prompts(prompts), n=2, sampling=Sampling(max_new_tokens=8), seed=2)
    assert [g.response_ids for g in regens] == [g.response_ids for g in gens]

    # Under LoRA, saving merges the adapters: the checkpoint speaks like the adapted policy.
    policy.enable_lora(r=4)
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=draw) * 0.5)
    merged = tmp_path / "merged"
    save_policy(policy, merged)
    assert "lora" not in json.dumps(sorted(Qwen2AudioLM.from_pretrained(merged)[0].state_dict()))
    with torch.no_grad():
        assert torch.allclose(
            load_qwen2_audio_policy(merged).response_logits(seq), policy.response_logits(seq), atol=1e-4
        )


def test_features_of_another_kind_are_refused(tmp_path):
    qwen_tok = qwen_like_tokenizer()
    tiny_qwen2_audio(len(qwen_tok), qwen_tok.convert_tokens_to_ids("<|AUDIO|>")).save_pretrained(tmp_path)
    qwen_tok.save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="feature_size"):
        Qwen2AudioLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen2AudioLM.from_pretrained(tmp_path / "missing")


def test_add_chat_tokens_refuses_a_different_audio_inventory():
    tokenizer = build_tokenizer(16)
    hf_model = tiny_qwen2_audio(len(tokenizer), tokenizer.convert_tokens_to_ids(chat.AUDIO_PATCH))
    assert add_chat_tokens(hf_model, tokenizer, 16).n_audio == 16  # already extended: nothing added
    assert len(tokenizer) == hf_model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="already holds 16 <audio_k> tokens"):
        add_chat_tokens(hf_model, tokenizer, 130)


def test_spare_embedding_rows_are_cut_to_the_vocabulary():
    """Released checkpoints have more embedding rows than tokens; a policy must only sample real tokens."""
    qwen_tok = qwen_like_tokenizer()
    n_released = len(qwen_tok)
    hf_model = tiny_qwen2_audio(n_released + 300, qwen_tok.convert_tokens_to_ids("<|AUDIO|>"))
    tok = add_chat_tokens(hf_model, qwen_tok, n_audio_tokens=16)
    assert tok.hf is qwen_tok  # extended in place
    assert len(tok) == n_released + len(chat.SPECIAL_TOKENS) + 16 < n_released + 300
    assert hf_model.get_input_embeddings().num_embeddings == hf_model.lm_head.out_features == len(tok)
    assert hf_model.config.text_config.vocab_size == len(tok)
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert torch.equal(hf_model.lm_head.weight[tok.eot_id], hf_model.lm_head.weight[im_end])

