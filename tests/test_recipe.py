"""Recipes: YAML + overrides validated against a dataclass tree, and the errors users see.

The schema here mimics the shape of the real config (`vocalign.rl.config`) with every
kind of field a recipe uses, so the machinery is tested independently of its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml
from omegaconf import MISSING

from vocalign.rl.recipe import (
    RecipeError,
    describe,
    is_secret_key,
    list_recipes,
    load_recipe,
    packaged_recipes_dir,
    redact_secrets,
    resolve_recipe_path,
    to_dict,
    to_yaml,
)


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str | None = None
    seed: int = 0


@dataclass
class TrainerConfig:
    algorithm: Literal["grpo", "ppo"] = "grpo"
    learning_rate: float = 1e-6
    steps: int = 10
    use_lora: bool = False
    max_new_tokens: Optional[int] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RewardSpec:
    name: str = MISSING
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "vocalign"
    entity: str | None = None
    mode: str = "auto"
    api_key: str | None = None


@dataclass
class Recipe:
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides or [], Recipe)
    message = str(caught.value)
    assert message.startswith(str(path)), "every recipe error names the recipe file"
    assert "full_key" not in message and "object_type" not in message  # no raw omegaconf text
    assert caught.value.__suppress_context__  # no omegaconf traceback chained to it
    return message


RECIPE = """\
# Small GRPO run on arithmetic.
trainer:
  algorithm: ppo
  learning_rate: 3e-4
  tags: [arith, small]
rewards:
  - name: correctness
    weight: 2
  - name: asr_match
    params: {model: tiny, lang: [en]}
"""


def test_recipe_loads_into_real_dataclasses_with_converted_types(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, RECIPE), [], Recipe)

    assert isinstance(recipe, Recipe)
    assert recipe.trainer == TrainerConfig(
        algorithm="ppo", learning_rate=3e-4, tags=["arith", "small"]
    )
    assert recipe.rewards == [
        RewardSpec(name="correctness", weight=2.0),
        RewardSpec(name="asr_match", params={"model": "tiny", "lang": ["en"]}),
    ]
    assert isinstance(recipe.rewards[0].weight, float)
    assert recipe.run == RunConfig(), "what the recipe does not state keeps its default"


def test_overrides_use_dotted_keys_list_indices_and_yaml_values(tmp_path: Path) -> None:
    overrides = [
        "trainer.learning_rate=1e-4",
        "trainer.use_lora=true",
        "trainer.max_new_tokens=64",
        "logging.wandb=false",
        "run.output_dir=/tmp/x",
        "rewards[0].weight=0.5",
        "rewards.1.params.lang=[en, de]",
        "trainer.tags=[]",
        "run.name=${trainer.algorithm}-run",
    ]
    recipe = load_recipe(write(tmp_path, RECIPE), overrides, Recipe)

    assert recipe.trainer.learning_rate == pytest.approx(1e-4)
    assert recipe.trainer.use_lora is True
    assert recipe.trainer.max_new_tokens == 64
    assert recipe.trainer.tags == []
    assert recipe.logging.wandb is False
    assert recipe.run.output_dir == "/tmp/x"
    assert recipe.rewards[0].weight == 0.5
    assert recipe.rewards[1].params == {"model": "tiny", "lang": ["en", "de"]}
    assert recipe.run.name == "ppo-run"


def test_a_whole_list_of_sections_can_be_replaced_by_an_override(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, RECIPE), ["rewards=[{name: format}]"], Recipe)
    assert recipe.rewards == [RewardSpec(name="format")]


def test_unknown_key_suggests_the_closest_key_with_its_full_path(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, "trainer:\n  lr: 1e-4\n"))
    assert message.endswith(
        "recipe key 'trainer.lr' is not known; did you mean 'trainer.learning_rate'?"
    )
    assert "did you mean 'trainer'?" in load_error(write(tmp_path, "trainr: {steps: 3}\n"))


def test_unknown_key_without_a_close_match_lists_the_section_keys(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, "trainer:\n  optimizer: adam\n"))
    assert message.endswith(
        "recipe key 'trainer.optimizer' is not known; the keys in 'trainer' are: "
        "algorithm, learning_rate, steps, use_lora, max_new_tokens, tags"
    )
    top = load_error(write(tmp_path, "zzz: 1\n"))
    assert top.endswith(
        "the keys in the top level are: description, run, trainer, rewards, logging"
    )


def test_unknown_key_inside_a_list_entry_names_its_index(tmp_path: Path) -> None:
    yaml_text = "rewards:\n  - name: a\n  - name: b\n    wieght: 2\n"
    message = load_error(write(tmp_path, yaml_text))
    assert message.endswith(
        "recipe key 'rewards[1].wieght' is not known; did you mean 'rewards[1].weight'?"
    )


def test_unknown_override_key_is_reported_with_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE)
    message = load_error(path, ["trainer.lr=1e-4"])
    assert message == (
        f"{path}, override 'trainer.lr=1e-4': recipe key 'trainer.lr' is not known; "
        "did you mean 'trainer.learning_rate'?"
    )
    for override in ("rewards[0].wieght=2", "rewards.0.wieght=2"):
        assert load_error(path, [override]).endswith(
            "recipe key 'rewards[0].wieght' is not known; did you mean 'rewards[0].weight'?"
        )
    listed = load_error(path, ["rewards=[{name: a, wieght: 2}]"])
    assert "'rewards[0].wieght' is not known" in listed


def test_wrong_types_name_key_expected_type_and_value(tmp_path: Path) -> None:
    cases = {
        "trainer: {steps: ten}": "recipe key 'trainer.steps' expects int, got 'ten'",
        "trainer: {steps: 2.5}": "recipe key 'trainer.steps' expects int, got 2.5",
        "trainer: {use_lora: maybe}": "recipe key 'trainer.use_lora' expects bool, got 'maybe'",
        "trainer: {algorithm: dpo}": (
            "recipe key 'trainer.algorithm' expects one of 'grpo', 'ppo', got 'dpo'"
        ),
        "trainer: {max_new_tokens: lots}": (
            "recipe key 'trainer.max_new_tokens' expects int or null, got 'lots'"
        ),
        "trainer: {tags: [[a]]}": "recipe key 'trainer.tags[0]' expects str, got ['a']",
        "trainer: 5": "recipe key 'trainer' expects a TrainerConfig section, got 5",
        "run: {seed: null}": "recipe key 'run.seed' expects int, got null",
        "rewards: [{name: a}, {name: b, weight: heavy}]": (
            "recipe key 'rewards[1].weight' expects float, got 'heavy'"
        ),
        "rewards: {name: a}": (
            "recipe key 'rewards' expects a list of RewardSpec sections, got {'name': 'a'}"
        ),
    }
    for yaml_text, expected in cases.items():
        assert load_error(write(tmp_path, yaml_text)).endswith(expected), yaml_text


def test_wrong_override_type_is_reported_with_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE)
    assert load_error(path, ["trainer.steps=ten"]) == (
        f"{path}, override 'trainer.steps=ten': recipe key 'trainer.steps' expects int, got 'ten'"
    )
    assert load_error(path, ["rewards[1].weight=[1]"]).endswith(
        "recipe key 'rewards[1].weight' expects float, got [1]"
    )


def test_missing_required_values_are_named(tmp_path: Path) -> None:
    one = load_error(write(tmp_path, "rewards:\n  - weight: 2\n"))
    assert one.endswith(
        "recipe key 'rewards[0].name' is required but has no value; set it in the recipe "
        "or add the override rewards[0].name=VALUE"
    )
    two = load_error(write(tmp_path, "rewards: [{weight: 2}, {name: '???'}]\n"))
    assert "recipe keys 'rewards[0].name', 'rewards[1].name' are required" in two


def test_missing_value_can_be_supplied_by_an_override(tmp_path: Path) -> None:
    path = write(tmp_path, "rewards:\n  - weight: 2\n")
    recipe = load_recipe(path, ["rewards[0].name=format"], Recipe)
    assert recipe.rewards == [RewardSpec(name="format", weight=2.0)]


def test_malformed_overrides_say_how_to_write_one(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE)
    for override in ("trainer.steps", "=3"):
        message = load_error(path, [override])
        assert message == (
            f"{path}, override '{override}': an override is written key=value with a "
            "dotted key, e.g. trainer.learning_rate=1e-4 or rewards[0].weight=2"
        )
    assert "the value is not valid YAML" in load_error(path, ["trainer.tags=[a,"])


def test_override_paths_that_cannot_exist_are_explained(tmp_path: Path) -> None:
    path = write(tmp_path, RECIPE)
    assert load_error(path, ["rewards[5].weight=1"]).endswith(
        "recipe key 'rewards[5]' is out of range: 'rewards' has 2 entries; "
        "to replace the whole list write rewards=[...]"
    )
    assert load_error(path, ["rewards.weight=1"]).endswith(
        "recipe key 'rewards' is a list; address an entry by its index, e.g. rewards[0]"
    )
    assert load_error(path, ["trainer.steps.max=1"]).endswith(
        "recipe key 'trainer.steps' holds a single value (int); it has no key 'max'"
    )


def test_broken_yaml_and_broken_interpolations_are_recipe_errors(tmp_path: Path) -> None:
    assert load_error(write(tmp_path, "trainer: {steps: 1\n")).endswith(
        "(line 2)"
    ), "the YAML problem carries its line"
    assert "found duplicate key steps (line 3)" in load_error(
        write(tmp_path, "trainer:\n  steps: 1\n  steps: 2\n")
    )
    assert "must be a mapping of keys" in load_error(write(tmp_path, "- a\n- b\n"))
    dangling = load_error(write(tmp_path, "run: {name: '${trainer.nope}'}\n"))
    assert "recipe key 'run.name'" in dangling and "trainer.nope" in dangling


def test_secrets_are_redacted_in_yaml_but_token_counts_stay(tmp_path: Path) -> None:
    yaml_text = RECIPE + "logging: {api_key: sk-live-123}\n"
    path = write(tmp_path, yaml_text)
    overrides = ["trainer.max_new_tokens=64", "rewards[1].params.hf_token=hf_abc"]
    recipe = load_recipe(path, overrides, Recipe)

    text = to_yaml(recipe)
    data = yaml.safe_load(text)

    assert "sk-live-123" not in text and "hf_abc" not in text
    assert data["logging"]["api_key"] == "<redacted>"
    assert data["rewards"][1]["params"]["hf_token"] == "<redacted>"
    assert data["trainer"]["max_new_tokens"] == 64
    assert data["trainer"]["learning_rate"] == pytest.approx(3e-4)
    assert data["rewards"][0] == {"name": "correctness", "weight": 2.0, "params": {}}
    assert to_dict(recipe) == data


def test_which_names_count_as_secrets() -> None:
    secret = ["api_key", "WANDB_API_KEY", "apiKey", "password", "db_passwd", "client_secret",
              "token", "hf_token", "access-token", "Secret"]
    not_secret = ["max_new_tokens", "tokenizer", "audio_tokens", "audio_token_weight", "pad_token", "eos_token",
                  "learning_rate", "keywords"]
    assert [name for name in secret if not is_secret_key(name)] == []
    assert [name for name in not_secret if is_secret_key(name)] == []
    assert redact_secrets({"a": [{"token": "x", "n": 1}], "password": None}) == {
        "a": [{"token": "<redacted>", "n": 1}],
        "password": None,  # nothing set, nothing to hide
    }


def test_describe_prefers_the_description_field_then_the_head_comment(tmp_path: Path) -> None:
    described = write(tmp_path, "# a comment\ndescription: GRPO on arithmetic\n", "a.yaml")
    commented = write(tmp_path, "\n#\n#  PPO stage 1: think length\ntrainer: {}\n", "b.yaml")
    body_comment = write(tmp_path, "trainer:\n  steps: 3  # not a description\n", "c.yaml")

    assert describe(described) == "GRPO on arithmetic"
    assert describe(commented) == "PPO stage 1: think length"
    assert describe(body_comment) == ""


def test_recipes_are_found_by_path_or_by_name(tmp_path: Path) -> None:
    write(tmp_path, "description: the demo\n", "demo.yaml")
    write(tmp_path, "# stage two\n", "ppo_stage2.yaml")
    (tmp_path / "notes.txt").write_text("not a recipe")

    assert list_recipes(recipes_dir=tmp_path) == [("demo", "the demo"), ("ppo_stage2", "stage two")]
    assert resolve_recipe_path("demo", recipes_dir=tmp_path) == tmp_path / "demo.yaml"
    assert resolve_recipe_path("demo.yaml", recipes_dir=tmp_path) == tmp_path / "demo.yaml"
    assert resolve_recipe_path(tmp_path / "ppo_stage2.yaml") == tmp_path / "ppo_stage2.yaml"

    with pytest.raises(RecipeError) as unknown:
        resolve_recipe_path("dmeo", recipes_dir=tmp_path)
    assert str(unknown.value) == (
        f"recipe 'dmeo' not found: no file 'dmeo' and no recipe named 'dmeo' in {tmp_path}; "
        "recipes available by name: demo, ppo_stage2; or pass the path of a .yaml file"
    )
    with pytest.raises(RecipeError, match="no file '/nowhere/x.yaml'"):
        resolve_recipe_path("/nowhere/x.yaml", recipes_dir=tmp_path)


def test_packaged_recipes_folder_is_the_vocalign_recipes_package() -> None:
    folder = packaged_recipes_dir()
    assert (folder / "__init__.py").is_file()
    for name, description in list_recipes():
        assert resolve_recipe_path(name) == folder / f"{name}.yaml"
        assert isinstance(description, str)


def test_the_old_name_of_the_clip_loss_still_works_with_a_warning() -> None:
    """`loss.policy: ppo` named the token-level clipped loss, like `rl.algorithm: ppo` names PPO
    with a critic; it is now `clip`. Recipes that say `ppo` still run, and are told the new name."""
    from vocalign.rl.config import Recipe, check_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "demo.yaml", ["loss.policy=ppo"], Recipe)
    with pytest.warns(FutureWarning, match="loss.policy=ppo is now called loss.policy=clip"):
        check_recipe(recipe)
    assert recipe.loss.policy == "clip"
    fresh = load_recipe(Path(__file__).parent.parent / "recipes" / "demo.yaml", [], Recipe)
    assert fresh.loss.policy == "clip"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_recipe(fresh)  # the current name gives no warning
