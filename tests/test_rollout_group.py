"""Rollout workers on Ray give the in-process worker's rollouts, however the prompts are split.

A local Ray (2 CPUs, small object store) for the first tests, then a simulated two-node
cluster (`ray.cluster_utils.Cluster`) for the placement test. The policy is the embedded
one with a bias on its output layer towards `<tts_start>` and a few audio units, so that
some responses speak and their waveforms travel back from the workers.

espeak-ng carries hidden state between utterances (see data/synthetic.py), so rendering
the same units twice differs by a few samples even in one process: waveforms are
compared by presence, rate and length, token ids and texts exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from vocalign.data.tasks import make_task
from vocalign.data.types import Rollout
from vocalign.model import chat
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.common.ray_cluster import ensure_ray, shard_bounds
from vocalign.rollouts.group import RolloutGroup
from vocalign.rollouts.worker import RolloutWorker

SAMPLING = Sampling(max_new_tokens=10)
N = 2


def speaking_policy() -> Policy:
    """The embedded policy, biased to open speech and say audio units 40-59."""
    policy = embedded_policy(0)
    head = policy.model.lm.lm_head
    bias = torch.zeros(head.out_features)
    bias[policy.tokenizer.special[chat.TTS_START]] = 6.0
    bias[policy.tokenizer.audio_offset + 40 : policy.tokenizer.audio_offset + 60] = 6.0
    head.bias = nn.Parameter(bias)
    return policy


def assert_same_rollouts(got: list[Rollout], expected: list[Rollout]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.prompt.id, g.group) == (e.prompt.id, e.group)
        assert g.prompt is e.prompt  # the driver's own prompt objects, not copies
        assert g.response_ids == e.response_ids and g.prompt_ids == e.prompt_ids
        assert (g.text, g.spoken_text, g.raw_text, g.audio_tokens, g.finished) == (e.text, e.spoken_text, e.raw_text, e.audio_tokens, e.finished)
        np.testing.assert_allclose(g.logprobs, e.logprobs, atol=1e-5, rtol=0)
        assert (g.waveform is None) == (e.waveform is None)
        if e.waveform is not None:
            assert g.sample_rate == e.sample_rate and g.waveform.dtype == np.float32
            assert abs(len(g.waveform) - len(e.waveform)) <= 0.01 * len(e.waveform)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return speaking_policy()


@pytest.fixture(scope="module")
def prompts():
    return make_task("arithmetic", 4, seed=7)


@pytest.fixture(scope="module")
def expected(policy: Policy, prompts) -> list[Rollout]:
    rollouts = RolloutWorker(policy).generate(prompts, N, SAMPLING, seed=11)
    assert any(r.waveform is not None and len(r.waveform) > 0 for r in rollouts), "no rollout speaks: the test sees no waveform"
    assert any(r.waveform is None for r in rollouts)
    return rollouts


@pytest.fixture(scope="module")
def local_group(policy: Policy):
    import ray

    ensure_ray(num_cpus=2)
    try:
        with RolloutGroup(policy, 2, render_speech=True) as group:
            yield group
    finally:
        ray.shutdown()


def test_shards_are_contiguous_balanced_and_cover_every_prompt() -> None:
    assert shard_bounds(3, 2) == [(0, 2), (2, 3)]
    assert shard_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert shard_bounds(1, 3) == [(0, 1)]  # fewer prompts than workers: the others idle


def test_two_workers_give_the_in_process_rollouts(local_group: RolloutGroup, prompts, expected) -> None:
    got = local_group.generate(prompts, N, SAMPLING, seed=11)
    assert_same_rollouts(got, expected)
    assert all(r.weight_version == 0 for r in got)


def test_an_uneven_split_gives_the_same_samples(local_group: RolloutGroup, policy: Policy, prompts, expected) -> None:
    # 3 prompts over 2 workers (2 + 1): each prompt's samples are those it gets in the batch of 4
    got = local_group.generate(prompts[1:], N, SAMPLING, seed=11)
    assert_same_rollouts(got, [dataclass_shift(r, -1) for r in expected[N:]])  # group index shifts by one prompt


def dataclass_shift(r: Rollout, by: int) -> Rollout:
    import dataclasses

    return dataclasses.replace(r, group=r.group + by)


def test_each_worker_is_its_own_process(local_group: RolloutGroup) -> None:
    pids = [pid for pid, _ in local_group.worker_info()]
    assert len(set(pids)) == 2 and os.getpid() not in pids


def test_the_group_and_the_in_process_worker_are_both_rollout_sources(local_group: RolloutGroup, policy: Policy,
                                                                        prompts, expected) -> None:
    from vocalign.rollouts.contract import RolloutSource

    worker = RolloutWorker(policy)
    assert isinstance(worker, RolloutSource) and isinstance(local_group, RolloutSource)
    assert worker.shares_weights(policy) and not local_group.shares_weights(policy)  # replicas get synced weights
    assert_same_rollouts(worker.collect(worker.generate_async(prompts, N, SAMPLING, seed=11)), expected)
    with pytest.raises(ValueError, match="started by a RolloutGroup"):
        worker.collect(local_group.generate_async(prompts[:1], N, SAMPLING, seed=11))


def test_bad_settings_are_refused_with_the_key_named(policy: Policy) -> None:
    with pytest.raises(ValueError, match="needs num_workers >= 1 .* use RolloutWorker"):
        RolloutGroup(policy, 0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RolloutGroup(policy, 1, timeout_s=0)
    with pytest.raises(ValueError, match="placement 'DIAGONAL'"):
        RolloutGroup(policy, 1, placement="DIAGONAL")


def test_more_workers_than_a_local_ray_holds_fail_at_once(local_group: RolloutGroup, policy: Policy) -> None:
    with pytest.raises(ValueError, match=r"3 rollout workers x rollouts.cpus_per_worker=1 need 3 CPUs, but the local Ray has 2"):
        RolloutGroup(policy, 3)


def test_workers_spread_over_two_nodes_of_a_cluster(local_group: RolloutGroup, policy: Policy, prompts, expected) -> None:
    """Two Ray nodes (one CPU each, and a resource naming each node); STRICT_SPREAD puts one
    worker on each, and the rollouts are still the in-process ones."""
    import ray
    from ray.cluster_utils import Cluster

    local_group.close()
    ray.shutdown()
    store = 80 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "object_store_memory": store})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=store)
        cluster.wait_for_nodes()
        ensure_ray(address=cluster.address)
        with RolloutGroup(policy, 2, placement="STRICT_SPREAD") as group:
            nodes = [node for _, node in group.worker_info()]
            alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            assert len(set(nodes)) == 2 and set(nodes) == set(alive)
            assert {name for n in nodes for name in alive[n] if name.startswith("node_")} == {"node_a", "node_b"}
            assert_same_rollouts(group.generate(prompts, N, SAMPLING, seed=11), expected)
    finally:
        ray.shutdown()
        cluster.shutdown()
