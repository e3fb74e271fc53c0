"""The RL trainer where the policy lives: on the CPU always, on a GPU when torch sees one.

GRPO under LoRA with a KL to the adapters-off base, GRPO with full weights and a frozen
reference copy, and PPO with a critic: a few steps each, then a checkpoint saved and
loaded into a fresh policy and trainer, whose next step must be the uninterrupted one's.
Every tensor the trainer makes from the rollouts (masks, sampler log-probs, rewards,
PPO's per-token rewards) has to follow the policy to its device for this to run at all.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from vocalign.data.types import Message, Prompt
from vocalign.model.hf_text import CausalTextLM, text_policy
from vocalign.model.policy import Policy
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer
from vocalign.rewards import RewardSpec, get_reward, reward
from vocalign.rl.checkpoint import ADAPTER_NAME, read_state, save_checkpoint
from vocalign.rl.config import KLConfig, LossConfig, RLConfig
from vocalign.rl.critic import ValueModel
from vocalign.rl.trainer import PromptCursor, RLTrainer
from vocalign.rollouts.worker import RolloutWorker

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA device here (this case ran on an H200: see BENCHMARKS.md)"))]
TOKENIZER = ChatTokenizer(build_tokenizer(0))
REWARD = "test_digit_fraction"
PROMPTS = [Prompt(f"p{i}", [Message("human", f"what is {i} plus {i + 1}")]) for i in range(6)]


def digit_fraction(rollouts) -> list[float]:
    texts = [TOKENIZER.hf.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
    return [sum(c.isdigit() for c in t) / len(t) if t else 0.0 for t in texts]


try:
    get_reward(REWARD)
except ValueError:
    reward(REWARD)(digit_fraction)


def tiny_policy(device: str) -> Policy:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return text_policy(CausalTextLM(Qwen2ForCausalLM(config).to(device)), TOKENIZER)


def trainer_for(variant: str, policy: Policy, reference=None) -> RLTrainer:
    ppo = variant == "ppo"
    rl = RLConfig(algorithm="ppo" if ppo else "grpo", steps=4, prompts_per_step=3, group_size=4, lr=1e-3,
                  epochs=2 if ppo else 1, minibatches=2 if ppo else 1, max_new_tokens=12)
    critic = ValueModel(policy) if ppo else None
    if variant == "lora":
        policy.enable_lora(r=4, alpha=8)
    elif not ppo:
        policy.keep_reference(reference)  # None: a copy of the weights now
    return RLTrainer(policy, RolloutWorker(policy, render_speech=False), [RewardSpec(REWARD)], rl, LossConfig(),
                     KLConfig(coef=0.0 if ppo else 0.05), seed=0, critic=critic)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["lora", "full", "ppo"])
def test_the_trainer_trains_saves_and_resumes_where_the_policy_lives(variant: str, device: str, tmp_path) -> None:
    policy = tiny_policy(device)
    trainer = trainer_for(variant, policy)
    cursor = PromptCursor(PROMPTS, 0)
    for step in range(2):
        metrics, _ = trainer.step(cursor, step)
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss", "grad_norm", "entropy", "reward/mean"))
    assert metrics["grad_norm"] > 0
    assert {p.device.type for p in policy.model.parameters()} == {device}
    if variant == "ppo":
        assert {p.device.type for p in trainer.critic.parameters()} == {device}
    folder = save_checkpoint(policy, tmp_path, 2, {"stage": "rl", "stage_step": 2, **trainer.state()}, keep_last=1,
                             extra=trainer.save)
    if variant == "lora":
        fresh = tiny_policy(device)
        resumed = trainer_for(variant, fresh)
        fresh.load_trainable_state(load_file(str(folder / ADAPTER_NAME)))
    else:  # the reference stays where RL started (the runner reloads it from checkpoints/base)
        fresh = text_policy(CausalTextLM.from_pretrained(folder).to(device), TOKENIZER)
        resumed = trainer_for(variant, fresh, reference=policy._reference)
    resumed.load_state(read_state(folder), folder)
    for a, b in zip(policy.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(a.detach(), b.detach())
    went_on, _ = trainer.step(PromptCursor(PROMPTS, 5), 2)
    came_back, _ = resumed.step(PromptCursor(PROMPTS, 5), 2)
    for key in ("loss", "reward/mean", "grad_norm"):
        assert came_back[key] == pytest.approx(went_on[key], rel=1e-5, abs=1e-7), key
