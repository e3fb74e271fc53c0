"""The run loop: a recipe in, a trained policy out, as a pipeline of stages.

    train: check the recipe -> claim the run folder -> _run:
      prepare    tracker, policy, evaluation suites (and what a resume restores)
      stages     (rl/stages.py) `sft` then `rl`, or a staged recipe's `stages:`; each with
                 its own recipe, data and name, from the weights the last one left:
        sft_stage           supervised warm start, then its evaluation
        rl_stage            GRPO family or PPO with a critic (`RLTrainer.step`),
                            checkpoints, then its evaluation
        reward_model_stage  a reward model that hears, from the policy as it is then
                            (saved in RUN/reward_models/<stage>), and its held-out accuracy
      summarise  summary.json, reward_curve.png and the console's last lines

A staged recipe also evaluates its `eval.suites` before the first stage (`initial`), so
that every stage has a before and an after.

With `run.resume=true` it continues from the latest checkpoint in `run.output_dir`:
weights, optimiser, RNG states, data position and W&B run, so that the resumed run is
the run that was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vocalign.common.ray_cluster import ensure_ray
from vocalign.data.types import Prompt
from vocalign.model.loading import embedded_policy, load_policy
from vocalign.model.policy import Policy
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.contract import RolloutSource
from vocalign.rollouts.group import RolloutGroup
from vocalign.rollouts.worker import RolloutWorker

from .checkpoint import ADAPTER_NAME, intact_checkpoint, read_state, restore_rng, save_base, save_checkpoint, seed_everything
from .config import Recipe, check_recipe, is_omni
from .critic import ValueModel
from .prompts import audio_limit, build_data
from .recipe import to_dict
from .reward_model_job import train_reward_model_job
from .run_folder import claim, mark_failed, new_run_folder
from .sft import SFTTrainer
from .reward_model_stage import reward_model_stage
from .stage_eval import eval_suites, evaluate, rl_summary, run_eval_suites, show_style, stage_lines, stage_table, style_table
from .stages import StagePlan, stage_plans
from .tracking import RunTracker, read_metrics
from .trainer import PromptCursor, RLTrainer
from . import spmd
from .trainer_group import TrainerGroup, TrainerGroupError


def configure_policy(policy: Policy, recipe: Recipe) -> Policy:
    """Apply the recipe's choices of where the policy lives (`model.device`), how it samples
    (`rollouts.engine`) and runs its training forward (`rl.shared_prompt_forward`,
    `rl.forward_engine`) to a freshly loaded policy."""
    place(policy, recipe)
    policy.decode_engine = recipe.rollouts.engine
    policy.decode_compile = recipe.rollouts.compile
    policy.shared_prompt_forward = recipe.rl.shared_prompt_forward
    policy.forward_engine = recipe.rl.forward_engine
    return policy

def checkpoint_options(recipe: Recipe) -> dict:
    """What `load_policy` passes to a checkpoint's model: the dtype, and Qwen2.5-Omni's voice,
    code limit and system prompt (which the other models ignore)."""
    m = recipe.model
    return {"speaker": m.speaker, "max_codes": m.max_speech_tokens, "system": m.system_prompt, "dtype": m.dtype,
            "render_steps": m.render_steps}


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


def build_rollouts(policy: Policy, recipe: Recipe, num_workers: int | None = None) -> RolloutSource:
    """What generates the rollouts: `rollouts.num_workers` Ray actors holding replicas of
    `policy` (a `RolloutGroup`), or, with 0, a `RolloutWorker` in this process sharing it."""
    ro = recipe.rollouts
    workers = ro.num_workers if num_workers is None else num_workers
    if workers == 0:
        return RolloutWorker(policy, ro.render_speech, ro.tools, ro.max_turns, ro.tool_options)
    return RolloutGroup(
        policy, workers, ro.render_speech, ro.cpus_per_worker, ro.gpus_per_worker, ro.timeout_s, ro.max_restarts,
        address=recipe.ray.address, torch_threads=ro.torch_threads, tools=ro.tools, max_turns=ro.max_turns,
        tool_options=ro.tool_options,
    )


@dataclass
class Run:
    """What the stages of one run share."""

    recipe: Recipe
    run_dir: Path
    resume_from: Path | None
    state: dict  # the checkpoint's state when resuming, else {}
    tracker: RunTracker
    reward_workers: RewardWorkers
    stack: contextlib.ExitStack  # closes the rollout workers and trainer backends at the end
    policy: Policy
    suites: list
    summary: dict
    step: int = 0  # steps logged so far, all stages together
    say: Callable[[str], None] = field(default=tqdm.write)
    # the stage running now: its prompts (built once per distinct `data` section, in `data_cache`)
    sft_prompts: list[Prompt] = field(default_factory=list)
    rl_prompts: list[Prompt] = field(default_factory=list)
    held_out: list[Prompt] = field(default_factory=list)
    data_cache: dict = field(default_factory=dict)

    def resuming(self, stage: str) -> bool:
        return self.resume_from is not None and self.state.get("stage") == stage

    def use_data(self, recipe: Recipe) -> None:
        """The prompts of `recipe`'s data section, built the first time a stage asks for them."""
        key = json.dumps(to_dict(recipe.data), sort_keys=True) + f"|{recipe.model.max_audio_seconds}"
        if key not in self.data_cache:
            t = time.perf_counter()
            sft, rl, held_out, skipped = build_data(recipe, audio_limit(self.policy), self.say)
            self.say(f"data: {len(sft)} SFT prompts, {len(rl)} RL prompts, {len(held_out)} held out "
                     f"({time.perf_counter() - t:.1f} s)")
            self.summary.setdefault("skipped_rows", skipped)
            self.data_cache[key] = (sft, rl, held_out)
        self.sft_prompts, self.rl_prompts, self.held_out = self.data_cache[key]

    def checkpoint_state(self, stage: str, stage_step: int, **more) -> dict:
        return {"stage": stage, "stage_step": stage_step, "wandb_id": self.tracker.wandb_run_id, "summary": self.summary, **more}


def train(recipe: Recipe, recipe_name: str, force: bool = False) -> Path:
    """Run a recipe end to end; returns the run folder.

    The recipe is checked first (`check_recipe`), then the run folder (see
    `vocalign.rl.run_folder`): `force` replaces a previous run's files there. A run that
    fails leaves the folder as that module says.
    """
    check_recipe(recipe)
    if recipe.kind == "reward_model":
        return train_reward_model_job(recipe, recipe_name, force)
    seed_everything(recipe.run.seed)
    run_dir = new_run_folder(recipe.run.output_dir, recipe.run.name or recipe_name)
    existed = run_dir.exists()
    resume_from = claim(run_dir, recipe.run.resume, force)
    state = _resume_state(run_dir, resume_from)
    restarts = 0
    while True:
        try:
            return _run(recipe, run_dir, resume_from, state)
        except TrainerGroupError as error:
            latest = intact_checkpoint(run_dir)
            if restarts >= recipe.rl.trainer_restarts or latest is None or spmd.link() is not None:
                _failed(run_dir, existed, resume_from, error)
                raise
            restarts += 1  # as run.resume=true would: from the last checkpoint, later steps logged again
            tqdm.write(f"{error}\nrestarting the trainers from {latest} (restart {restarts} of rl.trainer_restarts="
                       f"{recipe.rl.trainer_restarts})")
            resume_from, state = latest, _resume_state(run_dir, latest)
        except BaseException as error:
            _failed(run_dir, existed, resume_from, error)
            raise


def _failed(run_dir: Path, existed: bool, resume_from: Path | None, error: BaseException) -> None:
    trained = (run_dir / "metrics.jsonl").exists() and bool(read_metrics(run_dir / "metrics.jsonl"))
    mark_failed(run_dir, existed, trained or resume_from is not None, error)


def _run(recipe: Recipe, run_dir: Path, resume_from: Path | None, state: dict) -> Path:
    started = time.perf_counter()
    if recipe.rollouts.num_workers > 0 or (recipe.rl.trainers > 1 and spmd.link() is None) or recipe.ray.address:
        ensure_ray(address=recipe.ray.address)  # first, so reward workers join the same Ray
    tracker = RunTracker(run_dir, to_dict(recipe), recipe.logging, resume_id=state.get("wandb_id"))
    with tracker, RewardWorkers() as reward_workers, contextlib.ExitStack() as stack:
        run = prepare(recipe, run_dir, resume_from, state, tracker, reward_workers, stack)
        plans = stage_plans(recipe, run_dir)
        if recipe.stages and "initial_suites" not in run.summary and run.suites:
            run.summary["initial_suites"] = run_eval_suites(run.policy, run.suites, recipe, tracker, run.step)
        at = next((p.index for p in plans if p.name == state.get("stage")), 0) if resume_from else 0
        for plan in plans[at:]:
            run_stage(run, plan, last=plan is plans[-1])
        if recipe.stages:
            run.recipe = recipe
            run.summary["stages"] = stage_table(run.summary, [(p.name, p.type) for p in plans])
            for line in stage_lines(run.summary["stages"]):
                run.say(line)
        run.summary["time_s"] = run.summary.get("time_s", 0.0) + time.perf_counter() - started
        tracker.summary(run.summary)  # summary.json; reward_curve.png is drawn as the tracker closes
    summarise(run, plans, started)
    return run_dir


def summarise(run: Run, plans: list[StagePlan], started: float) -> None:
    """The console's last line: how long the run took, the final held-out style table, where the outputs are."""
    last = [run.summary[p.name] for p in plans if isinstance(run.summary.get(p.name), dict)]
    final_style = (last[-1] if last else {}).get("style")
    style = f" Held-out style honoured, greedy: {show_style(final_style)}." if final_style else ""
    models = ", reward_models/" if any(p.type == "reward_model" for p in plans) else ""
    run.say(f"done in {time.perf_counter() - started:.0f} s.{style} Outputs in {run.run_dir}: config.yaml, metrics.jsonl, "
            f"summary.json, reward_curve.png, checkpoints/{models}")


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


def prepare(recipe: Recipe, run_dir: Path, resume_from: Path | None, state: dict, tracker: RunTracker,
            reward_workers: RewardWorkers, stack: contextlib.ExitStack) -> Run:
    """The policy and the evaluation suites, said on the console (each stage builds its data)."""
    say = tqdm.write
    say(f"run folder: {run_dir}")
    say(tracker.wandb_status())
    if resume_from:
        say(f"resuming from {resume_from} (step {state['step']}, stage {state['stage']})")
    policy: Policy = (load_policy(recipe.model.path, recipe.model.detokenizer, **checkpoint_options(recipe)) if recipe.model.path
                      else embedded_policy(recipe.run.seed, recipe.model.max_audio_seconds))
    configure_policy(policy, recipe)
    n_params = sum(p.numel() for p in policy.model.parameters())
    say(f"policy: {'embedded Step-Audio-2-style model' if not recipe.model.path else recipe.model.path}, "
        f"{n_params / 1e6:.2f}M parameters, on {policy.device}")
    summary = state.get("summary") or {"parameters": n_params}
    run = Run(recipe, run_dir, resume_from, state, tracker, reward_workers, stack, policy, eval_suites(recipe), summary,
              step=state.get("step", 0), say=say)
    if not recipe.stages:  # said before the stages start, as it always was
        run.use_data(recipe)
    return run


def run_stage(run: Run, plan: StagePlan, last: bool) -> None:
    """One stage with its own recipe, data and closing resources; the policy it leaves is the next one's start."""
    run.recipe = plan.recipe
    with contextlib.ExitStack() as stack:
        run.stack = stack
        if plan.staged and plan.type != "sft":  # its SFT data would go unused
            data = dataclasses.replace(plan.recipe.data, sft_tasks=[], sft_file=None)
            run.use_data(dataclasses.replace(plan.recipe, data=data))
        else:
            run.use_data(plan.recipe)
        if plan.type == "sft":
            sft_stage(run, plan)
        elif plan.is_rl:
            rl_stage(run, plan)
            if not last:
                _hand_on(run)
        else:
            reward_model_stage(run, plan)


def _hand_on(run: Run) -> None:
    """After an RL stage: the adapters folded into the weights, no reference, every weight
    trainable again; the next stage starts from this plain policy."""
    policy = run.policy
    if policy.lora:
        policy.merge_lora()
    policy.drop_reference()
    for p in policy.model.parameters():
        p.requires_grad_(True)


def sft_stage(run: Run, plan: StagePlan) -> None:
    """Supervised warm start on the SFT prompts (full weights), then its evaluation."""
    cfg, recipe, state = run.recipe.sft, run.recipe, run.state
    done = run.resuming(plan.name) and state["stage_step"] >= cfg.steps
    if run.resuming(plan.name):
        run.policy = configure_policy(load_policy(run.resume_from, **checkpoint_options(recipe)), recipe)
    if done:
        if plan.name not in run.summary:  # stopped during its evaluation
            _evaluate_sft(run, plan)
        return
    sft = SFTTrainer(run.policy, run.sft_prompts, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.grad_clip, recipe.run.seed)
    first = 0
    if run.resuming(plan.name):
        sft.load(run.resume_from)
        restore_rng(run.resume_from)
        first = state["stage_step"]
    bar = tqdm(range(first, cfg.steps), desc=plan.name, disable=not recipe.run.progress, dynamic_ncols=True,
               initial=first, total=cfg.steps)
    for i in bar:
        t = time.perf_counter()
        metrics = sft.step(i)
        run.step += 1
        run.tracker.log({"stage": plan.name, **metrics, "time/step_s": time.perf_counter() - t}, step=run.step)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if (i + 1) % recipe.run.save_every == 0 or i + 1 == cfg.steps:
            # saved before the evaluation below: a reward that fails there loses no SFT work
            # (the evaluation leaves the RNG states alone, so a resume from here is exact)
            save_checkpoint(run.policy, run.run_dir, run.step, run.checkpoint_state(plan.name, i + 1), recipe.run.keep_last,
                            recipe.run.keep_every, extra=sft.save)
    _evaluate_sft(run, plan)


def _evaluate_sft(run: Run, plan: StagePlan) -> None:
    evaluate_stage(run, plan.name, build_rollouts(run.policy, run.recipe, num_workers=0))
    done = run.summary[plan.name]
    run.say(f"after {'SFT' if plan.name == 'sft' else plan.name}, greedy on held-out prompts: reward/mean "
            f"{done['reward/mean']:.3f}" + (f"; style honoured: {show_style(done.get('style'))}" if done.get("style") else ""))


def evaluate_stage(run: Run, stage: str, worker: RolloutSource, rows: list[dict] | None = None,
                   gather=contextlib.nullcontext) -> None:
    """Greedy rewards on the held-out prompts and the evaluation suites, into `summary[stage]`
    (with the RL stage's reward curve summarised from `rows`) and `summary[stage + "_suites"]`."""
    scores = evaluate(worker, run.held_out, run.recipe, run.reward_workers, gather=gather)
    run.summary[stage] = rl_summary(rows, scores) if rows is not None else scores
    run.summary[f"{stage}_suites"] = run_eval_suites(run.policy, run.suites, run.recipe, run.tracker, run.step, gather=gather)
    if style := style_table(run.summary[f"{stage}_suites"]):
        run.summary[stage]["style"] = style


def _rl_policy(run: Run, plan: StagePlan, lora: dict | None) -> ValueModel | None:
    """Ready `run.policy` for RL (from a resumed checkpoint, with LoRA, the encoder frozen); returns PPO's critic."""
    recipe, cfg = run.recipe, run.recipe.rl
    base = run.run_dir / "checkpoints" / plan.base  # the weights this stage starts from
    if run.resuming(plan.name):
        run.policy = configure_policy(load_policy(base if lora else run.resume_from, **checkpoint_options(recipe)), recipe)
        if not lora and recipe.kl.coef > 0:
            run.policy.keep_reference(place(load_policy(base, **checkpoint_options(recipe)), recipe).model)  # where RL started
    elif lora or recipe.kl.coef > 0:
        save_base(run.policy, run.run_dir, plan.base)  # adapter checkpoints refer to it; a full-weight reference reloads from it
    critic = None
    if cfg.algorithm == "ppo":
        critic = ValueModel(run.policy, lora if cfg.critic.lora else None)
        critic.freeze_encoder()
    if is_omni(recipe):  # SFT trained both parts' language models; RL trains rl.train_parts
        run.policy.set_train_parts(cfg.train_parts)
    if lora:
        run.policy.enable_lora(**lora)
    run.policy.freeze_encoder()
    if run.resuming(plan.name) and lora:
        from safetensors.torch import load_file

        run.policy.load_trainable_state(load_file(str(run.resume_from / ADAPTER_NAME)))
    return critic


def _trainer_group(run: Run, critic: ValueModel | None) -> TrainerGroup:
    """`rl.trainers` ranks: the processes of an SPMD launch (rl/spmd.py), else Ray actors."""
    recipe, cfg, ro = run.recipe, run.recipe.rl, run.recipe.rollouts
    options = {"render_speech": ro.render_speech, "tools": ro.tools, "max_turns": ro.max_turns, "tool_options": ro.tool_options}
    args = (run.policy, cfg, recipe.loss, recipe.kl, recipe.run.seed)
    link = spmd.link()
    if link is not None:
        return spmd.SpmdGroup(link, *args, torch_threads=torch.get_num_threads(), critic=critic, rollouts=options)
    gpus = 1.0 if run.policy.device.type == "cuda" else 0.0  # one GPU per rank when the policy trains on GPUs
    return TrainerGroup(run.policy, cfg.trainers, *args[1:], address=recipe.ray.address, critic=critic, rollouts=options,
                        gpus_per_trainer=gpus)


def _rl_trainer(run: Run, plan: StagePlan, lora: dict | None) -> tuple[RLTrainer, PromptCursor, int, list[dict]]:
    """The trainer, its prompt cursor, the first step to run and the RL rows logged before it."""
    recipe, cfg, ro = run.recipe, run.recipe.rl, run.recipe.rollouts
    critic = _rl_policy(run, plan, lora)
    updater = None
    if cfg.trainers > 1:  # data-parallel ranks, each from a snapshot of the policy as RL starts
        updater = _trainer_group(run, critic)
        run.stack.callback(updater.close)
        run.say(f"trainers: {cfg.trainers} data-parallel ranks ({'launcher processes' if spmd.link() else 'Ray actors'}), "
                "gradients summed across them" + ("" if ro.num_workers else "; each generates its share of the rollouts"))
        if cfg.backend == "deepspeed" and cfg.deepspeed.zero_stage == 3 and cfg.shared_prompt_forward:
            run.say("trainers: under ZeRO-3 every rank runs the one-pass training forward (rl.shared_prompt_forward is "
                    "off in the ranks: ZeRO-3's per-layer gathers must run alike on every rank)")
    if updater is not None and ro.num_workers == 0:
        from .colocated import RankRollouts

        worker: RolloutSource = RankRollouts(updater)
    else:
        worker = build_rollouts(run.policy, recipe)
    run.stack.callback(worker.close)
    if ro.num_workers > 0:
        run.say(f"rollouts: {ro.num_workers} Ray workers" + (f", tools {', '.join(ro.tools)}" if ro.tools else ""))
    elif ro.tools:
        run.say(f"rollouts: tools {', '.join(ro.tools)}, up to {ro.max_turns} calls per response")
    trainer = RLTrainer(run.policy, worker, recipe.rewards, cfg, recipe.loss, recipe.kl, recipe.run.seed,
                        run.reward_workers, critic, async_generation=ro.async_generation, updater=updater)
    cursor = PromptCursor(run.rl_prompts, recipe.run.seed)
    first, rows = 0, []
    if run.resuming(plan.name):
        trainer.load_state(run.state, run.resume_from)
        cursor.position = run.state["cursor"]
        first = run.state["stage_step"]
        rows = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r.get("stage") == plan.name]
        restore_rng(run.resume_from)
    run.say(f"RL: {cfg.algorithm}, {'LoRA r=%d' % cfg.lora.r if lora else 'full weights'}, backend {cfg.backend}"
            + (f" (ZeRO-{cfg.deepspeed.zero_stage})" if cfg.backend == "deepspeed" else ""))
    run.stack.callback(trainer.close)
    return trainer, cursor, first, rows


def rl_stage(run: Run, plan: StagePlan) -> None:
    """RL steps with logging, periodic evaluation and checkpoints, then the stage's evaluation."""
    recipe, cfg = run.recipe, run.recipe.rl
    lora = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout) if cfg.lora.enabled else None
    if lora and is_omni(recipe):  # the adapters go on the trained parts only; the checkpoint says which
        lora["train_parts"] = list(cfg.train_parts)
    trainer, cursor, first, rows = _rl_trainer(run, plan, lora)
    gather = trainer.updater.full_parameters
    if plan.staged and first == 0 and f"{plan.name}_before" not in run.summary:
        # its own rewards, greedy on its held-out prompts, before it trains (the adapters start at zero)
        run.summary[f"{plan.name}_before"] = evaluate(trainer.worker, run.held_out, recipe, run.reward_workers, gather=gather)
    desc = cfg.algorithm if plan.name == "rl" else f"{plan.name} ({cfg.algorithm})"
    bar = tqdm(range(first, cfg.steps), desc=desc, disable=not recipe.run.progress, dynamic_ncols=True,
               initial=first, total=cfg.steps)
    for i in bar:
        t = time.perf_counter()
        metrics, _ = trainer.step(cursor, i)
        run.step += 1
        row = {"stage": plan.name, **metrics, "time/step_s": time.perf_counter() - t}
        run.tracker.log(row, step=run.step)
        rows.append({**row, "step": run.step})
        if recipe.logging.audio_every and (i + 1) % recipe.logging.audio_every == 0 and trainer.last_samples:
            samples, scores = trainer.last_samples
            run.tracker.log_audio_table(run.step, samples, scores.components, scores.total, recipe.logging.audio_samples)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.4f}")
        if recipe.eval.every and (i + 1) % recipe.eval.every == 0 and i + 1 < cfg.steps:
            run_eval_suites(run.policy, run.suites, recipe, run.tracker, run.step, gather=gather)
        if i + 1 == cfg.steps:
            evaluate_stage(run, plan.name, trainer.worker, rows, gather=gather)
        if (i + 1) % recipe.run.save_every == 0 or i + 1 == cfg.steps:
            # prompts whose rollouts are still being generated (async) are generated again after a resume
            position = cursor.position - (cfg.prompts_per_step if trainer.pending else 0)
            more = {"lora_config": lora, "cursor": position, "algorithm": cfg.algorithm, "base": plan.base, **trainer.state()}
            with gather():
                save_checkpoint(run.policy, run.run_dir, run.step, run.checkpoint_state(plan.name, i + 1, **more),
                                recipe.run.keep_last, recipe.run.keep_every, extra=trainer.save)
    _say_rl_result(run, plan)


def _say_rl_result(run: Run, plan: StagePlan) -> None:
    g, algorithm = run.summary[plan.name], run.recipe.rl.algorithm
    keys = [k.removesuffix(" first 10%") for k in g if k.endswith(" first 10%")]
    components = ", ".join(f"{k.removeprefix('reward/')} {g[k + ' first 10%']:.3f} -> {g[k + ' last 10%']:.3f}" for k in keys[1:])
    label = algorithm.upper() if plan.name == "rl" else f"{plan.name} ({algorithm.upper()})"
    run.say(
        f"{label} reward/mean: first 10% of steps {g['reward/mean first 10%']:.3f} -> last 10% "
        f"{g['reward/mean last 10%']:.3f} ({components}); greedy on held-out prompts {g['eval']['reward/mean']:.3f}"
    )
    if g.get("style"):
        sft_style = run.summary.get("sft", {}).get("style") or {}
        run.say("style honoured on held-out prompts, greedy (after SFT -> after RL): " + ", ".join(
            f"{k} {sft_style[k]:.2f} -> {v:.2f}" if k in sft_style else f"{k} {v:.2f}" for k, v in g["style"].items()))
