"""The job a `kind: reward_model` recipe runs: train a preference reward model and measure it.

    recipe -> run folder (config.yaml) -> synthetic preference pairs (train; held out:
    another seed, no training triple repeated) -> TRL RewardTrainer -> run_dir/reward_model/
    -> pairwise accuracy on the held-out pairs, overall and per pair kind
    -> metrics.jsonl / W&B per logging step, summary.json

The saved folder is what the `reward_model` reward's `path` param names.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from vocalign.rewards.training.preference_data import held_out_pairs, preference_pairs
from vocalign.rewards.reward_model import load_reward_model
from vocalign.rewards.training.reward_model import pairwise_accuracy, train_reward_model

from .checkpoint import seed_everything
from .config import Recipe
from .recipe import to_dict
from .run_folder import RunFolderError, claim, mark_failed, new_run_folder
from .tracking import RunTracker, read_metrics

MODEL_FOLDER = "reward_model"


def train_reward_model_job(recipe: Recipe, recipe_name: str, force: bool = False) -> Path:
    """Train the recipe's reward model, save it in the run folder and report held-out accuracy; returns the run folder.

    `vocalign.rl.runner.train` checks the recipe and then calls this for `kind: reward_model`.
    An existing run in the folder is refused unless `force` (see `vocalign.rl.run_folder`);
    a reward-model run has no checkpoints, so it cannot resume."""
    seed_everything(recipe.run.seed)
    run_dir = new_run_folder(recipe.run.output_dir, recipe.run.name or recipe_name)
    if recipe.run.resume:
        raise RunFolderError("run.resume=true: a reward-model run saves no checkpoints to continue from; run it again "
                             "in a new run.output_dir (or add --force to replace the old one)")
    existed = run_dir.exists()
    claim(run_dir, False, force)
    try:
        return _train_reward_model(recipe, run_dir)
    except BaseException as error:
        mark_failed(run_dir, existed, bool((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir / "metrics.jsonl")), error)
        raise


def _train_reward_model(recipe: Recipe, run_dir: Path) -> Path:
    cfg = recipe.reward_model
    started = time.perf_counter()
    with RunTracker(run_dir, to_dict(recipe), recipe.logging) as tracker:
        say = tqdm.write
        say(f"run folder: {run_dir}")
        train = preference_pairs(cfg.train_pairs, recipe.data.seed, cfg.kinds, cfg.max_operand)
        held_out = held_out_pairs(cfg.eval_pairs, recipe.data.seed + 1, train, cfg.kinds, cfg.max_operand)
        say(f"data: {len(train)} preference pairs, {len(held_out)} held out ({', '.join(cfg.kinds)})")

        def log(step: int, metrics: dict[str, float]) -> None:
            tracker.log({"stage": "reward_model", **metrics}, step=step)

        trained = train_reward_model(
            train, run_dir / MODEL_FOLDER, cfg, recipe.run.seed, progress=recipe.run.progress, on_log=log
        )
        held_out_accuracy = pairwise_accuracy(load_reward_model(trained.path), held_out)
        per_kind = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in held_out_accuracy.items() if "/" in k)
        say(
            f"reward model: {trained.parameters / 1e6:.2f}M parameters, {trained.steps} steps in {trained.seconds:.0f} s; "
            f"held-out pairwise accuracy {held_out_accuracy['accuracy']:.3f} ({per_kind})"
        )
        summary = {
            "parameters": trained.parameters,
            "train_pairs": len(train),
            "held_out_pairs": len(held_out),
            "final_train_loss": trained.final_loss,
            "held_out": held_out_accuracy,
            "model_path": str(trained.path),
            "train_time_s": trained.seconds,
            "time_s": time.perf_counter() - started,
        }
        tracker.summary(summary)
    say(f"done in {summary['time_s']:.0f} s. Outputs in {run_dir}: config.yaml, metrics.jsonl, summary.json, {MODEL_FOLDER}/")
    return run_dir
