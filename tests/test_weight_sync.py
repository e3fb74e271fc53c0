"""Weight sync to Ray rollout workers, verified by checksum, version and log-probabilities.

The trainer's policy is really updated (a few Adam steps raising the log-probability of
fixed responses), synced, and then every worker must hold the trainer's version and
checksum and score a fixed sequence as the trainer does. A worker left behind or given
other tensors must make `verify` fail, naming the worker and both values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.common.ray_cluster import ensure_ray
from vocalign.rollouts.group import RolloutGroup
from vocalign.rollouts.sync import WeightSyncError, live_state, state_bytes, state_checksum
from vocalign.rollouts.worker import RolloutWorker

LORA = {"r": 4, "alpha": 8}
SAMPLING = Sampling(max_new_tokens=8)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ensure_ray(num_cpus=4)  # logical CPUs: the module's LoRA group (2 workers) lives beside a 1-worker group
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return make_task("arithmetic", 2, seed=3)


@pytest.fixture(scope="module")
def responses(prompts) -> list[list[int]]:
    """Fixed response token ids to train on and to score: samples of the untrained policy."""
    rollouts = RolloutWorker(embedded_policy(0), render_speech=False).generate(prompts, 1, SAMPLING, seed=1)
    return [r.response_ids for r in rollouts]


def train(policy: Policy, prompts, responses: list[list[int]], steps: int = 3) -> None:
    """A real update: Adam steps raising the log-probability of `responses`."""
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    batch = policy.encode_prompts(prompts)
    seq = policy.sequences(batch.ids, responses, batch.encoded)
    for _ in range(steps):
        loss = -(policy.logprobs(seq) * seq.response_mask).sum() / seq.response_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def trainer_logprobs(policy: Policy, prompts, responses) -> list[list[float]]:
    return RolloutWorker(policy, render_speech=False).logprobs(prompts, responses)


def assert_logprobs_close(got: list[list[float]], expected: list[list[float]]) -> None:
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_checksum_is_deterministic_and_sees_every_bit() -> None:
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2, dtype=torch.bfloat16)}
    same = {"a": state["a"].clone(), "b": state["b"].clone()}  # other order, other storage
    assert state_checksum(state) == state_checksum(same)
    flipped = {**same, "b": same["b"].clone()}
    flipped["b"].view(-1).view(torch.int32)[4] ^= 1  # one bit of one element
    assert state_checksum(flipped) != state_checksum(state)
    assert state_checksum({"c": state["a"], "b": state["b"]}) != state_checksum(state)  # a renamed key
    assert state_checksum({**state, "a": state["a"].float()}) != state_checksum(state)  # same values, other dtype
    assert state_bytes(state) == 6 * 4 + 2 * 2


@pytest.fixture(scope="module")
def lora_run():
    """A LoRA policy and its 2 workers, shared by the tests that update it in turn."""
    policy = embedded_policy(0)
    policy.enable_lora(**LORA)
    policy.freeze_encoder()
    with RolloutGroup(policy, 2, render_speech=False, lora_config=LORA) as group:
        yield policy, group


def test_lora_update_synced_and_verified(lora_run, prompts, responses) -> None:
    policy, group = lora_run
    before = trainer_logprobs(policy, prompts, responses)
    assert group.weight_states() == [(0, state_checksum(policy.trainable_state()))] * 2
    train(policy, prompts, responses)
    state = policy.trainable_state()
    checksum = state_checksum(state)
    after = trainer_logprobs(policy, prompts, responses)
    assert max_difference(before, after) > 1e-3  # the update moved the scores: a stale worker shows
    with pytest.raises(WeightSyncError, match="worker 0 holds version 0"):
        group.verify(1, checksum)  # not synced yet

    stats = group.sync(state, 1)
    assert stats["bytes"] == state_bytes(state) == sum(p.numel() * 4 for p in policy.trainable_parameters())
    assert all(key.startswith("base_model.") and "lora_" in key for key in state)  # the adapter only
    group.verify(1, checksum)
    assert group.weight_states() == [(1, checksum)] * 2
    for worker_scores in group.logprobs(prompts, responses):
        assert_logprobs_close(worker_scores, after)
    expected = RolloutWorker(policy, render_speech=False).generate(prompts, 2, SAMPLING, seed=4)
    got = group.generate(prompts, 2, SAMPLING, seed=4)
    assert [r.response_ids for r in got] == [r.response_ids for r in expected]
    assert {r.weight_version for r in got} == {1}

    # a worker that misses a sync: named, with its version and the trainer's
    train(policy, prompts, responses, steps=1)
    state2 = policy.trainable_state()
    checksum2 = state_checksum(state2)
    import ray

    ray.get(group.actor(0).sync.remote(state2, 2))
    with pytest.raises(WeightSyncError) as error:
        group.verify(2, checksum2)
    assert f"worker 1 holds version 1 with checksum {checksum}" in str(error.value)
    assert f"(version 2, checksum {checksum2})" in str(error.value) and "worker 0" not in str(error.value)

    # a worker given other tensors under the right version: caught by the checksum
    tampered = {k: v.clone() for k, v in state2.items()}
    first = sorted(tampered)[0]
    tampered[first] += 1e-6
    ray.get(group.actor(1).sync.remote(tampered, 2))
    with pytest.raises(WeightSyncError) as error:
        group.verify(2, checksum2)
    assert f"worker 1 holds version 2 with checksum {state_checksum(tampered)}" in str(error.value)

    group.sync(state2, 2)  # a full sync repairs both
    group.verify(2, checksum2)


def test_workers_enable_lora_from_the_config_and_take_the_adapter(prompts, responses) -> None:
    """Built from the base policy, the workers add LoRA themselves (the trainer adds the same
    after), and the first sync makes them equal to the trainer."""
    policy = embedded_policy(0)
    policy.freeze_encoder()
    with RolloutGroup(policy, 1, render_speech=False, lora_config=LORA) as group:
        policy.enable_lora(**LORA)
        train(policy, prompts, responses, steps=2)
        state = policy.trainable_state()
        group.sync(state, 1)
        group.verify(1, state_checksum(state))
        assert_logprobs_close(group.logprobs(prompts, responses)[0], trainer_logprobs(policy, prompts, responses))
        group.version = 5  # a resumed trainer restamps the weights the workers already hold
        assert group.weight_states() == [(5, state_checksum(state))]


def test_a_lora_config_other_than_the_policys_is_refused() -> None:
    policy = embedded_policy(0)
    policy.enable_lora(**LORA)
    with pytest.raises(ValueError, match="does not match the policy's LoRA"):
        RolloutGroup(policy, 1, lora_config={"r": 16, "alpha": 8})


def test_one_step_off_policy_generation_with_a_worker_lost_on_the_way(lora_run, prompts, responses) -> None:
    """Rollouts started at version v are collected after the sync to version v+1: they carry
    version v and are version v's samples, even though a worker is killed in between and
    its replacement is built at version v+1; afterwards every worker is at version v+1."""
    import ray

    policy, group = lora_run
    v, restarts = group.version + 1, group.restarts
    train(policy, prompts, responses, steps=1)
    group.sync(policy.trainable_state(), v)
    expected = RolloutWorker(policy, render_speech=False).generate(prompts, 2, SAMPLING, seed=4)
    pending = group.generate_async(prompts, 2, SAMPLING, seed=4)
    ray.kill(group.actor(1))
    train(policy, prompts, responses, steps=1)  # the trainer updates while the workers generate
    state = policy.trainable_state()
    group.sync(state, v + 1)
    got = group.collect(pending)
    assert [r.response_ids for r in got] == [r.response_ids for r in expected]
    assert {r.weight_version for r in got} == {v}
    assert group.restarts == restarts + 1
    group.verify(v + 1, state_checksum(state))


def test_full_weight_update_synced_and_verified(prompts, responses) -> None:
    policy = embedded_policy(0)
    policy.freeze_encoder()
    with RolloutGroup(policy, 1, render_speech=False) as group:
        train(policy, prompts, responses, steps=2)
        state = policy.trainable_state()
        stats = group.sync(state, 1)
        trainable = policy.trainable_parameters()
        assert len(state) == len(trainable) and not any(key.startswith("encoder.") for key in state)
        assert stats["bytes"] == sum(p.numel() * p.element_size() for p in trainable)
        group.verify(1, state_checksum(state))
        assert state_checksum(live_state(policy)) == state_checksum(state)  # the trainer's own view agrees
        assert_logprobs_close(group.logprobs(prompts, responses)[0], trainer_logprobs(policy, prompts, responses))

