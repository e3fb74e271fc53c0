"""The RL trainer: the GRPO family and PPO with a critic, one readable step.

One step:
  1. rollouts: `group_size` responses to each of `prompts_per_step` prompts;
  2. rewards: every reward component, summed by weight; with dynamic sampling (DAPO),
     groups whose rewards are all equal are dropped and refilled from later prompts;
  3. advantages: GRPO family from the rewards of each group (group / RLOO /
     REINFORCE++); PPO from the critic's values by GAE. A KL to the reference is
     either subtracted from the reward here or added to the loss below;
  4. update: `epochs` passes over the batch in `minibatches` optimiser steps, each
     accumulated over `grad_accum` micro-batches. The loss covers only tokens the
     policy produced (prompt and padding masked, truncated responses too if asked),
     with audio tokens weighted by `loss.audio_token_weight`;
  5. weight sync to the rollout worker, stamped with a new version.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling, SequenceBatch
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.sync import state_checksum
from vocalign.rollouts.worker import RolloutWorker

from . import algorithms as alg
from .allocator import keep_freed_memory
from .backends import make_backend
from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel, value_loss

KL_ESTIMATORS = {"k1": alg.kl_k1, "k2": alg.kl_k2, "k3": alg.kl_k3}


def scheduled_lr(lr: float, warmup_steps: int, decay: str, steps: int, step: int) -> float:
    """The learning rate at RL step `step` (0-based): linear warm-up, then constant or a linear decay to 0."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if decay == "linear":
        warm *= max(0.0, 1.0 - step / max(1, steps))
    return lr * warm


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


def kl_estimate(config: KLConfig, logprobs: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    kl = KL_ESTIMATORS[config.estimator](logprobs, ref)
    return kl.clamp(min=-config.max, max=config.max)


class RLTrainer:
    """GRPO family (`rl.algorithm: grpo`) or PPO with a critic (`ppo`)."""

    def __init__(
        self, policy: Policy, worker: RolloutWorker, rewards: list[RewardSpec], config: RLConfig, loss: LossConfig,
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
        if async_generation and not hasattr(worker, "generate_async"):
            raise ValueError("rollouts.async_generation needs rollout workers (rollouts.num_workers >= 1)")
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
            if backend is not None and hasattr(backend, "close"):
                backend.close()

    # -- the step ------------------------------------------------------------------------
    def _seed(self, step: int, round_: int) -> int:
        return self.seed * 1_000_003 + step + 100_003 * round_

    def _rollout_round(self, prompts: list[Prompt], step: int, round_: int, timing: dict[str, float],
                       cursor: PromptCursor | None = None) -> tuple[list[Rollout], Any]:
        t0 = time.perf_counter()
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
        t1 = time.perf_counter()
        scores = score(rollouts, self.rewards, self.reward_workers)
        timing["time/rollout_s"] += t1 - t0
        timing["time/reward_s"] += time.perf_counter() - t1
        return rollouts, scores

    def _collect(self, cursor: PromptCursor, step: int) -> tuple[list[Rollout], torch.Tensor, dict[str, float], dict[str, float]]:
        """Rollouts and their total rewards; with dynamic sampling, only groups whose rewards differ."""
        cfg, G = self.config, self.config.group_size
        timing = {"time/rollout_s": 0.0, "time/reward_s": 0.0}
        prompts = [] if self._pending is not None else cursor.take(cfg.prompts_per_step)
        rollouts, scores = self._rollout_round(prompts, step, 0, timing, cursor)
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
                    rollouts, scores = self._rollout_round(cursor.take(need), step, round_, timing)
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
        return rollouts, totals, {**reward_metrics, **extra}, timing

    def _sequences(self, rollouts: list[Rollout], rows: list[int], encoded: dict[str, list[torch.Tensor]]) -> SequenceBatch:
        return self.policy.sequences(
            [rollouts[i].prompt_ids for i in rows], [rollouts[i].response_ids for i in rows],
            [encoded[rollouts[i].prompt.id] for i in rows],
        )

    def _padded(self, values: list[list[float]], rows: list[int], width: int) -> torch.Tensor:
        out = torch.zeros(len(rows), width)
        for k, i in enumerate(rows):
            out[k, : len(values[i])] = torch.tensor(values[i])
        return out

    def step(self, cursor: PromptCursor, step: int) -> tuple[dict[str, float], list[Rollout]]:
        cfg, lc, kc = self.config, self.loss_cfg, self.kl_cfg
        t_start = time.perf_counter()
        rollouts, totals, metrics, timing = self._collect(cursor, step)
        metrics.update(timing)
        allowed = 1 if self.async_generation else 0
        stale = sorted(v for v in {r.weight_version for r in rollouts} if not 0 <= self.version - v <= allowed)
        if stale:  # every rollout from the weights just synced (or the ones before, with async generation)
            raise RuntimeError(
                f"rollouts generated with weight version(s) {stale} at trainer version {self.version} "
                f"(allowed staleness {allowed}): a rollout worker did not take the last weight sync"
            )
        metrics["rollouts/staleness"] = float(max(self.version - r.weight_version for r in rollouts))
        t1 = time.perf_counter()
        N = len(rollouts)
        # the audio encoder is frozen: encode this step's prompts once, in one batch
        unique = list({r.prompt.id: r.prompt for r in rollouts}.values())
        with self.backend.full_parameters():
            encoded = dict(zip([p.id for p in unique], self.policy.encode_prompts(unique).encoded))
        R = max(len(r.response_ids) for r in rollouts)
        # tokens the policy produced: a multi-turn rollout's inserted tool results carry loss_mask 0
        produced = [
            [float(x) for x in r.loss_mask] if getattr(r, "loss_mask", None) is not None else [1.0] * len(r.response_ids)
            for r in rollouts
        ]
        mask = self._padded(produced, list(range(N)), R)
        every = self._padded([[1.0] * len(r.response_ids) for r in rollouts], list(range(N)), R)  # tool results too
        old_logprobs = self._padded([r.logprobs for r in rollouts], list(range(N)), R)
        if lc.mask_truncated:
            truncated = torch.tensor([not r.finished for r in rollouts])
            mask[truncated] = 0.0
        # built on the CPU from Python lists; the policy's forward runs where its weights are
        device = self.policy.device
        mask, every, old_logprobs, totals = (t.to(device) for t in (mask, every, old_logprobs, totals))
        # -- no-grad passes: reference log-probs (KL) and the critic's values (PPO) --------
        ref_logprobs = values = None
        chunk = -(-N // (cfg.minibatches * cfg.grad_accum))
        self.policy.model.eval()
        if self.kl_coef > 0 or (self.critic is not None):
            ref_parts, value_parts = [], []
            with torch.no_grad(), self.backend.full_parameters():
                for start in range(0, N, chunk):
                    rows = list(range(start, min(N, start + chunk)))
                    batch = self._sequences(rollouts, rows, encoded)
                    if self.kl_coef > 0:
                        with self.policy.reference() as ref:
                            ref_parts.append(torch.nn.functional.pad(ref.logprobs(batch, cfg.temperature), (0, R - batch.response_mask.shape[1])))
                    if self.critic is not None:
                        self.critic.eval()
                        value_parts.append(torch.nn.functional.pad(self.critic(batch), (0, R - batch.response_mask.shape[1])))
            ref_logprobs = torch.cat(ref_parts) if ref_parts else None
            values = torch.cat(value_parts) if value_parts else None
        # -- advantages -------------------------------------------------------------------
        token_kl = None
        if ref_logprobs is not None:
            token_kl = kl_estimate(kc, old_logprobs, ref_logprobs) * mask
        rewards = totals.clone()
        if kc.mode == "reward" and token_kl is not None and cfg.algorithm == "grpo":
            rewards = rewards - self.kl_coef * token_kl.sum(-1)
        returns = None
        if cfg.algorithm == "ppo":
            token_rewards = torch.zeros(N, R, device=device)
            last = (mask * torch.arange(1, R + 1, device=device)).argmax(-1)  # each response's last trained token
            token_rewards[torch.arange(N, device=device), last] = rewards
            if kc.mode == "reward" and token_kl is not None:
                token_rewards = token_rewards - self.kl_coef * token_kl
            # GAE runs through inserted tool results (the reward reaches the tokens before them); they train nothing
            advantages, returns = alg.gae_advantages(token_rewards, values, every, cfg.critic.gamma, cfg.critic.lam)
            mean = alg.masked_mean(advantages, mask)
            var = alg.masked_mean((advantages - mean) ** 2, mask)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask  # whitened over the batch's tokens
        elif cfg.advantage == "group":
            advantages = alg.group_normalized_advantages(
                rewards, cfg.group_size, scale=cfg.scale_rewards != "none",
                std_scope="batch" if cfg.scale_rewards == "batch" else "group",
            )
        elif cfg.advantage == "rloo":
            advantages = alg.rloo_advantages(rewards, cfg.group_size)
        else:
            advantages = alg.batch_normalized_advantages(rewards)
        t2 = time.perf_counter()
        # -- update -------------------------------------------------------------------------
        lr = scheduled_lr(cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps, step)
        self.backend.set_lr(lr)
        if self.critic_backend is not None:
            self.critic_backend.set_lr(scheduled_lr(cfg.critic.lr, cfg.critic.warmup_steps, cfg.lr_decay, cfg.steps, step))
            self.critic.train()
        self.policy.model.train()
        stats: dict[str, list[float]] = defaultdict(list)
        mb_size = -(-N // cfg.minibatches)
        for epoch in range(cfg.epochs):
            order = torch.randperm(N, generator=torch.Generator().manual_seed(self.seed * 7919 + step * 131 + epoch)).tolist()
            for mb_start in range(0, N, mb_size):
                mb_rows = order[mb_start : mb_start + mb_size]
                units = (self._units(mask[mb_rows]), float(mask[mb_rows].sum()))
                micro = -(-len(mb_rows) // cfg.grad_accum)
                parts: dict[str, float] = defaultdict(float)  # the minibatch's statistics, summed over its micro-batches
                for m_start in range(0, len(mb_rows), micro):
                    rows = mb_rows[m_start : m_start + micro]
                    self._micro_step(rollouts, rows, encoded, mask, old_logprobs, ref_logprobs, advantages, values, returns, units, parts)
                for key, value in parts.items():
                    stats[key].append(value)
                stats["grad_norm"].append(self.backend.step())
                if self.critic_backend is not None:
                    stats["critic/grad_norm"].append(self.critic_backend.step())
        t3 = time.perf_counter()
        # -- KL controller and weight sync ----------------------------------------------------
        measured_kl = float((token_kl.sum() / mask.sum().clamp(min=1))) if token_kl is not None else 0.0
        kl_coef_used = self.kl_coef
        if self.kl_coef > 0:
            self.kl_coef = self.kl_controller.update(measured_kl, N)
        self.version += 1
        sync: dict[str, float] = {}
        if self.worker.policy is self.policy:
            self.worker.version = self.version  # in-process: the worker shares the trainer's weights
        else:
            # rollout workers hold replicas: send the trainable state (the adapter only under
            # LoRA), then check every worker holds this version with this checksum
            with self.backend.full_parameters():
                state = self.policy.trainable_state()
            sync = self.worker.load_weights(state, self.version) or {}
            if hasattr(self.worker, "verify"):
                self.worker.verify(self.version, state_checksum(state))
        t4 = time.perf_counter()
        # -- metrics ---------------------------------------------------------------------------
        # tokens the policy generated (inserted tool results left out)
        own = [[i for i, k in zip(r.response_ids, p) if k] for r, p in zip(rollouts, produced)]
        text_tokens = [sum(1 for i in ids if not self.policy.tokenizer.is_audio(i)) for ids in own]
        audio_tokens = [len(ids) - t for ids, t in zip(own, text_tokens)]
        generated = sum(len(ids) for ids in own)
        step_s = time.perf_counter() - t_start
        metrics.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        metrics.update({
            "batch/reward_mean": float(totals.mean()),
            "kl": measured_kl if token_kl is not None else float("nan"),
            "kl_coef": kl_coef_used,
            "lr": lr,
            "advantage/mean": float(alg.masked_mean(advantages if advantages.dim() == 2 else advantages[:, None].expand(-1, R), mask)),
            "response/tokens": generated / N,
            "response/text_tokens": sum(text_tokens) / N,
            "response/audio_tokens": sum(audio_tokens) / N,
            "response/speech_s": sum(r.speech_seconds for r in rollouts) / N,
            "response/finished": sum(r.finished for r in rollouts) / N,
            "response/samples": float(N),
            "time/update_s": t3 - t2,
            "time/sync_s": t4 - t3,
            "time/advantage_s": t2 - t1,
            "sync/bytes": float(sync.get("bytes", 0.0)),
            "rollouts/restarts": float(getattr(self.worker, "restarts", 0)),
            "throughput/tokens_per_s": generated / step_s,
            "throughput/samples_per_s": N / step_s,
        })
        return metrics, rollouts

    def _units(self, mask: torch.Tensor) -> float:
        """How many units a minibatch's loss is averaged over: tokens (token-mean) or sequences."""
        return float(mask.sum()) if self.loss_cfg.aggregation == "token-mean" else float(mask.shape[0])

    def _micro_step(self, rollouts, rows, encoded, mask, old_logprobs, ref_logprobs, advantages, values, returns, units, stats) -> None:
        cfg, lc, kc = self.config, self.loss_cfg, self.kl_cfg
        units, mb_tokens = units
        batch = self._sequences(rollouts, rows, encoded)
        T = batch.response_mask.shape[1]
        m, old = mask[rows][:, :T], old_logprobs[rows][:, :T]
        logprobs, entropy = self.policy.logprobs_and_entropy(batch, cfg.temperature)
        adv = advantages[rows]
        if lc.policy == "gspo":
            adv_seq = adv if adv.dim() == 1 else adv.sum(-1) / m.sum(-1).clamp(min=1)
            token_loss, clipped = alg.gspo_policy_loss(logprobs, old, adv_seq, m, lc.clip_low, lc.clip_high, lc.ratio_max)
            clip_frac = clipped.float().mean()
            log_ratio = alg.sequence_log_ratio(logprobs, old, m).unsqueeze(-1)
            dual_frac = alg.dual_clipped(log_ratio.detach().exp().squeeze(-1), adv_seq, lc.ratio_max).float().mean()
        else:
            adv = adv if adv.dim() == 1 else adv[:, :T]  # per sequence (GRPO family) or per token (PPO)
            token_loss, clipped = alg.clipped_policy_loss(logprobs, old, adv, lc.clip_low, lc.clip_high, lc.ratio_max)
            clip_frac = alg.masked_mean(clipped.float(), m)
            log_ratio = logprobs - old
            token_adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
            dual_frac = alg.masked_mean(alg.dual_clipped(log_ratio.detach().exp(), token_adv, lc.ratio_max).float(), m)
        if self.kl_coef > 0 and kc.mode == "loss":
            token_kl = kl_estimate(kc, logprobs, ref_logprobs[rows][:, :T])
            if kc.importance_weighted:
                token_kl = alg.importance_weighted_kl(token_kl, log_ratio)
            token_loss = token_loss + self.kl_coef * token_kl
        weights = m
        if lc.audio_token_weight != 1.0:
            weights = m * (1.0 + (lc.audio_token_weight - 1.0) * self.policy.audio_token_mask(batch))
        token_loss = token_loss * weights
        loss = alg.aggregate_loss(token_loss, m, lc.aggregation, norm=cfg.max_new_tokens)
        loss = loss * (self._units(m) / max(units, 1e-12))  # the minibatch's mean, whatever the micro-batch split
        self.backend.backward(loss)
        # each statistic as this micro-batch's share of the minibatch's value: the minibatch's
        # statistics are then the sums over its micro-batches, whatever the split
        share = float(m.sum()) / max(mb_tokens, 1e-12)
        with torch.no_grad():
            log_ratio = logprobs.detach() - old
            stats["loss"] += float(loss)  # already scaled to its share of the minibatch's loss
            stats["clip_frac"] += float(clip_frac) * share
            if lc.ratio_max is not None:
                stats["clip_frac/dual"] += float(dual_frac) * share
            stats["entropy"] += float(alg.masked_mean(entropy, m)) * share
            stats["approx_kl"] += float(alg.masked_mean(torch.expm1(log_ratio) - log_ratio, m)) * share
            stats["neg_logprob"] += float(-alg.masked_mean(logprobs.detach(), m)) * share
        if self.critic is not None:
            v = self.critic(batch)
            vloss, vclipped = value_loss(v, values[rows][:, :T], returns[rows][:, :T], m, cfg.critic.value_clip)
            # token-mean over the minibatch, whatever the micro-batch split
            self.critic_backend.backward(vloss.sum() / max(mb_tokens, 1e-12))
            stats["critic/value_loss"] += float(alg.masked_mean(vloss.detach(), m)) * share
            stats["critic/clip_frac"] += float(alg.masked_mean(vclipped.float(), m)) * share
            stats["critic/value_mean"] += float(alg.masked_mean(v.detach(), m)) * share
