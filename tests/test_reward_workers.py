"""Reward workers: rewards scored in Ray actors on a local Ray, and async rewards run together.

The rewards live in a module written to a temporary folder and named `module:function`,
as a user's would be: the actors must import it from the driver's path.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest

from vocalign.data.types import Message, Prompt, Rollout
from vocalign.rewards import RewardError, RewardSpec, registry, reward, score
from vocalign.rewards.workers import RewardWorkers

USER_REWARDS = textwrap.dedent('''
    import os

    def text_length(rollouts, scale: float = 1.0):
        """len(text) * scale, so every sample's score is known in advance."""
        return [scale * len(r.text) for r in rollouts]

    def worker_pid(rollouts):
        return [float(os.getpid())] * len(rollouts)

    def fails_on_bad(rollouts):
        return [1.0 / (0 if r.prompt.id.startswith("bad") else 1) for r in rollouts]
''')


def make_rollout(text: str, prompt_id: str = "p0") -> Rollout:
    prompt = Prompt(id=prompt_id, messages=[Message("human", "hello")])
    return Rollout(
        prompt=prompt, text=text, think="", spoken_text="", audio_tokens=[], waveform=None,
        sample_rate=16000, prompt_ids=[], response_ids=[], logprobs=[],
    )


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory):
    import ray

    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / "user_rewards_for_workers.py").write_text(USER_REWARDS)
    sys.path.insert(0, str(folder))
    try:
        with RewardWorkers() as pool:
            yield pool
    finally:
        ray.shutdown()
        sys.path.remove(str(folder))


ROLLOUTS = [make_rollout("a" * n, f"p{n}") for n in range(7)]


def test_remote_scores_equal_local_scores_in_order(workers: RewardWorkers) -> None:
    local = RewardSpec("user_rewards_for_workers:text_length", params={"scale": 0.5})
    remote = RewardSpec("user_rewards_for_workers:text_length", params={"scale": 0.5}, workers=3)
    expected = [0.5 * n for n in range(7)]
    assert score(ROLLOUTS, [local]).components[local.name] == expected
    scores = score(ROLLOUTS, [remote], workers=workers)
    assert scores.components[remote.name] == expected
    assert scores.total == expected


def test_each_replica_is_its_own_process_and_scores_a_shard(workers: RewardWorkers) -> None:
    spec = RewardSpec("user_rewards_for_workers:worker_pid", workers=2)
    pids = workers.pids(spec)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    got = score(ROLLOUTS, [spec], workers=workers).components[spec.name]
    # 7 rollouts in 2 shards: the first 4 to replica 0, the last 3 to replica 1
    assert got == [float(pids[0])] * 4 + [float(pids[1])] * 3


def test_remote_failures_follow_on_error_and_the_actor_survives(workers: RewardWorkers) -> None:
    batch = [make_rollout("x", "ok-0"), make_rollout("x", "bad-1"), make_rollout("x", "ok-2")]
    zero = RewardSpec("user_rewards_for_workers:fails_on_bad", on_error="zero", workers=1)
    scores = score(batch, [zero], workers=workers)
    assert scores.components[zero.name] == [1.0, 0.0, 1.0]
    assert scores.failed[zero.name] == 1
    assert scores.metrics()[f"reward/{zero.name}/failed"] == 1.0

    raising = RewardSpec("user_rewards_for_workers:fails_on_bad", workers=1)
    with pytest.raises(RewardError, match="failed on prompt 'bad-1': ZeroDivisionError"):
        score(batch, [raising], workers=workers)
    # the same actor scores the next batch
    assert score(batch[:1], [raising], workers=workers).components[raising.name] == [1.0]


def test_remote_rewards_need_workers() -> None:
    with pytest.raises(ValueError, match="asks for workers=2 but no reward workers were given"):
        score(ROLLOUTS, [RewardSpec("correctness", workers=2)])


def test_workers_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError, match="workers=-1 must be 0"):
        RewardSpec("correctness", workers=-1)


def test_async_rewards_run_concurrently(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())
    running: list[int] = []
    overlaps: list[int] = []

    def make(name: str):
        @reward(name)
        async def judge(rollouts: list[Rollout]) -> list[float]:
            running.append(1)
            await asyncio.sleep(0.2)
            overlaps.append(len(running))  # how many were in flight at once
            running.pop()
            return [1.0] * len(rollouts)

    for name in ("judge_a", "judge_b", "judge_c"):
        make(name)
    scores = score(ROLLOUTS[:2], [RewardSpec("judge_a"), RewardSpec("judge_b"), RewardSpec("judge_c")])
    assert scores.total == [3.0, 3.0]
    assert max(overlaps) == 3  # all three were awaiting at the same time
