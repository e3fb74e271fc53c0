"""The recipe schema: every default lives here; a recipe states only what differs.

Recipes are omegaconf YAML validated against `Recipe` (see `vocalign.rl.recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vocalign.rewards import RewardSpec
from vocalign.rewards.reward_model import RewardModelConfig, reward_model_problems


@dataclass
class RunConfig:
    name: str = ""  # the run folder's prefix; default: the recipe's file name
    output_dir: str | None = None  # default: runs/<name>-<timestamp>
    seed: int = 0
    save_every: int = 50  # checkpoint every N steps of a stage (and at its end)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    progress: bool = True  # progress bars


@dataclass
class ModelConfig:
    path: str | None = None  # a saved vocalign model folder; None: the embedded default
    max_audio_seconds: float = 4.0  # longest input clip of the embedded default


@dataclass
class TaskSpec:
    """A synthetic task (see `vocalign.data.synthetic.TASKS`) with its size and options."""

    name: str = "arithmetic"
    n: int = 1000
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    sft_tasks: list[TaskSpec] = field(default_factory=list)  # SFT warm-start data
    rl_tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec()])  # RL prompts
    train_file: str | None = None  # user data (jsonl/parquet/HF folder) for RL instead of rl_tasks
    sft_file: str | None = None  # user data with `response` targets for SFT, added to sft_tasks
    on_bad_row: Literal["raise", "skip"] = "raise"
    eval_prompts: int = 64  # held-out prompts scored greedily after each stage
    seed: int = 0


@dataclass
class SFTConfig:
    steps: int = 0  # 0 skips the warm start
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0


@dataclass
class LoRAConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0


@dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_decay: Literal["constant", "linear"] = "constant"  # linear: down to 0 at the last step
    grad_clip: float = 1.0
    minibatches: int = 1  # optimiser steps per rollout batch (the batch split into this many parts)
    clip_eps: float = 0.2  # PPO clip range of the importance ratio
    kl_coef: float = 0.0  # weight of the k3 KL to the reference in the loss; 0 loads no reference
    kl_max: float = 10.0  # cap on each token's k3 estimate (it explodes on tokens the policy avoids)
    scale_rewards: bool = True  # divide group advantages by the group's reward std
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class RolloutConfig:
    render_speech: bool = True  # turn audio tokens into waveforms (needed by speech rewards)


@dataclass
class LoggingConfig:
    wandb: bool = True
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key
    project: str = "vocalign"
    entity: str | None = None
    run_name: str | None = None


@dataclass
class Recipe:
    description: str = ""
    # what the recipe trains: a policy (SFT, then GRPO) or a preference reward model (`reward_model` section)
    kind: Literal["policy", "reward_model"] = "policy"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("correctness")])
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)


def check_recipe(recipe: Recipe) -> None:
    """Checks across keys that types alone cannot express; run before any work starts."""
    from vocalign.rewards import check_rewards

    problems = []
    if recipe.grpo.group_size < 2:
        problems.append(f"grpo.group_size={recipe.grpo.group_size}: GRPO normalises rewards within a group, use 2 or more")
    for key in ("run.keep_last", "run.save_every", "grpo.prompts_per_step", "grpo.minibatches", "sft.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(recipe, section), name) < 1:
            problems.append(f"{key}={getattr(getattr(recipe, section), name)} must be at least 1")
    if recipe.grpo.steps > 0 and recipe.grpo.kl_coef > 0 and not recipe.grpo.lora.enabled:
        problems.append(
            "grpo.kl_coef > 0 needs grpo.lora.enabled=true for now: the reference model is the base "
            "with the adapters disabled (a frozen full-weight reference is not built yet); set grpo.kl_coef=0"
        )
    if recipe.kind == "reward_model":
        problems += reward_model_problems(recipe.reward_model)
    if problems:
        raise ValueError("recipe problems:\n  " + "\n  ".join(problems))
    check_rewards(recipe.rewards)
