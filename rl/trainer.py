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
               `grad_accum` micro-batches (`MicroBatch`); the loss is
               `algorithms.policy_loss` over the tokens the policy produced;
  sync         the new weights to the rollout source, stamped with a new version, verified.
The maths lives in `algorithms.py`; this file only moves tensors between the phases.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling, SequenceBatch
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.contract import RolloutSource
from vocalign.rollouts.sync import state_checksum

from . import algorithms as alg
from .allocator import keep_freed_memory
from .backends import make_backend
from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel, value_loss

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


@dataclass
class StepBatch:
    """One step's rollouts as tensors ([N, T], on the policy's device), filled phase by phase."""

    rollouts: list[Rollout]
    encoded: dict[str, list[torch.Tensor]]  # each prompt's audio features, by prompt id
    produced: list[list[float]]  # per rollout: 1 for the tokens the policy generated, 0 for inserted tool results
    mask: torch.Tensor  # the tokens the loss trains
    every: torch.Tensor  # every response token, inserted tool results included
    old_logprobs: torch.Tensor
    totals: torch.Tensor  # [N] total rewards
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None  # KL estimate per sampled token, against the reference
    advantages: torch.Tensor | None = None  # [N] (GRPO family) or [N, T] (PPO)
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.rollouts)

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclass(frozen=True)
class MicroBatch:
    """Rows of one micro-batch, with its minibatch's loss units and token count (the divisors
    that make a minibatch's loss and statistics independent of how it is split)."""

    rows: list[int]
    units: float
    tokens: float


class RLTrainer:
    """GRPO family (`rl.algorithm: grpo`) or PPO with a critic (`ppo`)."""

    def __init__(
        self, policy: Policy, worker: RolloutSource, rewards: list[RewardSpec], config: RLConfig, loss: LossConfig,
        kl: KLConfig, seed: int, reward_workers: RewardWorkers | None = None, critic: ValueModel | None = None,
        async_generation: bool = False,
    ) -> None:
        if config.algorithm == "ppo" and critic is None:
            raise ValueError("rl.algorithm=ppo needs a critic (ValueModel)")
        self.policy, self.worker, self.rewards, self.config, self.loss_cfg, self.kl_cfg = policy, worker, rewards, config, loss, kl
        self.seed, self.reward_workers, self.critic = seed, reward_workers, critic
        self.sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
        keep_freed_memory()  # reuse freed activations' memory instead of page-faulting it back every step
        if kl.coef > 0:
            policy.keep_reference()  # full weights: a frozen copy; under LoRA: nothing (adapters off)
        options = {"zero_stage": config.deepspeed.zero_stage, "config": config.deepspeed.config}
        self.backend = make_backend(config.backend, policy.model, config.lr, config.grad_clip, options)
        self.critic_backend = (
            make_backend(config.backend, critic, config.critic.lr, config.grad_clip, options) if critic is not None else None
        )
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
        self.backend.load(folder)
        if self.critic is not None:
            if self.config.backend != "deepspeed":  # DeepSpeed's own checkpoint restores the critic's weights
                self.critic.load(folder)
            self.critic_backend.load(Path(folder) / "critic")

    def save(self, folder: Path) -> None:
        self.backend.save(folder)
        if self.critic is not None:
            with self.critic_backend.full_parameters():
                self.critic.save(folder)
            (Path(folder) / "critic").mkdir(exist_ok=True)
            self.critic_backend.save(Path(folder) / "critic")

    def close(self) -> None:
        """Release the backends (DeepSpeed engines and their process-wide changes)."""
        for backend in (self.backend, self.critic_backend):
            if backend is not None:
                backend.close()

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
            with self.backend.full_parameters():
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

    def _sequences(self, batch: StepBatch, rows: list[int]) -> SequenceBatch:
        rollouts = batch.rollouts
        return self.policy.sequences(
            [rollouts[i].prompt_ids for i in rows], [rollouts[i].response_ids for i in rows],
            [batch.encoded[rollouts[i].prompt.id] for i in rows],
        )

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
            lr = self._set_learning_rates(step)
            stats = self._update(batch, step)
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
        with self.backend.full_parameters():
            encoded = dict(zip([p.id for p in unique], self.policy.encode_prompts(unique).encoded))
        width = max(len(r.response_ids) for r in rollouts)
        # tokens the policy produced: a multi-turn rollout's inserted tool results carry loss_mask 0
        produced = [[float(x) for x in r.loss_mask] if r.loss_mask is not None else [1.0] * len(r.response_ids)
                    for r in rollouts]
        mask = _padded(produced, width)
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
        with torch.no_grad(), self.backend.full_parameters():
            for start in range(0, batch.size, chunk):
                seqs = self._sequences(batch, list(range(start, min(batch.size, start + chunk))))
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

    def _set_learning_rates(self, step: int) -> float:
        cfg = self.config
        lr = alg.scheduled_lr(cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps, step)
        self.backend.set_lr(lr)
        if self.critic_backend is not None:
            self.critic_backend.set_lr(alg.scheduled_lr(cfg.critic.lr, cfg.critic.warmup_steps, cfg.lr_decay, cfg.steps, step))
        return lr

    def _update(self, batch: StepBatch, step: int) -> dict[str, float]:
        """`epochs` passes over the batch in `minibatches` optimiser steps of `grad_accum` micro-batches."""
        cfg, N = self.config, batch.size
        if self.critic is not None:
            self.critic.train()
        self.policy.model.train()
        stats: dict[str, list[float]] = defaultdict(list)
        mb_size = -(-N // cfg.minibatches)
        for epoch in range(cfg.epochs):
            order = torch.randperm(N, generator=torch.Generator().manual_seed(self.seed * 7919 + step * 131 + epoch)).tolist()
            for mb_start in range(0, N, mb_size):
                mb_rows = order[mb_start : mb_start + mb_size]
                mb_mask = batch.mask[mb_rows]
                micro = -(-len(mb_rows) // cfg.grad_accum)
                parts: dict[str, float] = defaultdict(float)  # the minibatch's statistics, summed over its micro-batches
                for m_start in range(0, len(mb_rows), micro):
                    rows = mb_rows[m_start : m_start + micro]
                    self._micro_step(batch, MicroBatch(rows, alg.loss_units(mb_mask, self.loss_cfg.aggregation), float(mb_mask.sum())), parts)
                for key, value in parts.items():
                    stats[key].append(value)
                stats["grad_norm"].append(self.backend.step())
                if self.critic_backend is not None:
                    stats["critic/grad_norm"].append(self.critic_backend.step())
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

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
        with self.backend.full_parameters():
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

    def _micro_step(self, batch: StepBatch, micro: MicroBatch, stats: dict[str, float]) -> None:
        """Forward and backward of one micro-batch; its statistics added to `stats` as its share of the minibatch's."""
        cfg, lc, kc, rows = self.config, self.loss_cfg, self.kl_cfg, micro.rows
        seqs = self._sequences(batch, rows)
        T = seqs.response_mask.shape[1]
        m, old = batch.mask[rows][:, :T], batch.old_logprobs[rows][:, :T]
        logprobs, entropy = self.policy.logprobs_and_entropy(seqs, cfg.temperature)
        adv = batch.advantages[rows]
        adv = adv if adv.dim() == 1 else adv[:, :T]  # per sequence (GRPO family) or per token (PPO)
        loss_out = alg.policy_loss(lc.policy, logprobs, old, adv, m, lc.clip_low, lc.clip_high, lc.ratio_max)
        token_loss = loss_out.token_loss
        if self.kl_coef > 0 and kc.mode == "loss":
            token_kl = alg.kl_estimate(logprobs, batch.ref_logprobs[rows][:, :T], kc.estimator, kc.max)
            if kc.importance_weighted:
                token_kl = alg.importance_weighted_kl(token_kl, loss_out.log_ratio)
            token_loss = token_loss + self.kl_coef * token_kl
        if lc.audio_token_weight != 1.0:
            token_loss = token_loss * (1.0 + (lc.audio_token_weight - 1.0) * self.policy.audio_token_mask(seqs))
        # the minibatch's mean, whatever the micro-batch split
        loss = alg.aggregate_loss(token_loss * m, m, lc.aggregation, norm=cfg.max_new_tokens, units=micro.units)
        self.backend.backward(loss)
        # each statistic as this micro-batch's share of the minibatch's value: the minibatch's
        # statistics are then the sums over its micro-batches, whatever the split
        share = float(m.sum()) / max(micro.tokens, 1e-12)
        with torch.no_grad():
            log_ratio = logprobs.detach() - old
            stats["loss"] += float(loss)  # already scaled to its share of the minibatch's loss
            stats["clip_frac"] += float(loss_out.clip_frac) * share
            if lc.ratio_max is not None:
                stats["clip_frac/dual"] += float(loss_out.dual_frac) * share
            stats["entropy"] += float(alg.masked_mean(entropy, m)) * share
            stats["approx_kl"] += float(alg.masked_mean(torch.expm1(log_ratio) - log_ratio, m)) * share
            stats["neg_logprob"] += float(-alg.masked_mean(logprobs.detach(), m)) * share
        if self.critic is not None:
            self._critic_micro_step(seqs, batch, rows, m, micro.tokens, share, stats)

    def _critic_micro_step(self, seqs: SequenceBatch, batch: StepBatch, rows: list[int], m: torch.Tensor,
                           mb_tokens: float, share: float, stats: dict[str, float]) -> None:
        T = m.shape[1]
        v = self.critic(seqs)
        vloss, vclipped = value_loss(v, batch.values[rows][:, :T], batch.returns[rows][:, :T], m, self.config.critic.value_clip)
        # token-mean over the minibatch, whatever the micro-batch split
        self.critic_backend.backward(vloss.sum() / max(mb_tokens, 1e-12))
        stats["critic/value_loss"] += float(alg.masked_mean(vloss.detach(), m)) * share
        stats["critic/clip_frac"] += float(alg.masked_mean(vclipped.float(), m)) * share
        stats["critic/value_mean"] += float(alg.masked_mean(v.detach(), m)) * share


def _padded(values: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(values), width)
    for k, row in enumerate(values):
        out[k, : len(row)] = torch.tensor(row)
    return out
