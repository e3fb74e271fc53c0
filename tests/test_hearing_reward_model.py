"""The reward model that hears: built from a policy, trained on spoken pairs, saved, loaded and
served by the `reward_model` reward (batched, the same scores as one at a time)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.data.types import Rollout
from vocalign.model.loading import embedded_policy
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.hearing_reward_model import HearingRewardModel, is_hearing_reward_model, load_hearing_reward_model
from vocalign.rewards.training.hearing_reward_model import hearing_pairwise_accuracy, train_hearing_reward_model
from vocalign.rewards.training.preference_data import PAIR_KINDS, spoken_pairs


@pytest.fixture(scope="module")
def questions():
    return make_task("arithmetic", 10, 7, voices="default", noise="none")


@pytest.fixture(scope="module")
def trained(questions, tmp_path_factory):
    policy = embedded_policy(0)
    pairs = spoken_pairs(questions, 1, PAIR_KINDS)
    before = HearingRewardModel(policy)
    model, info = train_hearing_reward_model(policy, pairs, steps=3, batch_size=4, lr=1e-3, warmup_steps=1, seed=0,
                                             progress=False)
    folder = model.save(tmp_path_factory.mktemp("rm") / "rm", {"note": "test"})
    return policy, pairs, before, model, info, folder


def test_spoken_pairs_carry_their_question_and_its_audio(questions) -> None:
    pairs = spoken_pairs(questions, 1, PAIR_KINDS)
    assert [p.kind for p in pairs] == [PAIR_KINDS[i % len(PAIR_KINDS)] for i in range(len(questions))]
    for pair, prompt in zip(pairs, questions):
        assert pair.prompt is prompt and pair.question == prompt.meta["question"]
        assert pair.chosen != pair.rejected
    correct = [p for p in pairs if p.kind == "correct"]
    assert all(str(p.prompt.meta["answer"]) in p.chosen or p.chosen.split()[-1] for p in correct)
    held = spoken_pairs(questions, 2, PAIR_KINDS, exclude=pairs)
    assert not {p.key for p in held} & {p.key for p in pairs}


def test_it_starts_from_the_policy_and_trains_the_judge_only(trained) -> None:
    policy, _, before, model, info, _ = trained
    start = dict(policy.model.named_parameters())
    judge = dict(model.body.named_parameters())
    ear = dict(model.ear.named_parameters())
    # the ear and the encoder stay the policy's; the judge's language model moved
    assert all(torch.equal(ear[n], start[n]) for n in start)
    assert all(torch.equal(judge[n], start[n]) for n in start if n.startswith("encoder."))
    assert any(not torch.equal(judge[n], start[n]) for n in start if n.startswith("lm."))
    assert not torch.equal(model.head.weight, before.head.weight)
    assert math.isfinite(info["final_loss"]) and info["steps"] == 3


def test_saved_and_loaded_it_scores_the_same_batched_or_one_by_one(trained) -> None:
    _, pairs, _, model, _, folder = trained
    assert is_hearing_reward_model(folder) and (folder / "ear" / "model.safetensors").is_file()
    loaded = load_hearing_reward_model(folder)
    prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
    expected = model.score(prompts, responses)
    batched = loaded.score(prompts, responses)
    one_by_one = [loaded.score([p], [r])[0] for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one_by_one, batched, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 4))) > 1, "different responses get different scores"
    accuracy = hearing_pairwise_accuracy(loaded, pairs)
    assert set(accuracy) == {"accuracy", *(f"accuracy/{k}" for k in PAIR_KINDS)}


def test_the_reward_model_reward_serves_it_on_rollouts(trained) -> None:
    _, pairs, _, model, _, folder = trained
    rollouts = [Rollout(p.prompt, p.chosen, "", "", [], None, 16000, [], [], []) for p in pairs[:4]]
    got = score(rollouts, [RewardSpec("reward_model", params={"path": str(folder), "source": "text"})])
    raw = model.score([r.prompt for r in rollouts], [r.text for r in rollouts])
    np.testing.assert_allclose(got.components["reward_model"], [1 / (1 + math.exp(-v)) for v in raw], atol=1e-5)


def test_it_needs_a_policy_without_adapters(questions) -> None:
    policy = embedded_policy(0)
    policy.enable_lora(r=2, alpha=4)
    with pytest.raises(ValueError, match="without LoRA adapters"):
        HearingRewardModel(policy)


def test_a_folder_without_its_head_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no hearing reward model"):
        load_hearing_reward_model(tmp_path)
