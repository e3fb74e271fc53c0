"""The `vocalign` command: train a recipe, evaluate, export a checkpoint, list rewards, list recipes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, exit status 2."""


def _train(args: argparse.Namespace) -> int:
    from . import spmd
    from .config import Recipe, RecipeCheckError
    from .recipe import load_recipe, resolve_recipe_path
    from .runner import train

    path = resolve_recipe_path(args.recipe)
    recipe = load_recipe(path, args.overrides, Recipe)
    launch = spmd.launched()  # one of several processes of torchrun or the deepspeed launcher
    if launch is not None:
        rank, world = launch
        if recipe.rl.trainers not in (1, world):
            raise UsageError(f"{path}: rl.trainers={recipe.rl.trainers} but the launcher started {world} processes: "
                             f"leave rl.trainers at 1 (the launcher's count is used) or set it to {world}")
        recipe.rl.trainers = world
        link = spmd.start()
        if rank > 0:
            link.follow()  # serve rank 0, which runs the run and writes everything
            return 0
    try:
        train(recipe, path.stem, force=args.force)  # checks the recipe before anything runs
    except RecipeCheckError as e:
        raise UsageError(f"{path}: {e}") from None
    finally:
        if launch is not None:
            spmd.link().stop()  # the other ranks return
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


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import SUITES, Variation, evaluate_targets, get_suite, resolve_targets
    from .evaluation.report import write_report

    # bad input raises ValueError (or FileNotFoundError) naming the file, row or option: main reports it
    suites = [get_suite(name) for name in (args.suite or list(SUITES))]
    variation = Variation.parse(args.variation)
    data = dict(_pair(item, "--data") for item in args.data)
    for name in data:
        get_suite(name)
    missing = [name for name in data if name not in {s.name for s in suites}]
    if missing:
        raise UsageError(f"--data names suites {missing} that this run does not evaluate; add --suite for them")
    if args.n < 1:
        raise UsageError(f"--n {args.n}: give the number of prompts per suite, at least 1")
    targets = resolve_targets(args.targets)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--out {out} is not empty; choose another folder or pass --force to replace its files")
    report = evaluate_targets(targets, suites, n=args.n, seed=args.seed, variation=variation, data=data,
                              on_bad_row=args.on_bad_row, max_new_tokens=args.max_new_tokens)
    written = write_report(report, out)
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return 0


def _pair(item: str, flag: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key or not value:
        raise ValueError(f"{flag} {item!r} is not SUITE=PATH")
    return key, value


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


def _tiny_omni(args: argparse.Namespace) -> int:
    from vocalign.model.omni_tiny import write_tiny_omni

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; name a new folder for the tiny Qwen2.5-Omni")
    write_tiny_omni(out, seed=args.seed)
    print(f"a tiny random Qwen2.5-Omni (released layout) in {out}: vocalign train omni_speech_cpu model.path={out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vocalign",
        description="RL post-training for speech language models (Step-Audio 2 style).",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its one-line message")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe: vocalign train RECIPE [key=value ...]")
    t.add_argument("recipe", help="a recipe YAML file, or the name of a packaged recipe (see `vocalign recipes`)")
    t.add_argument("overrides", nargs="*", help="recipe overrides as dotted key=value, e.g. rl.steps=20 logging.wandb=false")
    t.add_argument("--force", action="store_true",
                   help="replace the files of a previous run in run.output_dir (otherwise such a folder is refused)")
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
    v = sub.add_parser(
        "eval",
        help="score runs, checkpoints or models on held-out suites, side by side with 95%% intervals: "
        "vocalign eval TARGET... [--suite NAME ...] [--n N] [--out DIR]",
        description="Greedy responses of each TARGET to the same held-out prompts, scored per suite; writes "
        "eval.json, eval.md, samples.jsonl and plots to --out. Suites: spoken_qa, style, transcription, "
        "perception, tool_use (default: all).",
    )
    v.add_argument("targets", nargs="+", metavar="TARGET",
                   help="a run folder (its newest checkpoint), RUN/checkpoints/step-N, a model folder "
                   "(RUN/checkpoints/base, an exported model) or 'embedded'; NAME=TARGET names it")
    v.add_argument("--suite", action="append", metavar="NAME", help="a suite to run (repeat for several; default: all)")
    v.add_argument("--n", type=int, default=200, help="prompts per suite (default 200; with --data: at most this many rows)")
    v.add_argument("--out", default="eval", help="the folder to write (default ./eval)")
    v.add_argument("--variation", action="append", default=[], metavar="KEY=VALUE",
                   help="how the synthetic speech differs from training: voices=train|heldout|default, "
                   "prosody=narrow|train|wide, noise=none|train|heavy, operands=LO-HI (repeatable)")
    v.add_argument("--data", action="append", default=[], metavar="SUITE=PATH",
                   help="your own data for a suite instead of synthetic prompts (formats: docs/evaluation.md)")
    v.add_argument("--on-bad-row", choices=("raise", "skip"), default="raise",
                   help="a bad row of --data stops the run (raise) or is skipped and listed (skip)")
    v.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and the bootstrap")
    v.add_argument("--max-new-tokens", type=int, default=48, help="response length limit per turn (default 48)")
    v.add_argument("--force", action="store_true", help="write into a non-empty --out")
    v.set_defaults(fn=_eval)
    sub.add_parser("rewards", help="list the registered rewards with their parameters").set_defaults(fn=_rewards)
    sub.add_parser("recipes", help="list the packaged recipes").set_defaults(fn=_recipes)
    o = sub.add_parser("tiny-omni", help="write a tiny random Qwen2.5-Omni in the released layout (for the CPU recipe)")
    o.add_argument("out", help="the folder to write (new or empty)")
    o.add_argument("--seed", type=int, default=0, help="seed of the random weights and voices (default 0)")
    o.set_defaults(fn=_tiny_omni)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line
    p = parser()
    args, extra = p.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if extra:  # overrides after an option (`train demo --force rl.steps=3`) are overrides too
        if args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    # Rewards named `module:function` may live next to the recipe, as with `python -m`.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = str(e) if isinstance(e, ValueError) or not getattr(e, "filename", None) else f"{e.strerror}: {e.filename}"
        print(f"vocalign: {message}", file=sys.stderr)
        return 2


# What bad input raises: bad recipe values, data rows, folders and checkpoints (ValueError and
# its kinds: RecipeError, BadRowError, CheckpointError, RunFolderError, UnicodeDecodeError ...)
# and missing files. They are reported in one line with exit status 2; --debug shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


if __name__ == "__main__":
    sys.exit(main())
