"""Rollout workers that die or hang mid-generate are replaced; no sample is lost or doubled.

`FaultyActor` is the real rollout actor with one switch: on its next `generate_shard`
it exits the process (as a crash or an OOM kill would) or sleeps (as a hung worker
would). The group must replace the worker, give the replacement the last synced weights
at their version, run the shard again, and return exactly the in-process rollouts.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.data.types import Audio, Message, Prompt
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.common.ray_cluster import ensure_ray
from vocalign.rollouts.group import RolloutGroup, RolloutWorkerError
from vocalign.rollouts.sync import state_checksum
from vocalign.rollouts.worker import RolloutActor, RolloutWorker

SAMPLING = Sampling(max_new_tokens=8)
N = 2
LORA = {"r": 4, "alpha": 8}


class FaultyActor(RolloutActor):
    """A rollout actor that exits or hangs on its next generate_shard, when told to."""

    _fault: tuple[str, float] | None = None

    def set_fault(self, kind: str, seconds: float = 0.0) -> None:
        self._fault = (kind, seconds)

    def generate_shard(self, *args):
        fault, self._fault = self._fault, None
        if fault is not None and fault[0] == "exit":
            os._exit(1)
        if fault is not None and fault[0] == "hang":
            time.sleep(fault[1])
        return super().generate_shard(*args)


class FaultyGroup(RolloutGroup):
    """A group of FaultyActors; `fault_for_new_actors` is set on every replacement it starts."""

    actor_class = FaultyActor
    fault_for_new_actors: tuple[str, float] | None = None

    def _build(self, index: int, options: dict):
        actor = super()._build(index, options)
        if self.fault_for_new_actors is not None:
            actor.set_fault.remote(*self.fault_for_new_actors)
        return actor


@pytest.fixture(scope="module")
def policy() -> Policy:
    """A LoRA policy whose adapter is not the initial one, so a replacement without the synced
    state would generate other samples."""
    policy = embedded_policy(0)
    policy.enable_lora(**LORA)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return policy


@pytest.fixture(scope="module")
def prompts():
    return make_task("arithmetic", 4, seed=5)


@pytest.fixture(scope="module")
def expected(policy: Policy, prompts):
    return RolloutWorker(policy, render_speech=False).generate(prompts, N, SAMPLING, seed=9)


@pytest.fixture(scope="module")
def group(policy: Policy):
    import ray

    ensure_ray(num_cpus=4)  # logical CPUs: a replacement need not wait for the CPU of the worker it replaces
    try:
        base = embedded_policy(0)
        base.enable_lora(**LORA)  # the workers start from the initial adapter: only the sync brings the policy's
        with FaultyGroup(base, 2, render_speech=False, timeout_s=60, max_restarts=3) as group:
            state = policy.trainable_state()
            group.sync(state, 7)
            group.verify(7, state_checksum(state))
            yield group
    finally:
        ray.shutdown()


def assert_same_samples(got, expected) -> None:
    assert len(got) == len(expected) == 4 * N
    assert [(r.prompt.id, r.group) for r in got] == [(r.prompt.id, r.group) for r in expected]
    assert [r.response_ids for r in got] == [r.response_ids for r in expected]
    assert {r.weight_version for r in got} == {7}


def test_a_worker_that_dies_mid_generate_is_replaced(group: FaultyGroup, prompts, expected) -> None:
    import ray

    old_pid = group.worker_info()[0][0]
    ray.get(group.actor(0).set_fault.remote("exit"))
    restarts = group.restarts
    assert_same_samples(group.generate(prompts, N, SAMPLING, seed=9), expected)
    assert group.restarts == restarts + 1
    assert group.worker_info()[0][0] != old_pid


def test_a_worker_that_hangs_past_the_timeout_is_killed_and_replaced(group: FaultyGroup, prompts, expected) -> None:
    import ray

    ray.get(group.actor(1).set_fault.remote("hang", 600.0))
    restarts, group.timeout_s = group.restarts, 6.0
    try:
        t0 = time.monotonic()
        assert_same_samples(group.generate(prompts, N, SAMPLING, seed=9), expected)
        assert time.monotonic() - t0 < 120  # it did not wait for the 600 s sleep
    finally:
        group.timeout_s = 60
    assert group.restarts == restarts + 1


def test_restarts_run_out_with_a_clear_error_and_the_group_recovers(group: FaultyGroup, prompts, expected) -> None:
    import ray

    ray.get(group.actor(0).set_fault.remote("exit"))
    group.fault_for_new_actors, group.max_restarts = ("exit", 0.0), 1  # the replacement dies too
    restarts = group.restarts
    try:
        with pytest.raises(RolloutWorkerError, match=r"rollout worker 0 died \(.*\); gave up after 1 restarts in one call"):
            group.generate(prompts, N, SAMPLING, seed=9)
        assert group.restarts == restarts + 1
    finally:
        group.fault_for_new_actors, group.max_restarts = None, 3
    # the next call replaces the dead worker and completes
    assert_same_samples(group.generate(prompts, N, SAMPLING, seed=9), expected)
    assert group.restarts == restarts + 2


def test_a_worker_error_is_raised_not_retried(group: FaultyGroup, prompts) -> None:
    """An exception inside generate is a bug, not a lost worker: raised at once, with its cause."""
    too_long = Prompt(id="long", messages=[Message("human", "hi", audio=Audio(np.zeros(16000 * 30, dtype=np.float32), 16000))])
    restarts = group.restarts
    with pytest.raises(RolloutWorkerError, match=r"worker 1 raised in generate_shard: ValueError: audio clip 0 is 30.00 s long"):
        group.generate([*prompts[:2], too_long], N, SAMPLING, seed=9)
    assert group.restarts == restarts
