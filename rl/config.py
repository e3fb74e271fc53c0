"""The recipe schema: every default lives here; a recipe states only what differs.

Recipes are omegaconf YAML validated against `Recipe` (see `vocalign.rl.recipe`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from vocalign.rewards import RewardSpec
from vocalign.rewards.training.reward_model import RewardModelConfig, reward_model_problems

from .omni_recipe import is_omni, omni_problems
from .stage_spec import StageSpec


@dataclass
class RunConfig:
    name: str = ""  # the run folder's prefix; default: the recipe's file name
    output_dir: str | None = None  # default: runs/<name>-<timestamp>
    seed: int = 0
    save_every: int = 50  # checkpoint every N steps of a stage (and at its end)
    keep_last: int = 2  # the newest N checkpoints are kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of N (0: none)
    resume: bool = False  # continue from the latest checkpoint in run.output_dir
    progress: bool = True  # progress bars


@dataclass
class ModelConfig:
    path: str | None = None  # a saved vocalign model folder; None: the embedded default
    max_audio_seconds: float = 4.0  # longest input clip of the embedded default
    # a Qwen2-Audio model.path: the speech detokenizer (a registered name, e.g. espeak_units)
    # whose units become its <audio_k> tokens, so it can learn to speak; unset: it only hears
    # (a folder vocalign saved names its own)
    detokenizer: str | None = None
    # where the policy (and its reference, critic and optimiser state) lives: "auto" = the
    # process's GPU when torch sees one (cuda:LOCAL_RANK under a launcher), else the CPU;
    # or a torch device string ("cpu", "cuda", "cuda:1")
    device: str = "auto"
    # a Qwen2.5-Omni model.path: the voice its talker speaks with (a name in the checkpoint's
    # spk_dict.pt; unset: Chelsie, as the released generate does), the most speech codes per
    # response (50 per second of speech), and the system prompt (unset: Qwen's own, which
    # the released model needs to speak)
    speaker: str | None = None
    max_speech_tokens: int = 256
    system_prompt: str | None = None
    # a Qwen2.5-Omni model.path: the time points token2wav's ODE is solved over (unset: the released 10;
    # fewer render faster and coarser, with the same duration)
    render_steps: int | None = None
    # the weights' dtype for a model.path checkpoint (Qwen2.5-Omni's token2wav stays float32)
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class TaskSpec:
    """A synthetic task (see `vocalign.data.tasks.TASKS`) with its size and options."""

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
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 1, 2 or 3
    config: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class CriticConfig:
    """PPO's value model: the policy's architecture with a scalar value head, its own optimiser."""

    lr: float = 1e-3  # Step-Audio 2 used 2.5e-6 (actor 1e-6) on its 8B model
    warmup_steps: int = 0
    value_clip: float = 0.2  # clip each value's move from its rollout-time estimate (0: no clipping)
    gamma: float = 1.0
    lam: float = 0.95  # GAE's lambda
    lora: bool = True  # under rl.lora.enabled, train the critic's own adapter + head, not all its weights


@dataclass
class RLConfig:
    # data-parallel trainer processes (Ray actors, gradients summed across them; see rl/trainer_group.py)
    trainers: int = 1
    # a trainer process that dies restarts the group from the last checkpoint, at most this many times a run
    trainer_restarts: int = 2
    # Qwen2.5-Omni: which parts train (thinker: its language model; talker: the codec LM); the
    # other part still samples, its tokens left out of the loss. Other models have one part.
    train_parts: list[str] = field(default_factory=lambda: ["thinker", "talker"])
    algorithm: Literal["grpo", "ppo"] = "grpo"  # grpo: the GRPO family (group advantages, no critic); ppo: GAE with a critic
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8  # responses per prompt (PPO may use 1)
    advantage: Literal["group", "rloo", "reinforce++"] = "group"  # the GRPO family's estimator
    # group advantages: divide by the std of each group (GRPO), of the whole batch, or not at all (Dr.GRPO)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill from later prompts
    dynamic_sampling_tries: int = 3  # extra rollout rounds to refill a batch before training on fewer groups
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_decay: Literal["constant", "linear"] = "constant"  # linear: down to 0 at the last step
    grad_clip: float = 1.0
    epochs: int = 1  # passes over each rollout batch (PPO: several)
    minibatches: int = 1  # optimiser steps per epoch (the batch split into this many parts)
    grad_accum: int = 1  # micro-batches per minibatch: gradients accumulate, one optimiser step
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    backend: Literal["torch", "deepspeed"] = "torch"  # deepspeed: full weights through ZeRO (rl.lora.enabled=false)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # the training forward runs each distinct prompt once and its samples reuse its KV cache
    # (same log-probs and gradients; a group of 8 computes its prompt once, not 8 times)
    shared_prompt_forward: bool = True
    # the training forward: "auto" = vocalign's fused FastForward (joined projections, fused
    # RMSNorm/rotary/SwiGLU/log-prob kernels) where it runs the model (Qwen2-family LMs, no
    # gradient checkpointing, not ZeRO-3), else transformers; "fast": it or an error; "hf"
    forward_engine: Literal["auto", "fast", "hf"] = "auto"


@dataclass
class LossConfig:
    # clip: PPO's clipped surrogate on each token's ratio (GRPO, DAPO); gspo: on each sequence's ratio.
    # "ppo" is the old name of "clip" (it also named rl.algorithm=ppo, the critic and GAE): still read, with a warning.
    policy: Literal["clip", "gspo", "ppo"] = "clip"
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO's clip-higher: e.g. 0.28
    ratio_max: float | None = None  # dual clip: cap the ratio of negative-advantage tokens (TRL's delta)
    audio_token_weight: float = 1.0  # weight of audio tokens' loss relative to text tokens'
    mask_truncated: bool = False  # responses cut by max_new_tokens get no loss (DAPO's overlong filtering)


@dataclass
class KLConfig:
    coef: float = 0.0  # 0: no KL and no reference model
    estimator: Literal["k1", "k2", "k3"] = "k3"
    mode: Literal["loss", "reward"] = "loss"  # a loss term, or subtracted from the reward (per token for PPO)
    controller: Literal["fixed", "adaptive"] = "fixed"
    target: float = 0.05  # adaptive: the KL per token to hold
    horizon: int = 1000  # adaptive: how fast the coefficient moves
    max: float = 10.0  # cap on each token's estimate (k3 explodes on tokens the policy learned to avoid)
    importance_weighted: bool = False  # loss mode: weight each token's KL by its ratio to the sampler (TRL's default)


@dataclass
class RolloutConfig:
    render_speech: bool = True  # turn audio tokens into waveforms (needed by speech rewards)
    num_workers: int = 0  # 0: generate in the trainer's process; N: N rollout workers (Ray actors)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: workers are placed with a Ray placement group
    torch_threads: int = 1  # torch threads inside each worker
    timeout_s: float = 600.0  # a worker call taking longer is treated as a dead worker
    max_restarts: int = 3  # restarts of dead workers allowed within one call before the run fails
    # one step off-policy: generate step k+1's rollouts (weights v) while step k updates to v+1
    async_generation: bool = False
    # sampling: "auto" = on CUDA vocalign's static decoder (static KV cache, CUDA graphs), else its
    # fast decoder (merged LoRA, fused projections, in-place KV cache), where they run the model
    # (Qwen2-family LMs; the static one Qwen2.5-Omni too), else transformers; "static"/"fast": that
    # one or an error; "hf": always through transformers
    engine: Literal["auto", "static", "fast", "hf"] = "auto"
    # the static decoder's step compiled by torch.compile before it is captured (fewer kernels a step;
    # a compilation per batch bucket, tens of seconds each)
    compile: bool = False
    tools: list[str] = field(default_factory=list)  # tools the policy may call (multi-turn rollouts)
    max_turns: int = 2  # tool calls per response at most
    tool_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tool, e.g. {retrieval: {root: docs/}}


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray when workers are used; "auto" or "ray://host:10001": join a cluster


@dataclass
class LoggingConfig:
    wandb: bool = True
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key
    project: str = "vocalign"
    entity: str | None = None
    run_name: str | None = None
    audio_every: int = 25  # every N RL steps, a table of generated speech with prompts, transcripts, rewards (0: never)
    audio_samples: int = 4  # rows of that table


@dataclass
class EvalConfig:
    """Held-out evaluation suites (`vocalign eval`) run by the training loop itself."""

    suites: list[str] = field(default_factory=list)  # e.g. [style, spoken_qa]; see `vocalign eval --help`
    every: int = 0  # also every N RL steps (0: only after each stage)
    n: int = 140  # prompts per suite
    variation: dict[str, str] = field(default_factory=dict)  # e.g. {voices: heldout}; default: in distribution


@dataclass
class Recipe:
    description: str = ""
    # what the recipe trains: a policy (SFT, then GRPO) or a preference reward model (`reward_model` section)
    kind: Literal["policy", "reward_model"] = "policy"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    rollouts: RolloutConfig = field(default_factory=RolloutConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("correctness")])
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # a staged pipeline (Step-Audio 2's): the stages run in order, each from the last one's
    # weights, each evaluated with eval.suites before and after; empty: SFT (sft.steps > 0)
    # then RL (rl.steps > 0), as before
    stages: list[StageSpec] = field(default_factory=list)


class RecipeCheckError(ValueError):
    """A recipe whose values do not fit together, found by `check_recipe` before anything runs."""


def check_recipe(recipe: Recipe) -> None:
    """Checks across keys that types alone cannot express; run once, by `runner.train`, before any work starts.

    Old spellings are rewritten to the current ones here, with a warning (`loss.policy=ppo` -> `clip`).
    """
    from vocalign.rewards import check_rewards

    if recipe.loss.policy == "ppo":
        warnings.warn("loss.policy=ppo is now called loss.policy=clip (the token-level clipped ratio); 'ppo' still "
                      "works but will be removed: write clip", FutureWarning, stacklevel=2)
        recipe.loss.policy = "clip"
    from .stages import stage_problems

    problems = _cross_key_problems(recipe)
    problems += _eval_problems(recipe.eval)
    problems += _value_problems(recipe)
    if recipe.kind == "reward_model":
        problems += reward_model_problems(recipe.reward_model)
    problems += stage_problems(recipe, stage_recipe_problems)
    if problems:
        raise RecipeCheckError("recipe problems:\n  " + "\n  ".join(problems))
    try:
        check_rewards(recipe.rewards)
    except ValueError as error:
        raise RecipeCheckError(str(error)) from error


def stage_recipe_problems(recipe: Recipe, stage_type: str) -> list[str]:
    """What is wrong with one stage's recipe (the recipe's sections with the stage's keys merged in)."""
    from vocalign.rewards import check_rewards

    problems = _cross_key_problems(recipe) + _value_problems(recipe, staged=True)
    if stage_type == "sft" and recipe.sft.steps < 1:
        problems.append(f"an sft stage needs sft.steps >= 1 (it has {recipe.sft.steps})")
    if stage_type in ("grpo", "ppo"):
        if recipe.rl.steps < 1:
            problems.append(f"a {stage_type} stage needs rl.steps >= 1 (it has {recipe.rl.steps})")
        try:
            check_rewards(recipe.rewards)
        except ValueError as error:
            problems.append(str(error))
    if stage_type == "reward_model":
        problems += reward_model_problems(recipe.reward_model)
        if is_omni(recipe):
            problems.append("a reward_model stage builds a reward model that hears from the policy, which needs <think> "
                            "(the embedded model, Qwen2-Audio); Qwen2.5-Omni is not supported yet")
    return problems


def _cross_key_problems(recipe: Recipe) -> list[str]:
    problems = []
    rl = recipe.rl
    if recipe.model.dtype != "float32" and recipe.model.path is None:
        problems.append(f"model.dtype={recipe.model.dtype} applies to a model.path checkpoint; the embedded default "
                        "trains in float32: remove model.dtype or set model.path")
    if recipe.model.detokenizer is not None and recipe.model.path is None:
        problems.append(f"model.detokenizer={recipe.model.detokenizer} is for a Qwen2-Audio model.path; the embedded "
                        "default has its own detokenizer: leave model.detokenizer unset or set model.path")
    if rl.algorithm == "grpo" and rl.group_size < 2:
        problems.append(f"rl.group_size={rl.group_size}: GRPO normalises rewards within a group, use 2 or more")
    for key in ("run.keep_last", "run.save_every", "rl.prompts_per_step", "rl.minibatches", "rl.epochs", "rl.grad_accum",
                "rl.group_size", "sft.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(recipe, section), name) < 1:
            problems.append(f"{key}={getattr(getattr(recipe, section), name)} must be at least 1")
    if rl.minibatches * rl.grad_accum > rl.prompts_per_step * rl.group_size:
        problems.append(
            f"rl.minibatches={rl.minibatches} x rl.grad_accum={rl.grad_accum} is more than the "
            f"{rl.prompts_per_step * rl.group_size} responses of a step; lower them"
        )
    if rl.backend == "deepspeed" and rl.lora.enabled:
        problems.append("rl.backend=deepspeed trains full weights: set rl.lora.enabled=false (LoRA trains on rl.backend=torch)")
    if rl.deepspeed.zero_stage not in (1, 2, 3):
        problems.append(f"rl.deepspeed.zero_stage={rl.deepspeed.zero_stage}: use 1, 2 or 3")
    if rl.backend == "deepspeed" and rl.deepspeed.zero_stage == 3 and rl.forward_engine == "fast":
        problems.append("rl.forward_engine=fast reads the weights directly, and ZeRO-3 partitions them across ranks "
                        "(its hooks gather them only inside transformers modules): use rl.forward_engine=auto or hf "
                        "with rl.deepspeed.zero_stage=3, or ZeRO-1/2 for the fast forward")
    if not 0 <= recipe.loss.clip_low < 1 or recipe.loss.clip_high < 0:
        problems.append(f"loss.clip_low={recipe.loss.clip_low} must be in [0, 1) and loss.clip_high={recipe.loss.clip_high} >= 0")
    if recipe.kl.coef < 0:
        problems.append(f"kl.coef={recipe.kl.coef} must be >= 0")
    if recipe.rollouts.num_workers < 0 or recipe.rollouts.max_turns < 1:
        problems.append("rollouts.num_workers must be >= 0 (0: in-process) and rollouts.max_turns >= 1")
    if recipe.rollouts.async_generation and (recipe.rollouts.num_workers < 1 or rl.dynamic_sampling):
        problems.append("rollouts.async_generation needs rollouts.num_workers >= 1 and rl.dynamic_sampling=false")
    if rl.dynamic_sampling and rl.algorithm != "grpo":
        problems.append("rl.dynamic_sampling drops groups with equal rewards: it needs rl.algorithm=grpo")
    problems += _trainer_problems(recipe)
    problems += omni_problems(recipe)
    if rl.algorithm == "ppo" and rl.advantage != "group":
        problems.append(f"rl.advantage={rl.advantage} is for the GRPO family; PPO estimates advantages with GAE and its critic")
    return problems


def _trainer_problems(recipe: Recipe) -> list[str]:
    """`rl.trainers` > 1: what the data-parallel group serves, and a batch that splits over it."""
    rl = recipe.rl
    if rl.trainers < 1 or rl.trainer_restarts < 0:
        return [f"rl.trainers={rl.trainers} must be at least 1 and rl.trainer_restarts={rl.trainer_restarts} at least 0"]
    if rl.trainers == 1:
        return []
    problems = []
    responses = rl.prompts_per_step * rl.group_size
    minibatch = responses // max(1, rl.minibatches)
    if responses % max(1, rl.minibatches) or minibatch % rl.trainers or minibatch // rl.trainers < rl.grad_accum:
        problems.append(
            f"a minibatch of {responses} responses / rl.minibatches={rl.minibatches} does not split over rl.trainers="
            f"{rl.trainers} ranks of at least rl.grad_accum={rl.grad_accum} responses each: make prompts_per_step x "
            f"group_size a multiple of minibatches x trainers x grad_accum"
        )
    return problems


def _eval_problems(cfg: EvalConfig) -> list[str]:
    from vocalign.rl.evaluation import SUITES, Variation

    problems = [f"eval.suites: {name!r} is not a suite; use {', '.join(SUITES)}" for name in cfg.suites if name not in SUITES]
    if cfg.every < 0 or cfg.n < 1:
        problems.append(f"eval.every={cfg.every} must be >= 0 and eval.n={cfg.n} at least 1")
    try:
        Variation.parse([f"{k}={v}" for k, v in cfg.variation.items()])
    except ValueError as e:
        problems.append(f"eval.variation: {e}")
    return problems


def _value_problems(recipe: Recipe, staged: bool = False) -> list[str]:
    """Ranges of numbers, and the files and folders a recipe names: all checked before anything runs."""
    import math
    from pathlib import Path

    sft, rl, loss, kl = recipe.sft, recipe.rl, recipe.loss, recipe.kl
    problems = []

    def need(ok: bool, key: str, value: object, what: str) -> None:
        if not ok:
            problems.append(f"{key}={value} {what}")

    for key, value in (("sft.steps", sft.steps), ("rl.steps", rl.steps), ("sft.warmup_steps", sft.warmup_steps),
                       ("rl.warmup_steps", rl.warmup_steps), ("data.eval_prompts", recipe.data.eval_prompts)):
        need(value >= 0, key, value, "must be >= 0")
    if recipe.kind == "policy" and sft.steps == 0 and rl.steps == 0 and not staged and not recipe.stages:
        problems.append("sft.steps=0 and rl.steps=0: there is nothing to train; set one of them above 0")
    lrs = [("sft.lr", sft.lr), ("rl.lr", rl.lr)] + ([("rl.critic.lr", rl.critic.lr)] if rl.algorithm == "ppo" else [])
    for key, value in lrs:
        need(math.isfinite(value) and value > 0, key, value, "must be a positive learning rate, e.g. 1e-3")
    for key, value in (("sft.grad_clip", sft.grad_clip), ("rl.grad_clip", rl.grad_clip), ("kl.max", kl.max)):
        need(value > 0, key, value, "must be > 0")
    need(rl.temperature > 0, "rl.temperature", rl.temperature, "must be > 0 for sampling; use e.g. 0.01 for near-greedy")
    need(0 < rl.top_p <= 1, "rl.top_p", rl.top_p, "must be in (0, 1]")
    need(rl.max_new_tokens >= 1, "rl.max_new_tokens", rl.max_new_tokens, "must be at least 1")
    need(loss.audio_token_weight >= 0, "loss.audio_token_weight", loss.audio_token_weight, "must be >= 0")
    if loss.ratio_max is not None:
        need(loss.ratio_max > 1 + loss.clip_high, "loss.ratio_max", loss.ratio_max,
             f"must exceed 1 + loss.clip_high = {1 + loss.clip_high} (it caps ratios above the clip)")
    need(0 <= rl.critic.value_clip, "rl.critic.value_clip", rl.critic.value_clip, "must be >= 0 (0: no clipping)")
    need(0 <= rl.critic.gamma <= 1 and 0 <= rl.critic.lam <= 1, "rl.critic.gamma/lam", (rl.critic.gamma, rl.critic.lam),
         "must be in [0, 1]")
    need(recipe.model.max_audio_seconds > 0, "model.max_audio_seconds", recipe.model.max_audio_seconds, "must be > 0")
    for key, value in (("model.path", recipe.model.path), ("data.train_file", recipe.data.train_file),
                       ("data.sft_file", recipe.data.sft_file)):
        if value and not Path(value).exists():
            problems.append(f"{key}={value} does not exist; check the path (relative paths start from {Path.cwd()})")
    for task in recipe.data.sft_tasks + recipe.data.rl_tasks:
        need(task.n >= 0, f"data task {task.name}.n", task.n, "must be >= 0")
    problems += _tool_problems(recipe.rollouts)
    from vocalign.rewards.reward_model import reward_param_problems

    for spec in recipe.rewards:
        problems += reward_param_problems(spec.name, spec.params)
    return problems


def _tool_problems(ro: RolloutConfig) -> list[str]:
    """Every enabled tool is known, and every option set for a tool is one it takes."""
    from vocalign.tools import get_tool

    problems = []
    for name in ro.tools:
        try:
            get_tool(name)
        except ValueError as e:
            problems.append(f"rollouts.tools: {e}")
    # options are keyed by the name the model calls the tool, as the rollouts look them up
    enabled = {}
    for reference in ro.tools:
        try:
            found = get_tool(reference)
            enabled[found.name] = found
        except ValueError:
            continue
    for name, options in ro.tool_options.items():
        if name not in enabled:
            problems.append(f"rollouts.tool_options.{name} is set, but no tool called {name} is in rollouts.tools "
                            f"{list(ro.tools)}; enable it or remove its options (a 'module:function' tool is keyed by "
                            f"its tool name)")
            continue
        tool = enabled[name]
        import difflib

        for key in options:
            if key not in tool.options:
                close = difflib.get_close_matches(key, tool.options, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"rollouts.tool_options.{name}.{key} is not an option of {name}{hint}; "
                                f"it takes {list(tool.options) or 'none'}")
    return problems
