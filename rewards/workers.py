"""Reward workers: heavy rewards (ASR, classifiers, reward models) scored in Ray actors.

A recipe entry with `workers: N` (N >= 1) is scored by N replicas of `RewardActor`, each
a Ray actor that resolves the reward once and keeps whatever it loads (an ASR model, a
classifier) in its own process between calls. `RewardWorkers.submit` splits the rollout
batch into N contiguous shards, one per replica, and returns at once; `result` gathers
the shards back in order. Each replica scores its shard with one batched call, with the
same per-sample failure policy (`on_error`) as in-process scoring, so a failing reward
raises a `RewardError` in the driver and never takes its actor down.

`workers: 0` (the default) scores in the driver process: the local mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vocalign.common.ray_cluster import ensure_ray, shard_bounds, task_error_cause
from vocalign.data.types import Rollout

from .registry import RewardError, RewardSpec, _run, get_reward

class RewardActor:
    """Scores one reward (a RewardSpec) on the shards it is sent; run as a Ray actor."""

    def __init__(self, spec: RewardSpec, torch_threads: int = 1) -> None:
        import torch

        # Replicas share the machine's cores: one thread each unless told otherwise.
        torch.set_num_threads(torch_threads)
        self.spec, self.fn = spec, get_reward(spec.name)

    def score(self, rollouts: list[Rollout]) -> tuple[list[float | None], int]:
        return _run(self.spec, self.fn, rollouts)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Pending:
    spec: RewardSpec
    shards: list[tuple[Any, list[Rollout]]]  # (object ref, the shard's rollouts)


class RewardWorkers:
    """The Ray actors of every remote reward, created on first use; a context manager.

    `torch_threads` is each actor's torch thread count; `actor_cpus` the CPUs Ray
    reserves per actor (0 lets reward actors share cores with rollout and training work).
    """

    def __init__(self, torch_threads: int = 1, actor_cpus: float = 0.0) -> None:
        self.torch_threads, self.actor_cpus = torch_threads, actor_cpus
        self._actors: dict[str, list[Any]] = {}

    def actors(self, spec: RewardSpec) -> list[Any]:
        """The replicas for `spec` (one set per distinct name, params and on_error)."""
        key = repr((spec.name, sorted(spec.params.items()), spec.on_error, spec.workers))
        if key not in self._actors:
            import ray

            ensure_ray()
            remote = ray.remote(num_cpus=self.actor_cpus)(RewardActor)
            self._actors[key] = [remote.remote(spec, self.torch_threads) for _ in range(spec.workers)]
        return self._actors[key]

    def submit(self, spec: RewardSpec, rollouts: list[Rollout]) -> _Pending:
        """Start scoring `rollouts` with `spec` on its replicas; returns at once."""
        actors = self.actors(spec)
        shards = [rollouts[a:b] for a, b in shard_bounds(len(rollouts), len(actors))] if rollouts else []
        return _Pending(spec, [(actor.score.remote(shard), shard) for actor, shard in zip(actors, shards)])

    def result(self, pending: _Pending) -> tuple[list[float | None], int]:
        """The scores of a submitted batch, in the batch's order, and its failure count."""
        import ray

        scores: list[float | None] = []
        failures = 0
        for ref, shard in pending.shards:
            try:
                shard_scores, shard_failures = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                cause = task_error_cause(error)
                if isinstance(cause, RewardError):
                    raise RewardError(str(cause)) from cause
                raise RewardError(
                    f"reward {pending.spec.name!r} failed in its Ray worker on a shard of {len(shard)} rollouts: "
                    f"{type(cause).__name__}: {cause}"
                ) from cause
            scores += shard_scores
            failures += shard_failures
        return scores, failures

    def pids(self, spec: RewardSpec) -> list[int]:
        """The process id of each replica of `spec` (they differ from the driver's)."""
        import ray

        return ray.get([actor.pid.remote() for actor in self.actors(spec)])

    def close(self) -> None:
        if not self._actors:  # nothing started: Ray need not even be installed
            return
        import ray

        for replicas in self._actors.values():
            for actor in replicas:
                ray.kill(actor)
        self._actors.clear()

    def __enter__(self) -> RewardWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
