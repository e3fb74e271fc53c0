"""A run as a list of stages, and the checks on a staged recipe's `stages:`.

A recipe without `stages:` is the two-stage run it always was: `sft` (when sft.steps > 0)
then `rl` (when rl.steps > 0), both from the recipe's own sections. A staged recipe
(Step-Audio 2's pipeline, recipes/step_audio2_pipeline.yaml) lists its stages; each
stage's recipe is the recipe's sections with the stage's keys merged over them:

    stages[i] = {name, type, rewards?, data?, sft?, rl?, loss?, kl?, rollouts?, reward_model?}
      -> StagePlan(index, name, type, recipe = recipe's sections <- the stage's keys)

A stage's name labels its rows in metrics.jsonl and W&B (`stage`), its entries in
summary.json, its reward-curve panel, its checkpoints' state and, under LoRA, the base
its adapters adapt (checkpoints/base-<name>). A `reward_model` reward may name an earlier
`reward_model` stage (`params: {stage: NAME}`) instead of a folder; the run then scores
with the model that stage saved in RUN/reward_models/NAME.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stage_spec import RESERVED_STAGE_NAMES, STAGE_SECTIONS, STAGE_TYPES, StageSpec

REWARD_MODELS = "reward_models"  # RUN/reward_models/<stage>: what each reward_model stage trained
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class StagePlan:
    index: int
    name: str
    type: str  # sft, grpo, ppo or reward_model
    recipe: Any  # the Recipe this stage runs with (rl/config.py)
    base: str  # checkpoints/<base>: the weights an RL stage under LoRA adapts
    staged: bool = False  # one of a staged recipe's `stages:` (not the implied sft / rl of a plain recipe)

    @property
    def is_rl(self) -> bool:
        return self.type in ("grpo", "ppo")

    @property
    def steps(self) -> int:
        return self.recipe.sft.steps if self.type == "sft" else self.recipe.rl.steps if self.is_rl else 0


class StageError(ValueError):
    """A stage definition that cannot run, found before anything runs."""


def stage_plans(recipe, run_dir: Path | None = None) -> list[StagePlan]:
    """The stages `recipe` runs, in order; with `run_dir`, `reward_model` rewards that name a
    stage are pointed at the folder that stage saves."""
    if not recipe.stages:
        plans = [StagePlan(0, "sft", "sft", recipe, "base")] if recipe.sft.steps > 0 else []
        if recipe.rl.steps > 0:
            plans.append(StagePlan(len(plans), "rl", recipe.rl.algorithm, recipe, "base"))
        return plans
    plans = [StagePlan(i, s.name, s.type, stage_recipe(recipe, s, i), f"base-{s.name}", True)
             for i, s in enumerate(recipe.stages)]
    if run_dir is not None:
        for plan in plans:
            plan.recipe.rewards = [_resolved(spec, run_dir) for spec in plan.recipe.rewards]
    return plans


def reward_model_folder(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / REWARD_MODELS / stage


def _resolved(spec, run_dir: Path):
    if spec.name != "reward_model" or "stage" not in spec.params:
        return spec
    params = {k: v for k, v in spec.params.items() if k != "stage"}
    params["path"] = str(reward_model_folder(run_dir, str(spec.params["stage"])))
    return dataclasses.replace(spec, params=params)


def stage_recipe(recipe, spec: StageSpec, index: int):
    """The recipe stage `index` runs with: the recipe's sections, the stage's keys merged over them."""
    from omegaconf import OmegaConf

    from .recipe import RecipeError, check_section

    where = f"stages[{index}] ({spec.name or 'unnamed'})"
    overrides: dict = {k: dict(getattr(spec, k)) for k in STAGE_SECTIONS if getattr(spec, k)}
    if spec.type in ("grpo", "ppo"):
        stated = overrides.get("rl", {}).get("algorithm")
        if stated is not None and stated != spec.type:
            raise StageError(f"{where}: type {spec.type} but rl.algorithm={stated}; the type sets the algorithm, "
                             "remove rl.algorithm")
        overrides["rl"] = {**overrides.get("rl", {}), "algorithm": spec.type}
    try:
        for section, value in overrides.items():
            check_section(type(recipe), section, value, f"stages[{index}].{section}")
    except RecipeError as error:
        raise StageError(str(error)) from None
    base = dataclasses.replace(recipe, stages=[])
    merged = OmegaConf.merge(OmegaConf.structured(base), overrides)
    staged = OmegaConf.to_object(merged)
    if spec.rewards:
        staged.rewards = [dataclasses.replace(r, params=dict(r.params)) for r in spec.rewards]
    return staged


def stage_problems(recipe, stage_recipe_problems: Callable[[Any, str], list[str]]) -> list[str]:
    """What is wrong with `recipe.stages`, one line each: names (unique, usable in folder
    names), types, each stage's own recipe (checked by `stage_recipe_problems`, from
    rl/config.py), and reward models named before they are trained."""
    if not recipe.stages:
        return _unstaged_reward_model_problems(recipe)

    problems: list[str] = []
    if recipe.kind == "reward_model":
        return ["kind: reward_model trains one reward model and has no stages; for a pipeline keep kind: policy and "
                "make the reward model a stage (type: reward_model)"]
    seen: dict[str, int] = {}
    trained: list[str] = []  # reward_model stages so far
    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}] ({spec.name or 'unnamed'})"
        if not spec.name:
            problems.append(f"stages[{i}] has no name; give every stage a name (it labels the stage's metrics, "
                            "summary and checkpoints)")
        elif spec.name in seen:
            problems.append(f"stages[{i}].name {spec.name!r} is also the name of stages[{seen[spec.name]}]; stage "
                            "names must differ (they label each stage's metrics, summary and checkpoints)")
        elif spec.name in RESERVED_STAGE_NAMES:
            problems.append(f"stages[{i}].name {spec.name!r} is reserved ({', '.join(RESERVED_STAGE_NAMES)} label the "
                            "evaluation rows); choose another name")
        elif not _NAME.match(spec.name):
            problems.append(f"stages[{i}].name {spec.name!r} must be letters, digits, _ and - (it names folders)")
        if spec.name:
            seen.setdefault(spec.name, i)
        if spec.type not in STAGE_TYPES:
            problems.append(f"{where}: type {spec.type!r} is not a stage type; use one of {', '.join(STAGE_TYPES)}")
            continue
        try:
            staged = stage_recipe(recipe, spec, i)
        except StageError as error:
            problems.append(str(error))
            continue
        problems += [f"{where}: {p}" for p in stage_recipe_problems(staged, spec.type)]
        if spec.type in ("grpo", "ppo"):
            problems += _reward_model_references(staged, where, trained)
        if spec.type == "reward_model":
            trained.append(spec.name)
    return problems


def _reward_model_references(staged, where: str, trained: list[str]) -> list[str]:
    problems = []
    for spec in staged.rewards:
        if spec.name != "reward_model":
            continue
        stage, path = spec.params.get("stage"), spec.params.get("path")
        if stage is not None and path is not None:
            problems.append(f"{where}: reward reward_model has both stage={stage!r} and path={path!r}; give one")
        elif stage is None and path is None:
            problems.append(f"{where}: reward reward_model needs path=FOLDER (a saved reward model) or stage=NAME "
                            f"(a reward_model stage earlier in this recipe{': ' + ', '.join(trained) if trained else ''})")
        elif stage is not None and stage not in trained:
            problems.append(
                f"{where}: reward reward_model uses stage={stage!r}, but no earlier stage of type reward_model is called "
                f"that (earlier reward_model stages: {', '.join(trained) or 'none'}); train it in a stage before this "
                "one, or give path=FOLDER of a saved reward model")
    return problems


def _unstaged_reward_model_problems(recipe) -> list[str]:
    problems = []
    for spec in recipe.rewards:
        if spec.name != "reward_model":
            continue
        if "stage" in spec.params:
            problems.append(f"reward reward_model: stage={spec.params['stage']!r} names a reward_model stage, and this "
                            "recipe has no stages; give path=FOLDER (a saved reward model) instead")
        elif spec.params.get("path") is None:
            problems.append("reward reward_model needs path=FOLDER: a saved reward model (RUN/reward_model of a "
                            "`kind: reward_model` recipe, or RUN/reward_models/<stage> of a staged recipe)")
    return problems
