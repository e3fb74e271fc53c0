"""The text-only model adapter (`vocalign.model.hf_text`): generation, log-probabilities,
LoRA, hidden states and saving, on a tiny Qwen2 built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vocalign.data.types import Audio, Message, Prompt
from vocalign.model.hf_text import CausalTextLM, text_policy
from vocalign.model.policy import Sampling
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(build_tokenizer(0))


def tiny_lm(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def prompts() -> list[Prompt]:
    # different lengths, so the batch is left-padded
    return [
        Prompt(id="p0", messages=[Message("human", "what is three plus four")]),
        Prompt(id="p1", messages=[Message("system", "answer with digits"), Message("human", "what is one plus one")]),
    ]


def test_generated_logprobs_equal_training_logprobs(tokenizer):
    policy = text_policy(CausalTextLM(tiny_lm(len(tokenizer))), tokenizer)
    batch = policy.encode_prompts(prompts())
    assert len(batch.ids[0]) != len(batch.ids[1])
    gens = policy.generate(batch, n=3, sampling=Sampling(temperature=0.8, max_new_tokens=12), seed=1)
    assert len(gens) == 6 and all(len(g.response_ids) == len(g.logprobs) > 0 for g in gens)
    seq = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens], [[] for _ in gens])
    with torch.no_grad():
        scored = policy.logprobs(seq, temperature=0.8)
    for k, g in enumerate(gens):
        n = len(g.logprobs)
        torch.testing.assert_close(scored[k, :n], torch.tensor(g.logprobs), atol=1e-5, rtol=0)
        assert torch.all(scored[k, n:] == 0)  # padding is masked out


def test_generation_is_seeded_per_row(tokenizer):
    policy = text_policy(CausalTextLM(tiny_lm(len(tokenizer))), tokenizer)
    sampling = Sampling(max_new_tokens=8)
    both = policy.generate(policy.encode_prompts(prompts()), n=2, sampling=sampling, seed=3)
    alone = policy.generate(policy.encode_prompts(prompts()[1:]), n=2, sampling=sampling, seed=3)
    assert [g.response_ids for g in both[2:]] == [g.response_ids for g in alone]


def test_lora_trains_the_adapter_only_and_the_reference_is_the_base(tokenizer):
    policy = text_policy(CausalTextLM(tiny_lm(len(tokenizer))), tokenizer)
    policy.freeze_encoder()  # the empty encoder: must not fail
    batch = policy.encode_prompts(prompts())
    gens = policy.generate(batch, n=2, sampling=Sampling(max_new_tokens=6), seed=0)
    seq = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens], [[] for _ in gens])
    with torch.no_grad():
        base = policy.logprobs(seq)

    policy.enable_lora(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(policy.logprobs(seq), base, atol=1e-6, rtol=0)  # LoRA B starts at zero

    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    loss = -(policy.logprobs(seq).sum())
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = policy.logprobs(seq)
        with policy.reference() as ref:
            reference = ref.logprobs(seq)
    assert (after - base).abs().max() > 1e-3
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=0)
    assert set(policy.trainable_state()) and all("lora_" in k for k in policy.trainable_state())


def test_hidden_states_feed_the_lm_head(tokenizer):
    model = CausalTextLM(tiny_lm(len(tokenizer)))
    ids = torch.tensor([tokenizer.render_prompt([Message("human", "hello")], [])])
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    embeds = model.input_embeddings(ids, None)
    with torch.no_grad():
        hidden = model.hidden_states(embeds, mask, positions)
        logits, _ = model.decode(embeds, mask, positions)
    assert hidden.shape == (1, ids.shape[1], model.config.hidden_size)
    torch.testing.assert_close(model.lm.lm_head(hidden), logits)


def test_save_merges_lora_and_loads_back(tokenizer, tmp_path):
    policy = text_policy(CausalTextLM(tiny_lm(len(tokenizer))), tokenizer)
    policy.enable_lora(r=4, alpha=8)
    with torch.no_grad():  # give the adapter a visible effect
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.tensor([tokenizer.render_prompt([Message("human", "what is two plus two")], [])])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        expected, _ = policy.model.decode(policy.model.input_embeddings(ids, None), mask, positions)
    policy.model.save_pretrained(tmp_path)
    loaded = CausalTextLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got, _ = loaded.decode(loaded.input_embeddings(ids, None), mask, positions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert hasattr(policy.model.lm, "disable_adapter")  # the live policy keeps its adapter


def test_audio_and_mismatched_vocabularies_are_refused(tokenizer):
    policy = text_policy(CausalTextLM(tiny_lm(len(tokenizer))), tokenizer)
    clip = Audio(np.zeros(1600, dtype=np.float32), 16000)
    spoken = Prompt(id="a", messages=[Message("human", "what did I say", audio=clip)])
    with pytest.raises(ValueError, match="text-only"):
        policy.encode_prompts([spoken])
    with pytest.raises(ValueError, match="vocab_size=1024"):
        text_policy(CausalTextLM(tiny_lm(len(tokenizer) + 8)), tokenizer)
    with pytest.raises(TypeError, match="causal LM"):
        CausalTextLM(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="config.json"):
        CausalTextLM.from_pretrained("/nonexistent-folder")
