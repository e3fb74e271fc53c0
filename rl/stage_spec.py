"""A staged recipe's stage as the schema sees it (`Recipe.stages`); what a stage runs is in rl/stages.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vocalign.rewards import RewardSpec

STAGE_TYPES = ("sft", "grpo", "ppo", "reward_model")
STAGE_SECTIONS = ("data", "sft", "rl", "loss", "kl", "rollouts", "reward_model")
RESERVED_STAGE_NAMES = ("initial", "eval")  # the before-any-stage evaluation, and evaluation rows in metrics.jsonl


@dataclass
class StageSpec:
    """One stage of a staged recipe (`stages:`): what it runs, and what it changes.

    `type`: sft (the supervised warm start), grpo or ppo (RL; sets rl.algorithm) or
    reward_model (a reward model that hears, initialised from the policy as it is then).
    The sections hold only the keys that differ from the recipe's own sections, e.g.
    `rl: {steps: 20, lr: 5e-4}`; `rewards`, when given, replaces the recipe's list. Each
    stage starts from the weights the stage before it left."""

    name: str = ""
    type: str = ""
    rewards: list[RewardSpec] = field(default_factory=list)  # empty: the recipe's rewards
    data: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    rl: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    kl: dict[str, Any] = field(default_factory=dict)
    rollouts: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] = field(default_factory=dict)
