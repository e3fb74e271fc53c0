"""A staged recipe's `reward_model` stage: a reward model that hears, built from the policy as it
is then, trained on spoken preference pairs and saved in RUN/reward_models/<stage>."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from vocalign.data.types import Prompt
from vocalign.model.policy import Policy
from vocalign.rewards.training.hearing_reward_model import SAMPLES_KIND
from vocalign.rewards.training.preference_data import PreferencePair

from .stage_eval import rl_summary
from .stages import StagePlan, reward_model_folder


def reward_model_stage(run, plan: StagePlan) -> None:
    """`run` is the runner's `Run` (not imported: the runner imports this module).

    A reward model that hears, built from the policy as it is now and trained on spoken
    preference pairs (the synthetic kinds and the policy's own samples); saved in
    RUN/reward_models/<stage> with its held-out pairwise accuracy per kind."""
    from vocalign.data.tasks import make_task
    from vocalign.rewards.training.hearing_reward_model import (
        hearing_pairwise_accuracy, train_hearing_reward_model)
    from vocalign.rewards.training.preference_data import spoken_pairs

    cfg, recipe, seed = run.recipe.reward_model, run.recipe, run.recipe.data.seed + 100 * (plan.index + 1)
    folder = reward_model_folder(run.run_dir, plan.name)
    t = time.perf_counter()
    questions = {"voices": "train", **cfg.questions, "max_operand": cfg.max_operand}
    train_q = make_task("arithmetic", cfg.train_pairs, seed, **questions)
    held_q = make_task("arithmetic", cfg.eval_pairs, seed + 1, **questions)
    train = spoken_pairs(train_q, seed, cfg.kinds, cfg.max_operand)
    held_out = spoken_pairs(held_q, seed + 1, cfg.kinds, cfg.max_operand, exclude=train)
    if cfg.policy_samples:
        share = max(1, round(cfg.policy_samples * len(held_q) / len(train_q)))
        train += policy_sample_pairs(run.policy, train_q[: cfg.policy_samples], cfg.samples_per_question, seed,
                                     max_new_tokens=recipe.rl.max_new_tokens)
        held_out += policy_sample_pairs(run.policy, held_q[:share], cfg.samples_per_question, seed + 1,
                                        max_new_tokens=recipe.rl.max_new_tokens)
    kinds = sorted({p.kind for p in train})
    run.say(f"{plan.name}: {len(train)} spoken preference pairs ({', '.join(kinds)}), {len(held_out)} held out "
            f"({time.perf_counter() - t:.1f} s)")
    first, rows = run.step, []

    def log(step: int, metrics: dict[str, float]) -> None:
        row = {"stage": plan.name, **{f"reward_model/{k}": v for k, v in metrics.items()}}
        run.tracker.log(row, step=first + step)
        rows.append(row)

    model, info = train_hearing_reward_model(
        run.policy, train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        seed=recipe.run.seed, center=cfg.center_rewards_coefficient, logging_steps=cfg.logging_steps,
        progress=recipe.run.progress, on_log=log)
    run.step += cfg.steps
    accuracy = hearing_pairwise_accuracy(model, held_out)
    model.save(folder, {"stage": plan.name, "held_out": accuracy, "train_pairs": len(train)})
    run.summary[plan.name] = {
        **rl_summary(rows, {}, keys=["reward_model/loss", "reward_model/accuracy"]),
        "held_out": accuracy, "train_pairs": len(train), "held_out_pairs": len(held_out), "path": str(folder),
        "train_time_s": info["seconds"],
    }
    run.say(f"{plan.name}: held-out pairwise accuracy {accuracy['accuracy']:.3f} ("
            + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in accuracy.items() if "/" in k)
            + f"); saved in {folder}")


def policy_sample_pairs(policy: Policy, prompts: Sequence[Prompt], samples: int, seed: int,
                        temperature: float = 1.0, max_new_tokens: int = 48) -> list[PreferencePair]:
    """For each spoken arithmetic prompt, `samples` answers sampled from `policy`; where some
    are right and some wrong, one pair: a right one over a wrong one (kind `samples`)."""
    from vocalign.model.policy import Sampling
    from vocalign.rewards.correctness import is_correct
    from vocalign.rollouts.worker import RolloutWorker

    worker = RolloutWorker(policy, render_speech=False)
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(0, len(prompts), 16):
        part = list(prompts[i : i + 16])
        rollouts = worker.generate(part, samples, Sampling(temperature, 1.0, max_new_tokens), seed=seed + i)
        for k, prompt in enumerate(part):
            mine = rollouts[k * samples : (k + 1) * samples]
            right = [r.text for r in mine if is_correct(r.text, prompt.meta["answer"])]
            wrong = [r.text for r in mine if r.text.strip() and not is_correct(r.text, prompt.meta["answer"])]
            if right and wrong:
                pairs.append(PreferencePair(str(prompt.meta["question"]), right[int(rng.integers(len(right)))],
                                            wrong[int(rng.integers(len(wrong)))], SAMPLES_KIND, prompt))
    return pairs
