"""The `vocalign` command: train a recipe, export a checkpoint, list rewards, list recipes."""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _train(args: argparse.Namespace) -> int:
    from .config import Recipe, check_recipe
    from .recipe import load_recipe, resolve_recipe_path
    from .runner import train

    path = resolve_recipe_path(args.recipe)
    recipe = load_recipe(path, args.overrides, Recipe)
    try:
        check_recipe(recipe)
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    train(recipe, path.stem)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import ExportError, export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.out, force=args.force)
    except ExportError as e:
        raise UsageError(str(e)) from None
    how = "LoRA adapter merged into its base" if result.merged_lora else "full weights"
    print(f"exported step {result.step} ({result.stage}, {how}) to {result.out}; load it with "
          f"vocalign.model.loading.load_policy({str(result.out)!r})")
    return 0


def _rewards(_: argparse.Namespace) -> int:
    from vocalign.rewards import list_rewards

    for info in list_rewards():
        params = ", ".join(f"{k}={v!r}" for k, v in info.params.items())
        print(f"{info.name:<24} {info.doc}")
        if params:
            print(f"{'':<24} params: {params}")
    return 0


def _recipes(_: argparse.Namespace) -> int:
    from .recipe import list_recipes

    for name, description in list_recipes():
        print(f"{name:<24} {description}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vocalign",
        description="RL post-training for speech language models (Step-Audio 2 style).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe: vocalign train RECIPE [key=value ...]")
    t.add_argument("recipe", help="a recipe YAML file, or the name of a packaged recipe (see `vocalign recipes`)")
    t.add_argument("overrides", nargs="*", help="recipe overrides as dotted key=value, e.g. rl.steps=20 logging.wandb=false")
    t.set_defaults(fn=_train)
    e = sub.add_parser(
        "export",
        help="merge a checkpoint's LoRA adapter into its base and save a loadable model with a model card: "
        "vocalign export RUN_DIR/checkpoints/step-N OUT",
    )
    e.add_argument("checkpoint", help="a checkpoint folder, RUN_DIR/checkpoints/step-N")
    e.add_argument("out", help="the folder to write (new or empty; see --force)")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    e.set_defaults(fn=_export)
    sub.add_parser("rewards", help="list the registered rewards with their parameters").set_defaults(fn=_rewards)
    sub.add_parser("recipes", help="list the packaged recipes").set_defaults(fn=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Rewards named `module:function` may live next to the recipe, as with `python -m`.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from .recipe import RecipeError

    try:
        return args.fn(args)
    except (RecipeError, FileNotFoundError, UsageError) as e:
        print(f"vocalign: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
