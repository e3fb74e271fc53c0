"""The run loop: one readable driver from a recipe to a trained policy.

    recipe -> run folder (config.yaml) -> policy -> data
    -> SFT warm start (full weights)            [optional]
    -> GRPO on the LoRA adapter (encoder frozen)
    -> metrics.jsonl / W&B each step, checkpoints, summary.json, reward_curve.png
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vocalign.data.synthetic import make_task
from vocalign.data.types import Prompt
from vocalign.data.user_data import load_prompts
from vocalign.model.loading import embedded_policy, load_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.rewards import score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.worker import RolloutWorker

from .checkpoint import save_base, save_checkpoint
from .config import Recipe, TaskSpec, check_recipe
from .grpo import GRPOTrainer
from .recipe import to_dict
from .sft import SFTTrainer
from .tracking import RunTracker

GREEDY_TEMPERATURE = 1e-4  # near-greedy: sampling needs a temperature above 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_folder(recipe: Recipe, recipe_name: str) -> Path:
    if recipe.run.output_dir:
        return Path(recipe.run.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe.run.name or recipe_name}-{stamp}"


def synthetic_prompts(tasks: list[TaskSpec], seed: int) -> list[Prompt]:
    prompts: list[Prompt] = []
    for k, task in enumerate(tasks):
        prompts += make_task(task.name, task.n, seed + 7919 * k, **task.params)
    return prompts


def build_data(recipe: Recipe) -> tuple[list[Prompt], list[Prompt], list[Prompt], dict[str, int]]:
    """SFT prompts, RL prompts and held-out evaluation prompts (different seeds: no overlap)."""
    d, skipped = recipe.data, {}
    sft = synthetic_prompts(d.sft_tasks, d.seed) if recipe.sft.steps > 0 else []
    if d.sft_file and recipe.sft.steps > 0:
        loaded = load_prompts(d.sft_file, on_bad_row=d.on_bad_row)
        sft += loaded.prompts
        skipped["sft_file"] = loaded.skipped
    if d.train_file:
        loaded = load_prompts(d.train_file, on_bad_row=d.on_bad_row)
        rl, skipped["train_file"] = loaded.prompts, loaded.skipped
        if len(rl) <= d.eval_prompts:
            raise ValueError(f"data.train_file {d.train_file} has {len(rl)} usable rows; it needs more than data.eval_prompts={d.eval_prompts}")
        rl, held_out = rl[d.eval_prompts :], rl[: d.eval_prompts]
    else:
        rl = synthetic_prompts(d.rl_tasks, d.seed + 1)
        held_out = synthetic_prompts([TaskSpec(t.name, d.eval_prompts, t.params) for t in d.rl_tasks[:1]], d.seed + 2)
    if not rl:
        raise ValueError("no RL prompts: set data.rl_tasks or data.train_file")
    return sft, rl, held_out, skipped


def evaluate(
    worker: RolloutWorker, prompts: list[Prompt], recipe: Recipe, reward_workers: RewardWorkers | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Greedy responses to held-out prompts, scored by the recipe's rewards."""
    sampling = Sampling(GREEDY_TEMPERATURE, 1.0, recipe.grpo.max_new_tokens)
    rollouts = []
    for i in range(0, len(prompts), batch_size):
        rollouts += worker.generate(prompts[i : i + batch_size], 1, sampling, seed=0)
    return score(rollouts, recipe.rewards, reward_workers).metrics()


_ENDS = {"first 10%": (0.0, 0.1), "last 10%": (0.9, 1.0)}


def _mean_of(rows: list[dict], key: str, lo: float, hi: float) -> float:
    """The mean of rows[key] over the steps from fraction `lo` to `hi` of the stage (NaN-free values only)."""
    part = rows[int(lo * len(rows)) : max(int(lo * len(rows)) + 1, int(hi * len(rows)))]
    values = [r[key] for r in part if not np.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def train(recipe: Recipe, recipe_name: str) -> Path:
    """Run a recipe end to end; returns the run folder."""
    if recipe.kind == "reward_model":
        from .reward_model_job import train_reward_model_job  # it imports this module

        return train_reward_model_job(recipe, recipe_name)
    check_recipe(recipe)
    seed_everything(recipe.run.seed)
    run_dir = run_folder(recipe, recipe_name)
    started = time.perf_counter()
    with RunTracker(run_dir, to_dict(recipe), recipe.logging) as tracker, RewardWorkers() as reward_workers:
        say = tqdm.write
        say(f"run folder: {run_dir}")
        policy: Policy = load_policy(recipe.model.path) if recipe.model.path else embedded_policy(recipe.run.seed, recipe.model.max_audio_seconds)
        n_params = sum(p.numel() for p in policy.model.parameters())
        say(f"policy: {'embedded Step-Audio-2-style model' if not recipe.model.path else recipe.model.path}, {n_params / 1e6:.2f}M parameters")
        t = time.perf_counter()
        sft_prompts, rl_prompts, held_out, skipped = build_data(recipe)
        say(f"data: {len(sft_prompts)} SFT prompts, {len(rl_prompts)} RL prompts, {len(held_out)} held out ({time.perf_counter() - t:.1f} s)")
        worker = RolloutWorker(policy, render_speech=recipe.rollouts.render_speech)
        summary: dict = {"parameters": n_params, "skipped_rows": skipped}
        step = 0

        # -- stage 1: supervised warm start ------------------------------------------
        if recipe.sft.steps > 0:
            cfg = recipe.sft
            sft = SFTTrainer(policy, sft_prompts, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.grad_clip, recipe.run.seed)
            bar = tqdm(range(cfg.steps), desc="sft", disable=not recipe.run.progress, dynamic_ncols=True)
            for i in bar:
                t = time.perf_counter()
                metrics = sft.step(i)
                step += 1
                tracker.log({"stage": "sft", **metrics, "time/step_s": time.perf_counter() - t}, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            summary["sft"] = evaluate(worker, held_out, recipe, reward_workers)
            say(f"after SFT, greedy on held-out prompts: reward/mean {summary['sft']['reward/mean']:.3f}")
            save_checkpoint(policy, run_dir, step, {"stage": "sft"}, recipe.run.keep_last)

        # -- stage 2: GRPO on the LoRA adapter ---------------------------------------
        cfg = recipe.grpo
        if cfg.steps > 0:
            lora = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout) if cfg.lora.enabled else None
            if lora:
                save_base(policy, run_dir)  # adapter checkpoints refer to it
                policy.enable_lora(**lora)
            policy.freeze_encoder()
            grpo = GRPOTrainer(policy, worker, recipe.rewards, cfg, recipe.run.seed, reward_workers)
            order = np.random.default_rng(recipe.run.seed).permutation(len(rl_prompts))
            rows = []
            bar = tqdm(range(cfg.steps), desc="grpo", disable=not recipe.run.progress, dynamic_ncols=True)
            for i in bar:
                picks = [order[(i * cfg.prompts_per_step + k) % len(order)] for k in range(cfg.prompts_per_step)]
                t = time.perf_counter()
                metrics, _ = grpo.step([rl_prompts[j] for j in picks], i)
                step += 1
                row = {"stage": "grpo", **metrics, "time/step_s": time.perf_counter() - t}
                tracker.log(row, step=step)
                rows.append(row)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.4f}")
                if (i + 1) % recipe.run.save_every == 0 or i + 1 == cfg.steps:
                    save_checkpoint(policy, run_dir, step, {"stage": "grpo", "lora_config": lora}, recipe.run.keep_last)
            # the total and each reward component, over the first and the last 10% of steps
            keys = ["reward/mean"] + [k for k in rows[0] if k.startswith("reward/") and k.count("/") == 1 and k != "reward/mean"]
            summary["grpo"] = {
                **{f"{k} {part}": _mean_of(rows, k, *span) for k in keys for part, span in _ENDS.items()},
                "eval": evaluate(worker, held_out, recipe, reward_workers),
            }
            g = summary["grpo"]
            components = ", ".join(
                f"{k.removeprefix('reward/')} {g[k + ' first 10%']:.3f} -> {g[k + ' last 10%']:.3f}" for k in keys[1:]
            )
            say(
                f"GRPO reward/mean: first 10% of steps {g['reward/mean first 10%']:.3f} -> last 10% "
                f"{g['reward/mean last 10%']:.3f} ({components}); greedy on held-out prompts {g['eval']['reward/mean']:.3f}"
            )
        summary["time_s"] = time.perf_counter() - started
        tracker.summary(summary)
    say(f"done in {summary['time_s']:.0f} s. Outputs in {run_dir}: config.yaml, metrics.jsonl, summary.json, reward_curve.png, checkpoints/")
    return run_dir
