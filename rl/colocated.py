"""Colocated generation: the trainer ranks generate the rollouts, each its share of the
prompts with its own policy replica, when a run has `rl.trainers` above 1 and no rollout
workers (`rollouts.num_workers: 0`).

`RankRollouts` is a `RolloutSource` (rollouts/contract.py) over a `TrainerGroup`: the
prompts are cut into contiguous shards, one per rank, and the shards come back in order.
Sampling is seeded per (seed, prompt id, sample), so the rollouts are those one process
generates however the prompts are cut. The ranks trained the weights they generate with,
so a weight sync sends nothing: it stamps the new version, and `verify` compares each
rank's checksum with the driver's. Under ZeRO-3 every rank gathers the whole weights once
for its generation (collectively: a rank with no prompts gathers too).

The trade-off against separate rollout workers (measured in BENCHMARKS.md): colocated
generation needs no extra processes or memory and no weight transfer, but generation and
training take turns on the same processes; rollout workers cost a replica each and a sync
per step, and can generate the next step's rollouts while the ranks train
(`rollouts.async_generation`).
"""

from __future__ import annotations

from vocalign.common.ray_cluster import shard_bounds
from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling
from vocalign.rollouts.contract import PendingRollouts, join_shards
from vocalign.rollouts.sync import WeightSyncError

from .trainer_group import TrainerGroup


class RankRollouts:
    """The `TrainerGroup`'s ranks as the run's rollout source."""

    restarts = 0  # a rank that dies fails the step; the run restarts the group from a checkpoint

    def __init__(self, group: TrainerGroup) -> None:
        self.group = group
        self.version = 0

    def shares_weights(self, policy: Policy) -> bool:
        return False  # the ranks hold their own replicas (the driver's policy is another copy)

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        return self.collect(self.generate_async(prompts, n, sampling, seed))

    def generate_async(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> PendingRollouts:
        """Every rank starts generating its shard (an empty one too: ZeRO-3's gather is collective)."""
        bounds = shard_bounds(len(prompts), self.group.world)
        bounds += [(len(prompts), len(prompts))] * (self.group.world - len(bounds))
        calls = self.group.submit("generate_shard", [(prompts[a:b], n, sampling, seed, self.version) for a, b in bounds])
        return PendingRollouts(prompts, n, self.version, [a for a, _ in bounds], calls)

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        return join_shards(pending, self.group.gather(pending.calls, "generation"))

    def sync(self, state: dict, version: int) -> dict[str, float]:
        """Nothing to send: the ranks hold the weights they trained. Stamps `version`."""
        self.version = version
        return {"bytes": 0.0, "seconds": 0.0}

    def verify(self, version: int, checksum: str) -> None:
        """Raise `WeightSyncError` unless every rank's policy holds the state with `checksum`."""
        held = self.group.policy_checksums()  # read by the update's weight check, not again
        wrong = [f"rank {r} holds checksum {c}" for r, c in enumerate(held) if c != checksum]
        if version != self.version or wrong:
            raise WeightSyncError(
                f"the trainer ranks do not generate with the driver's weights (version {version}, checksum {checksum}; "
                f"stamped {self.version}): {'; '.join(wrong) or 'versions differ'}"
            )

    def close(self) -> None:
        """The group is closed by its owner (the run)."""
