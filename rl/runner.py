"""The run loop: one readable driver from a recipe to a trained policy.

    recipe -> run folder (config.yaml) -> policy -> data
    -> SFT warm start (full weights)                       [optional]
    -> RL: GRPO family or PPO with a critic, on a LoRA adapter or full weights
       (torch or DeepSpeed ZeRO), the audio encoder frozen
    -> metrics.jsonl / W&B each step, checkpoints, summary.json, reward_curve.png

With `run.resume=true` it continues from the latest checkpoint in `run.output_dir`:
weights, optimiser, RNG states, data position and W&B run, so that the resumed run is
the run that was interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from vocalign.model.policy import GREEDY_TEMPERATURE, Policy, Sampling
from vocalign.rewards import score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.group import RolloutGroup
from vocalign.rollouts.worker import RolloutWorker

from .checkpoint import ADAPTER_NAME, read_state, restore_rng, save_base, save_checkpoint
from .config import Recipe, TaskSpec, check_recipe
from .critic import ValueModel
from .recipe import to_dict
from .run_folder import claim, mark_failed
from .sft import SFTTrainer
from .tracking import RunTracker, read_metrics, reward_components
from .trainer import PromptCursor, RLTrainer




def configure_policy(policy: Policy, recipe: Recipe) -> Policy:
    """Apply the recipe's choices of where the policy lives (`model.device`), how it samples
    (`rollouts.engine`) and runs its training forward (`rl.shared_prompt_forward`,
    `rl.forward_engine`) to a freshly loaded policy."""
    place(policy, recipe)
    policy.decode_engine = recipe.rollouts.engine
    policy.shared_prompt_forward = recipe.rl.shared_prompt_forward
    policy.forward_engine = recipe.rl.forward_engine
    return policy

def resolve_device(name: str) -> torch.device:
    """`model.device` as a torch device: "auto" is this process's GPU when torch sees one
    (LOCAL_RANK's under a multi-process launcher), else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"model.device {name!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {name!r} but torch sees no CUDA device here; use model.device=auto or cpu")
    return device


def place(policy: Policy, recipe: Recipe) -> Policy:
    """Move a freshly loaded policy's model to `model.device`."""
    policy.model.to(resolve_device(recipe.model.device))
    return policy


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


def audio_limit(policy: Policy) -> float | None:
    """The longest clip, in seconds, the policy's audio encoder takes (None: it has no such limit)."""
    limit = getattr(policy.model, "max_audio_seconds", None)
    if limit is None:
        limit = getattr(getattr(policy.model, "config", None), "max_audio_seconds", None)
    return float(limit) if limit is not None else None


def held_out_count(rows: int, eval_prompts: int) -> int:
    """How many of a training file's first rows are held out for evaluation: data.eval_prompts, but
    at most a tenth of the file (at least one row when it has two or more)."""
    return min(eval_prompts, max(1, rows // 10)) if rows >= 2 else 0


def _load_user_file(key: str, path: str, recipe: Recipe, max_seconds: float | None, say) -> tuple[list[Prompt], int]:
    """The prompts of a recipe's data file; each skipped row is reported on the console."""
    loaded = load_prompts(path, on_bad_row=recipe.data.on_bad_row, max_seconds=max_seconds)
    for reason in loaded.skipped_reasons[:10]:
        say(f"data.{key}: skipped {reason}")
    if loaded.skipped > 10:
        say(f"data.{key}: ... and {loaded.skipped - 10} more rows skipped (summary.json lists the count)")
    return loaded.prompts, loaded.skipped


def build_data(recipe: Recipe, max_seconds: float | None = None, say=print) -> tuple[list[Prompt], list[Prompt], list[Prompt], dict[str, int]]:
    """SFT prompts, RL prompts and held-out evaluation prompts (different seeds: no overlap).

    Rows of your own files are checked as they load (audio longer than `max_seconds` is a
    bad row); SFT rows need a reference `response`.
    """
    d, skipped = recipe.data, {}
    sft = synthetic_prompts(d.sft_tasks, d.seed) if recipe.sft.steps > 0 else []
    if d.sft_file and recipe.sft.steps > 0:
        rows, skipped["sft_file"] = _load_user_file("sft_file", d.sft_file, recipe, max_seconds, say)
        missing = [p.id for p in rows if p.target is None]
        if missing:
            raise ValueError(f"data.sft_file {d.sft_file}: rows {missing[:5]} have no `response`; SFT learns to answer "
                             f"with it: add a response to every row, or give these rows as data.train_file (RL) instead")
        sft += rows
    if d.train_file:
        rl, skipped["train_file"] = _load_user_file("train_file", d.train_file, recipe, max_seconds, say)
        if len(rl) < 2:
            raise ValueError(f"data.train_file {d.train_file} has {len(rl)} usable rows; it needs at least 2 (one to "
                             f"train on, one held out for evaluation)")
        n_held = held_out_count(len(rl), d.eval_prompts)
        if n_held < d.eval_prompts:
            say(f"data.train_file: holding out its first {n_held} of {len(rl)} rows for evaluation (a tenth of the file; "
                f"data.eval_prompts={d.eval_prompts} asks for more); the other {len(rl) - n_held} train")
        rl, held_out = rl[n_held:], rl[:n_held]
    else:
        rl = synthetic_prompts(d.rl_tasks, d.seed + 1)
        held_out = synthetic_prompts([TaskSpec(t.name, d.eval_prompts, t.params) for t in d.rl_tasks[:1]], d.seed + 2)
    if not rl:
        raise ValueError("no RL prompts: set data.rl_tasks or data.train_file")
    return sft, rl, held_out, skipped


def evaluate(
    worker: RolloutWorker, prompts: list[Prompt], recipe: Recipe, reward_workers: RewardWorkers | None = None,
    batch_size: int = 64, gather=contextlib.nullcontext,
) -> dict[str, float]:
    """Greedy responses to held-out prompts, scored by the recipe's rewards."""
    sampling = Sampling(GREEDY_TEMPERATURE, 1.0, recipe.rl.max_new_tokens)
    rollouts = []
    with gather():
        for i in range(0, len(prompts), batch_size):
            rollouts += worker.generate(prompts[i : i + batch_size], 1, sampling, seed=0)
    return score(rollouts, recipe.rewards, reward_workers).metrics()


def eval_suites(recipe: Recipe) -> list:
    """The recipe's `eval.suites` with their held-out prompts (seeds apart from training and from
    `data.eval_prompts`), built once so that every evaluation of the run answers the same prompts."""
    if not recipe.eval.suites:
        return []
    from .evaluation import Variation, get_suite, prepare_suites

    variation = Variation.parse([f"{k}={v}" for k, v in recipe.eval.variation.items()])
    return prepare_suites([get_suite(name) for name in recipe.eval.suites], recipe.eval.n, recipe.data.seed + 3, variation)


def run_eval_suites(policy: Policy, prepared: list, recipe: Recipe, tracker: RunTracker, step: int,
                    gather=contextlib.nullcontext) -> dict:
    """Score `policy` on the prepared suites; log `eval/<suite>/<metric>` (and per group) at `step`.

    Returns {suite: summary} (means with 95% bootstrap intervals, see `vocalign.rl.evaluation.summarise`).
    """
    if not prepared:
        return {}
    from .evaluation import evaluate_policy, summarise

    with gather():
        results = evaluate_policy(policy, prepared, recipe.rl.max_new_tokens)
    summaries = {p.suite.name: summarise(results[p.suite.name], p.suite.metrics) for p in prepared}
    row: dict[str, float | str] = {"stage": "eval"}
    for suite, summary in summaries.items():
        for metric, estimate in summary["metrics"].items():
            row[f"eval/{suite}/{metric}"] = estimate["mean"]
        for group, metrics in summary["groups"].items():
            for metric, estimate in metrics.items():
                if estimate["n"]:
                    row[f"eval/{suite}/{group}/{metric}"] = estimate["mean"]
    tracker.log(row, step=step)
    return summaries


def style_table(summaries: dict) -> dict[str, float] | None:
    """The style suite's share honoured per requested value, and the neutral share of prompts asking for none."""
    style = summaries.get("style")
    if not style:
        return None
    table = {}
    for group, metrics in style["groups"].items():
        key, metric = ("none (neutral)", "neutral") if group == "none" else (group, "honoured")
        if metrics[metric]["n"]:
            table[key] = metrics[metric]["mean"]
    return table


def _show_style(table: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in table.items()) if table else ""


_ENDS = {"first 10%": (0.0, 0.1), "last 10%": (0.9, 1.0)}


def _mean_of(rows: list[dict], key: str, lo: float, hi: float) -> float:
    """The mean of rows[key] over the steps from fraction `lo` to `hi` of the stage (NaN-free values only)."""
    part = rows[int(lo * len(rows)) : max(int(lo * len(rows)) + 1, int(hi * len(rows)))]
    values = [r[key] for r in part if not np.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _resume_state(run_dir: Path, checkpoint: Path | None) -> dict:
    """The state to continue from; metrics logged after the checkpoint belong to steps that run again."""
    if checkpoint is None:
        return {}
    state = read_state(checkpoint)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        kept = [r for r in read_metrics(metrics) if r["step"] <= state["step"]]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return state


def train(recipe: Recipe, recipe_name: str, force: bool = False) -> Path:
    """Run a recipe end to end; returns the run folder.

    The run folder is checked first (see `vocalign.rl.run_folder`): `force` replaces a
    previous run's files there. A run that fails leaves the folder as that module says.
    """
    if recipe.kind == "reward_model":
        from .reward_model_job import train_reward_model_job  # it imports this module

        return train_reward_model_job(recipe, recipe_name, force)
    check_recipe(recipe)
    seed_everything(recipe.run.seed)
    run_dir = run_folder(recipe, recipe_name)
    existed = run_dir.exists()
    resume_from = claim(run_dir, recipe.run.resume, force)
    state = _resume_state(run_dir, resume_from)
    try:
        return _train(recipe, run_dir, resume_from, state)
    except BaseException as error:
        trained = (run_dir / "metrics.jsonl").exists() and bool(read_metrics(run_dir / "metrics.jsonl"))
        mark_failed(run_dir, existed, trained or resume_from is not None, error)
        raise


def _train(recipe: Recipe, run_dir: Path, resume_from: Path | None, state: dict) -> Path:
    started = time.perf_counter()
    say = tqdm.write
    if recipe.rollouts.num_workers > 0 or recipe.ray.address:
        from vocalign.rewards.workers import ensure_ray

        ensure_ray(address=recipe.ray.address)  # first, so reward workers join the same Ray
    tracker = RunTracker(run_dir, to_dict(recipe), recipe.logging, resume_id=state.get("wandb_id"))
    with tracker, RewardWorkers() as reward_workers, contextlib.ExitStack() as stack:
        say(f"run folder: {run_dir}")
        say(tracker.wandb_status())
        if resume_from:
            say(f"resuming from {resume_from} (step {state['step']}, stage {state['stage']})")
        policy: Policy = (load_policy(recipe.model.path, recipe.model.detokenizer) if recipe.model.path
                          else embedded_policy(recipe.run.seed, recipe.model.max_audio_seconds))
        configure_policy(policy, recipe)
        n_params = sum(p.numel() for p in policy.model.parameters())
        say(f"policy: {'embedded Step-Audio-2-style model' if not recipe.model.path else recipe.model.path}, {n_params / 1e6:.2f}M parameters, on {policy.device}")
        t = time.perf_counter()
        sft_prompts, rl_prompts, held_out, skipped = build_data(recipe, audio_limit(policy), say)
        say(f"data: {len(sft_prompts)} SFT prompts, {len(rl_prompts)} RL prompts, {len(held_out)} held out ({time.perf_counter() - t:.1f} s)")
        suites = eval_suites(recipe)
        summary: dict = state.get("summary") or {"parameters": n_params, "skipped_rows": skipped}
        step = state.get("step", 0)
        run = recipe.run

        def checkpoint_state(stage: str, stage_step: int, **more) -> dict:
            return {"stage": stage, "stage_step": stage_step, "wandb_id": tracker.wandb_run_id, "summary": summary, **more}

        # -- stage 1: supervised warm start ------------------------------------------
        sft_done = state.get("stage") == "rl" or (state.get("stage") == "sft" and state["stage_step"] >= recipe.sft.steps)
        if resume_from and state["stage"] == "sft":
            policy = configure_policy(load_policy(resume_from), recipe)
        if recipe.sft.steps > 0 and not sft_done:
            cfg = recipe.sft
            sft = SFTTrainer(policy, sft_prompts, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.grad_clip, run.seed)
            first = 0
            if resume_from:
                sft.load(resume_from)
                restore_rng(resume_from)
                first = state["stage_step"]
            bar = tqdm(range(first, cfg.steps), desc="sft", disable=not run.progress, dynamic_ncols=True,
                       initial=first, total=cfg.steps)
            for i in bar:
                t = time.perf_counter()
                metrics = sft.step(i)
                step += 1
                tracker.log({"stage": "sft", **metrics, "time/step_s": time.perf_counter() - t}, step=step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                if (i + 1) % run.save_every == 0 or i + 1 == cfg.steps:
                    # saved before the evaluation below: a reward that fails there loses no SFT work
                    # (the evaluation leaves the RNG states alone, so a resume from here is exact)
                    save_checkpoint(policy, run_dir, step, checkpoint_state("sft", i + 1), run.keep_last, run.keep_every, extra=sft.save)
                if i + 1 == cfg.steps:
                    ro = recipe.rollouts
                    sft_worker = RolloutWorker(policy, ro.render_speech, ro.tools, ro.max_turns, ro.tool_options)
                    summary["sft"] = evaluate(sft_worker, held_out, recipe, reward_workers)
                    summary["sft_suites"] = run_eval_suites(policy, suites, recipe, tracker, step)
                    if style := style_table(summary["sft_suites"]):
                        summary["sft"]["style"] = style
                    say(f"after SFT, greedy on held-out prompts: reward/mean {summary['sft']['reward/mean']:.3f}"
                        + (f"; style honoured: {_show_style(summary['sft'].get('style'))}" if summary["sft"].get("style") else ""))

        # -- stage 2: RL (GRPO family or PPO) -----------------------------------------
        cfg = recipe.rl
        if cfg.steps > 0:
            lora = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout) if cfg.lora.enabled else None
            resuming_rl = resume_from is not None and state["stage"] == "rl"
            base = run_dir / "checkpoints" / "base"  # the weights RL starts from
            if resuming_rl:
                policy = configure_policy(load_policy(base if lora else resume_from), recipe)
                if not lora and recipe.kl.coef > 0:
                    policy.keep_reference(place(load_policy(base), recipe).model)  # the reference is where RL started
            elif lora or recipe.kl.coef > 0:
                save_base(policy, run_dir)  # adapter checkpoints refer to it; a full-weight reference reloads from it
            critic = None
            if cfg.algorithm == "ppo":
                critic = ValueModel(policy, lora if cfg.critic.lora else None)
                critic.body.encoder.requires_grad_(False)
            if lora:
                policy.enable_lora(**lora)
            policy.freeze_encoder()
            if resuming_rl and lora:
                from safetensors.torch import load_file

                policy.load_trainable_state(load_file(str(resume_from / ADAPTER_NAME)))
            ro = recipe.rollouts
            if ro.num_workers > 0:  # Ray actors holding replicas of the policy, synced after every update
                worker = stack.enter_context(RolloutGroup(
                    policy, ro.num_workers, ro.render_speech, ro.cpus_per_worker, ro.gpus_per_worker, ro.timeout_s,
                    ro.max_restarts, address=recipe.ray.address, torch_threads=ro.torch_threads,
                    tools=ro.tools, max_turns=ro.max_turns, tool_options=ro.tool_options,
                ))
                say(f"rollouts: {ro.num_workers} Ray workers" + (f", tools {', '.join(ro.tools)}" if ro.tools else ""))
            else:
                worker = RolloutWorker(policy, ro.render_speech, ro.tools, ro.max_turns, ro.tool_options)
                if ro.tools:
                    say(f"rollouts: tools {', '.join(ro.tools)}, up to {ro.max_turns} calls per response")
            trainer = RLTrainer(policy, worker, recipe.rewards, cfg, recipe.loss, recipe.kl, run.seed, reward_workers, critic,
                                async_generation=ro.async_generation)
            cursor = PromptCursor(rl_prompts, run.seed)
            first, rows = 0, []
            if resuming_rl:
                trainer.load_state(state, resume_from)
                cursor.position = state["cursor"]
                first = state["stage_step"]
                rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"]
                restore_rng(resume_from)
            say(f"RL: {cfg.algorithm}, {'LoRA r=%d' % cfg.lora.r if lora else 'full weights'}, backend {cfg.backend}"
                + (f" (ZeRO-{cfg.deepspeed.zero_stage})" if cfg.backend == "deepspeed" else ""))
            bar = tqdm(range(first, cfg.steps), desc=cfg.algorithm, disable=not run.progress, dynamic_ncols=True,
                       initial=first, total=cfg.steps)
            stack.callback(trainer.close)
            for i in bar:
                t = time.perf_counter()
                metrics, _ = trainer.step(cursor, i)
                step += 1
                row = {"stage": "rl", **metrics, "time/step_s": time.perf_counter() - t}
                tracker.log(row, step=step)
                rows.append({**row, "step": step})
                if recipe.logging.audio_every and (i + 1) % recipe.logging.audio_every == 0 and trainer.last_samples:
                    samples, scores = trainer.last_samples
                    tracker.log_audio_table(step, samples, scores.components, scores.total, recipe.logging.audio_samples)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.4f}")
                if recipe.eval.every and (i + 1) % recipe.eval.every == 0 and i + 1 < cfg.steps:
                    run_eval_suites(policy, suites, recipe, tracker, step, gather=trainer.backend.full_parameters)
                if i + 1 == cfg.steps:
                    summary["rl"] = _rl_summary(rows, evaluate(worker, held_out, recipe, reward_workers, gather=trainer.backend.full_parameters))
                    summary["rl_suites"] = run_eval_suites(policy, suites, recipe, tracker, step, gather=trainer.backend.full_parameters)
                    if style := style_table(summary["rl_suites"]):
                        summary["rl"]["style"] = style
                if (i + 1) % run.save_every == 0 or i + 1 == cfg.steps:
                    # prompts whose rollouts are still being generated (async) are generated again after a resume
                    position = cursor.position - (cfg.prompts_per_step if trainer.pending else 0)
                    more = {"lora_config": lora, "cursor": position, "algorithm": cfg.algorithm, **trainer.state()}
                    with trainer.backend.full_parameters():
                        save_checkpoint(policy, run_dir, step, checkpoint_state("rl", i + 1, **more), run.keep_last,
                                        run.keep_every, extra=trainer.save)
            g = summary["rl"]
            keys = [k.removesuffix(" first 10%") for k in g if k.endswith(" first 10%")]
            components = ", ".join(f"{k.removeprefix('reward/')} {g[k + ' first 10%']:.3f} -> {g[k + ' last 10%']:.3f}" for k in keys[1:])
            say(
                f"{cfg.algorithm.upper()} reward/mean: first 10% of steps {g['reward/mean first 10%']:.3f} -> last 10% "
                f"{g['reward/mean last 10%']:.3f} ({components}); greedy on held-out prompts {g['eval']['reward/mean']:.3f}"
            )
            if g.get("style"):
                sft_style = summary.get("sft", {}).get("style") or {}
                say("style honoured on held-out prompts, greedy (after SFT -> after RL): " + ", ".join(
                    f"{k} {sft_style[k]:.2f} -> {v:.2f}" if k in sft_style else f"{k} {v:.2f}" for k, v in g["style"].items()))
        summary["time_s"] = summary.get("time_s", 0.0) + time.perf_counter() - started
        tracker.summary(summary)
    final_style = (summary.get("rl") or summary.get("sft") or {}).get("style")
    style = f" Held-out style honoured, greedy: {_show_style(final_style)}." if final_style else ""
    say(f"done in {time.perf_counter() - started:.0f} s.{style} Outputs in {run_dir}: config.yaml, metrics.jsonl, "
        "summary.json, reward_curve.png, checkpoints/")
    return run_dir


def _rl_summary(rows: list[dict], evaluation: dict[str, float]) -> dict:
    """The total and each reward component over the first and the last 10% of RL steps, and the evaluation."""
    keys = reward_components(rows)
    return {**{f"{k} {part}": _mean_of(rows, k, *span) for k in keys for part, span in _ENDS.items()}, "eval": evaluation}
