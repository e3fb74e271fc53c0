"""The RL trainer: the GRPO family and PPO with a critic, one step as named phases.

`RLTrainer.step` reads top to bottom:
  collect      `group_size` responses to each of `prompts_per_step` prompts, scored by every
               reward component (with dynamic sampling, groups whose rewards all tie are
               dropped and refilled from later prompts);
  check        every rollout comes from the weights last synced;
  batch        the rollouts as padded tensors (`StepBatch`), prompts encoded once;
  reference    no-grad passes: the reference's log-probs (KL) and the critic's values (PPO);
  advantages   `algorithms.compute_advantages` by the recipe's estimator;
  update       `epochs` passes in `minibatches` optimiser steps, each accumulated over
               `grad_accum` micro-batches: `update.PolicyUpdate` in this process, or a
               data-parallel `trainer_group.TrainerGroup` (`rl.trainers`); the loss is
               `algorithms.policy_loss` over the tokens the policy produced;
  sync         the new weights to the rollout source, stamped with a new version, verified.
The maths lives in `algorithms.py`; this file only moves tensors between the phases.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.contract import RolloutSource
from vocalign.rollouts.sync import state_checksum

from . import algorithms as alg
from .allocator import keep_freed_memory
from .backends import Backend
from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel
from .update import PolicyUpdate, StepBatch, Updater, local_update, sequences

class PromptCursor:
    """The RL prompts in a seeded order, taken in turn; its position is saved in checkpoints."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        import numpy as np

        self.prompts = prompts
        self.order = np.random.default_rng(seed).permutation(len(prompts)).tolist()
        self.position = 0

    def take(self, n: int) -> list[Prompt]:
        picked = [self.prompts[self.order[(self.position + k) % len(self.order)]] for k in range(n)]
        self.position += n
        return picked


class PhaseTimer:
    """Seconds spent in each named phase of a step: `with timer("update"): ...`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.started

    def metrics(self) -> dict[str, float]:
        return {f"time/{phase}_s": s for phase, s in self.seconds.items()}


class RLTrainer:
    """GRPO family (`rl.algorithm: grpo`) or PPO with a critic (`ppo`)."""

    def __init__(
        self, policy: Policy, worker: RolloutSource, rewards: list[RewardSpec], config: RLConfig, loss: LossConfig,
        kl: KLConfig, seed: int, reward_workers: RewardWorkers | None = None, critic: ValueModel | None = None,
        async_generation: bool = False, updater: Updater | None = None,
    ) -> None:
        if config.algorithm == "ppo" and critic is None:
            raise ValueError("rl.algorithm=ppo needs a critic (ValueModel)")
        self.policy, self.worker, self.rewards, self.config, self.loss_cfg, self.kl_cfg = policy, worker, rewards, config, loss, kl
        self.seed, self.reward_workers, self.critic = seed, reward_workers, critic
        self.sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
        keep_freed_memory()  # reuse freed activations' memory instead of page-faulting it back every step
        if kl.coef > 0:
            policy.keep_reference()  # full weights: a frozen copy; under LoRA: nothing (adapters off)
        self.updater = updater if updater is not None else local_update(policy, config, loss, kl, seed, critic)
        self.kl_controller = (
            alg.AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.controller == "adaptive" else alg.FixedKLController(kl.coef)
        )
        self.kl_coef = kl.coef
        self.version = 0
        self.last_samples: tuple[list[Rollout], Any] | None = None
        # one step off-policy: the next step's rollouts are generated while this step updates
        self.async_generation = async_generation
        self._pending: Any = None

    @property
    def pending(self) -> bool:
        """Whether the next step's rollouts are being generated already (async generation)."""
        return self._pending is not None

    # -- checkpoint state ----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"version": self.version, "kl_coef": self.kl_coef, "kl_controller_coef": self.kl_controller.coef}

    def load_state(self, state: dict[str, Any], folder: Path) -> None:
        self.version, self.kl_coef = state["version"], state["kl_coef"]
        self.kl_controller.coef = state["kl_controller_coef"]
        self.worker.version = self.version
        self.updater.load(folder)

    def save(self, folder: Path) -> None:
        self.updater.save(folder)

    def close(self) -> None:
        """Release the backends (DeepSpeed engines and their process-wide changes) or the trainer group."""
        self.updater.close()

    @property
    def backend(self) -> Backend:
        """The policy's optimiser backend, when the update runs in this process."""
        return self._local_update().backend

    @property
    def critic_backend(self) -> Backend | None:
        return self._local_update().critic_backend

    def _local_update(self) -> PolicyUpdate:
        if not isinstance(self.updater, PolicyUpdate):
            raise AttributeError("the update runs in a trainer group: its optimisers live in the group's ranks")
        return self.updater

    # -- the step ------------------------------------------------------------------------
    def _seed(self, step: int, round_: int) -> int:
        return self.seed * 1_000_003 + step + 100_003 * round_

    def _rollout_round(self, prompts: list[Prompt], step: int, round_: int, timer: PhaseTimer,
                       cursor: PromptCursor | None = None) -> tuple[list[Rollout], Any]:
        with timer("rollout"):
            rollouts = self._generate(prompts, step, round_, cursor)
        with timer("reward"):
            scores = score(rollouts, self.rewards, self.reward_workers)
        return rollouts, scores

    def _generate(self, prompts: list[Prompt], step: int, round_: int, cursor: PromptCursor | None) -> list[Rollout]:
        if round_ == 0 and self._pending is not None:  # generated during the last update (one version behind)
            rollouts, self._pending = self.worker.collect(self._pending), None
        else:
            with self.updater.full_parameters():
                rollouts = self.worker.generate(prompts, self.config.group_size, self.sampling, seed=self._seed(step, round_))
        if round_ == 0 and self.async_generation and cursor is not None:
            # the next step's rollouts, generated with the weights of now while this step updates
            self._pending = self.worker.generate_async(
                cursor.take(self.config.prompts_per_step), self.config.group_size, self.sampling, seed=self._seed(step + 1, 0)
            )
        return rollouts

    def _collect(self, cursor: PromptCursor, step: int, timer: PhaseTimer) -> tuple[list[Rollout], torch.Tensor, dict[str, float]]:
        """Rollouts and their total rewards; with dynamic sampling, only groups whose rewards differ."""
        cfg, G = self.config, self.config.group_size
        prompts = [] if self._pending is not None else cursor.take(cfg.prompts_per_step)
        rollouts, scores = self._rollout_round(prompts, step, 0, timer, cursor)
        self.last_samples = (rollouts, scores)  # the first round as scored, for sample tables
        reward_metrics = scores.metrics()
        totals = torch.tensor(scores.total, dtype=torch.float32)
        extra: dict[str, float] = {}
        if cfg.dynamic_sampling:
            kept_r, kept_t = [], []
            seen = kept = 0
            for round_ in range(cfg.dynamic_sampling_tries + 1):
                if round_:
                    need = cfg.prompts_per_step - len(kept_r) // G
                    rollouts, scores = self._rollout_round(cursor.take(need), step, round_, timer)
                    totals = torch.tensor(scores.total, dtype=torch.float32)
                groups = totals.view(-1, G)
                varied = (groups.max(1).values - groups.min(1).values) > 1e-12
                seen += len(varied)
                for g in varied.nonzero().flatten().tolist():
                    if len(kept_r) // G < cfg.prompts_per_step:
                        kept_r += rollouts[g * G : (g + 1) * G]
                        kept_t.append(groups[g])
                        kept += 1
                if len(kept_r) // G >= cfg.prompts_per_step:
                    break
            extra = {"dynamic_sampling/kept_groups": float(kept), "dynamic_sampling/seen_groups": float(seen),
                     "dynamic_sampling/rounds": float(round_ + 1)}
            if not kept_r:  # every group tied: nothing to learn from; train on the last round (zero advantages)
                kept_r, kept_t = rollouts, [totals]
            rollouts, totals = kept_r, torch.cat(kept_t)
            for k, r in enumerate(rollouts):
                r.group = k // G
        return rollouts, totals, {**reward_metrics, **extra}

    def step(self, cursor: PromptCursor, step: int) -> tuple[dict[str, float], list[Rollout]]:
        """One RL step: collect -> check versions -> batch tensors -> reference and values
        -> advantages -> update -> sync -> metrics. Each phase is timed as `time/<phase>_s`."""
        timer = PhaseTimer()
        rollouts, totals, metrics = self._collect(cursor, step, timer)
        self._check_versions(rollouts)
        with timer("batch"):
            batch = self._batch_tensors(rollouts, totals)
        with timer("reference"):
            self._reference_and_values(batch)
        with timer("advantage"):
            self._advantages(batch)
        with timer("update"):
            lr, stats = self.updater.train_on(batch, step, self.kl_coef)
        with timer("sync"):
            kl_coef_used, measured_kl = self._update_kl_coef(batch)
            self.version += 1
            sync = self._sync()
        metrics.update(stats)
        metrics.update(self._step_metrics(batch, kl_coef_used, measured_kl, lr, sync, timer))
        return metrics, rollouts

    # -- the phases -----------------------------------------------------------------------
    def _check_versions(self, rollouts: list[Rollout]) -> None:
        """Every rollout comes from the weights just synced (or the ones before, with async generation)."""
        allowed = 1 if self.async_generation else 0
        stale = sorted(v for v in {r.weight_version for r in rollouts} if not 0 <= self.version - v <= allowed)
        if stale:
            raise RuntimeError(
                f"rollouts generated with weight version(s) {stale} at trainer version {self.version} "
                f"(allowed staleness {allowed}): a rollout worker did not take the last weight sync"
            )

    def _batch_tensors(self, rollouts: list[Rollout], totals: torch.Tensor) -> StepBatch:
        """The step's rollouts as padded tensors on the policy's device, prompts encoded once."""
        # the audio encoder is frozen: encode this step's prompts once, in one batch
        unique = list({r.prompt.id: r.prompt for r in rollouts}.values())
        with self.updater.full_parameters():
            encoded = dict(zip([p.id for p in unique], self.policy.encode_prompts(unique).encoded))
        width = max(len(r.response_ids) for r in rollouts)
        # tokens the policy produced: a multi-turn rollout's inserted tool results carry loss_mask 0
        produced = [[float(x) for x in r.loss_mask] if r.loss_mask is not None else [1.0] * len(r.response_ids)
                    for r in rollouts]
        # and only the tokens of parts that train (Qwen2.5-Omni's rl.train_parts; all elsewhere)
        mask = _padded([[x * w for x, w in zip(p, self.policy.trained_tokens(r.response_ids))]
                        for p, r in zip(produced, rollouts)], width)
        if self.loss_cfg.mask_truncated:
            mask[torch.tensor([not r.finished for r in rollouts])] = 0.0
        every = _padded([[1.0] * len(r.response_ids) for r in rollouts], width)  # tool results too
        old_logprobs = _padded([r.logprobs for r in rollouts], width)
        # built on the CPU from Python lists; the policy's forward runs where its weights are
        device = self.policy.device
        return StepBatch(rollouts, encoded, produced, mask.to(device), every.to(device), old_logprobs.to(device), totals.to(device))

    def _reference_and_values(self, batch: StepBatch) -> None:
        """No-grad passes: the reference's log-probs (KL) and the critic's values (PPO)."""
        if not (self.kl_coef > 0 or self.critic is not None):
            return
        cfg, width = self.config, batch.width
        ref_parts, value_parts = [], []
        chunk = -(-batch.size // (cfg.minibatches * cfg.grad_accum))
        self.policy.model.eval()
        with torch.no_grad(), self.updater.full_parameters():
            for start in range(0, batch.size, chunk):
                seqs = sequences(self.policy, batch, list(range(start, min(batch.size, start + chunk))))
                pad = (0, width - seqs.response_mask.shape[1])
                if self.kl_coef > 0:
                    with self.policy.reference() as ref:
                        ref_parts.append(torch.nn.functional.pad(ref.logprobs(seqs, cfg.temperature), pad))
                if self.critic is not None:
                    self.critic.eval()
                    value_parts.append(torch.nn.functional.pad(self.critic(seqs), pad))
        batch.ref_logprobs = torch.cat(ref_parts) if ref_parts else None
        batch.values = torch.cat(value_parts) if value_parts else None
        if batch.ref_logprobs is not None:
            kc = self.kl_cfg
            batch.token_kl = alg.kl_estimate(batch.old_logprobs, batch.ref_logprobs, kc.estimator, kc.max) * batch.mask

    def _advantages(self, batch: StepBatch) -> None:
        cfg = self.config
        in_reward = self.kl_cfg.mode == "reward" and batch.token_kl is not None
        estimator = "gae" if cfg.algorithm == "ppo" else cfg.advantage
        result = alg.compute_advantages(estimator, alg.AdvantageInput(
            batch.totals, cfg.group_size, batch.mask, batch.every, cfg.scale_rewards,
            token_kl=batch.token_kl if in_reward else None, kl_coef=self.kl_coef,
            values=batch.values, gamma=cfg.critic.gamma, lam=cfg.critic.lam,
        ))
        batch.advantages, batch.returns = result.advantages, result.returns

    def _update_kl_coef(self, batch: StepBatch) -> tuple[float, float]:
        """(the KL coefficient this step used, the measured KL per token); then the controller's update."""
        measured = float(batch.token_kl.sum() / batch.mask.sum().clamp(min=1)) if batch.token_kl is not None else 0.0
        used = self.kl_coef
        if self.kl_coef > 0:
            self.kl_coef = self.kl_controller.update(measured, batch.size)
        return used, measured

    def _sync(self) -> dict[str, float]:
        """Give the rollout workers the new weights, stamped with the new version, and check they hold them."""
        if self.worker.shares_weights(self.policy):
            self.worker.version = self.version  # in-process: the worker generates with the trainer's weights
            return {}
        # replicas: send the trainable state (the adapter only under LoRA), then check every
        # worker holds this version with this checksum
        with self.updater.full_parameters():
            state = self.policy.trainable_state()
        sync = self.worker.sync(state, self.version)
        self.worker.verify(self.version, state_checksum(state))
        return sync

    def _step_metrics(self, batch: StepBatch, kl_coef: float, kl: float, lr: float, sync: dict[str, float],
                      timer: PhaseTimer) -> dict[str, float]:
        rollouts, N = batch.rollouts, batch.size
        # tokens the policy generated (inserted tool results left out)
        own = [[i for i, k in zip(r.response_ids, p) if k] for r, p in zip(rollouts, batch.produced)]
        text_tokens = sum(sum(1 for i in ids if not self.policy.tokenizer.is_audio(i)) for ids in own)
        generated = sum(len(ids) for ids in own)
        step_s = timer.total()
        advantages = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None].expand(-1, batch.width)
        return {
            "batch/reward_mean": float(batch.totals.mean()),
            "kl": kl if batch.token_kl is not None else float("nan"),
            "kl_coef": kl_coef,
            "lr": lr,
            "advantage/mean": float(alg.masked_mean(advantages, batch.mask)),
            "response/tokens": generated / N,
            "response/text_tokens": text_tokens / N,
            "response/audio_tokens": (generated - text_tokens) / N,
            "response/speech_s": sum(r.speech_seconds for r in rollouts) / N,
            "response/finished": sum(r.finished for r in rollouts) / N,
            "response/samples": float(N),
            **timer.metrics(),
            "sync/bytes": float(sync.get("bytes", 0.0)),
            "rollouts/staleness": float(max(self.version - 1 - r.weight_version for r in rollouts)),
            "rollouts/restarts": float(self.worker.restarts),
            "throughput/tokens_per_s": generated / step_s,
            "throughput/samples_per_s": N / step_s,
        }

def _padded(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for k, row in enumerate(values):
        out[k, : len(row)] = torch.tensor(row)
    return out
