"""The rollout contract: what the trainer asks of whatever generates its rollouts.

Two classes satisfy it: `RolloutWorker` (rollouts/worker.py), which generates in the
trainer's process, and `RolloutGroup` (rollouts/group.py), which shards generation over
Ray actors. The trainer is typed against `RolloutSource` and calls nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling


@dataclass
class PendingRollouts:
    """Rollouts being generated: returned by `generate_async`, redeemed by `collect`."""

    prompts: list[Prompt]
    n: int
    version: int  # the weight version the rollouts are generated with
    starts: list[int]  # index of each shard's first prompt
    calls: list[Any] = field(default_factory=list)  # the Ray calls generating each shard
    local: list[Rollout] | None = None  # generated already (in-process)


def join_shards(pending: PendingRollouts, shards: list[list[Rollout]]) -> list[Rollout]:
    """The shards' rollouts in prompt order, each given back its prompt (shards leave it out)
    and its group index in the whole batch."""
    rollouts: list[Rollout] = []
    for start, shard in zip(pending.starts, shards):
        for r in shard:
            r.prompt = pending.prompts[start + r.group]
            r.group += start
        rollouts += shard
    return rollouts


@runtime_checkable
class RolloutSource(Protocol):
    """Generates rollouts with weights it can prove it holds."""

    version: int  # the weight version every rollout is stamped with
    restarts: int  # workers replaced after a failure since the start (0 in-process)

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`n` rollouts per prompt, grouped by prompt (rollout i*n+j is sample j of prompt i)."""
        ...

    def generate_async(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> PendingRollouts:
        """Start generating with the weights held now; `collect` returns the rollouts."""
        ...

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        ...

    def shares_weights(self, policy: Policy) -> bool:
        """Whether it generates with `policy`'s own tensors (then a sync only restamps the version)."""
        ...

    def sync(self, state: dict[str, torch.Tensor], version: int) -> dict[str, float]:
        """Take the trainer's trainable state, stamped `version`; returns {"bytes", "seconds"}."""
        ...

    def verify(self, version: int, checksum: str) -> None:
        """Raise `WeightSyncError` unless every replica holds `version` with `checksum`."""
        ...

    def close(self) -> None:
        """Release what it holds (Ray actors); the trainer's run calls it once at the end."""
        ...
