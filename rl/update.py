"""The update phase of an RL step: the policy loss over a batch's rollouts, in optimiser steps.

`PolicyUpdate` runs `rl.epochs` passes over a `StepBatch` in `rl.minibatches` optimiser
steps, each accumulated over `rl.grad_accum` micro-batches (`MicroBatch`). It runs in the
trainer's process, or once in each rank of a data-parallel `TrainerGroup`
(rl/trainer_group.py): then every rank takes its contiguous share of each minibatch, each
loss is divided by the whole minibatch's count (tokens or sequences), and the gradients
are summed across the ranks before the optimiser step, so the update is the same
whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from vocalign.common.ray_cluster import shard_bounds
from vocalign.data.types import Rollout
from vocalign.model.policy import Policy, SequenceBatch

from . import algorithms as alg
from .backends import Backend, make_backend
from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel, value_loss


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


class Updater(Protocol):
    """What runs the update phase: a `PolicyUpdate` in this process, or a `TrainerGroup`
    (rl/trainer_group.py) of data-parallel ranks. Either leaves the trainer's policy at the
    updated weights."""

    def train_on(self, batch: StepBatch, step: int, kl_coef: float) -> tuple[float, dict[str, float]]: ...

    def full_parameters(self) -> contextlib.AbstractContextManager: ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def close(self) -> None: ...


def local_update(policy: Policy, config: RLConfig, loss: LossConfig, kl: KLConfig, seed: int,
                 critic: ValueModel | None = None) -> PolicyUpdate:
    """The update in this process, on `rl.backend` (torch, or DeepSpeed ZeRO) for the policy and the critic."""
    options = {"zero_stage": config.deepspeed.zero_stage, "config": config.deepspeed.config}
    backend = make_backend(config.backend, policy.model, config.lr, config.grad_clip, options)
    critic_backend = make_backend(config.backend, critic, config.critic.lr, config.grad_clip, options) if critic is not None else None
    return PolicyUpdate(policy, backend, config, loss, kl, seed, critic, critic_backend)


class PolicyUpdate:
    """The policy (and PPO critic) optimiser steps of one RL step, on this process's rows.

    `rank` and `world` say which share of each minibatch is this process's (0 and 1 in
    the trainer's own process)."""

    def __init__(self, policy: Policy, backend: Backend, config: RLConfig, loss: LossConfig, kl: KLConfig, seed: int,
                 critic: ValueModel | None = None, critic_backend: Backend | None = None, rank: int = 0, world: int = 1) -> None:
        self.policy, self.backend, self.config, self.loss_cfg, self.kl_cfg, self.seed = policy, backend, config, loss, kl, seed
        self.critic, self.critic_backend, self.rank, self.world = critic, critic_backend, rank, world

    def train_on(self, batch: StepBatch, step: int, kl_coef: float) -> tuple[float, dict[str, float]]:
        """(the learning rate, the update's statistics averaged over its optimiser steps)."""
        lr = self.set_learning_rates(step)
        return lr, combine_ranks([self.optimiser_steps(batch, step, kl_coef)])

    def set_learning_rates(self, step: int) -> float:
        cfg = self.config
        lr = alg.scheduled_lr(cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps, step)
        self.backend.set_lr(lr)
        if self.critic_backend is not None:
            self.critic_backend.set_lr(alg.scheduled_lr(cfg.critic.lr, cfg.critic.warmup_steps, cfg.lr_decay, cfg.steps, step))
        return lr

    def optimiser_steps(self, batch: StepBatch, step: int, kl_coef: float) -> list[dict[str, float]]:
        """`epochs` passes over the batch in `minibatches` optimiser steps of `grad_accum`
        micro-batches of this rank's rows; per optimiser step, this rank's share of each
        statistic (summed over the ranks, the step's value) and the gradient norms."""
        cfg, N = self.config, batch.size
        if self.critic is not None:
            self.critic.train()
        self.policy.model.train()
        steps: list[dict[str, float]] = []
        for mb_rows in self.minibatches(N, step):
            mb_mask = batch.mask[mb_rows]
            units, tokens = alg.loss_units(mb_mask, self.loss_cfg.aggregation), float(mb_mask.sum())
            mine = self.share(mb_rows)
            parts: dict[str, float] = defaultdict(float)  # the minibatch's statistics, summed over its micro-batches
            micro = max(1, -(-len(mine) // cfg.grad_accum))
            for m_start in range(0, len(mine), micro):
                self._micro_step(batch, MicroBatch(mine[m_start : m_start + micro], units, tokens), kl_coef, parts)
            parts["grad_norm"] = self.backend.step()
            if self.critic_backend is not None:
                parts["critic/grad_norm"] = self.critic_backend.step()
            steps.append(dict(parts))
        return steps

    def minibatches(self, size: int, step: int) -> list[list[int]]:
        """The rows of each optimiser step of `step`: `epochs` seeded shuffles of a batch of
        `size`, each cut into `minibatches` (the same on every rank)."""
        cfg = self.config
        mb_size = -(-size // cfg.minibatches)
        out = []
        for epoch in range(cfg.epochs):
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 7919 + step * 131 + epoch)).tolist()
            out += [order[start : start + mb_size] for start in range(0, size, mb_size)]
        return out

    def share(self, rows: list[int]) -> list[int]:
        """This rank's contiguous share of a minibatch's rows (all of them in one process)."""
        bounds = shard_bounds(len(rows), self.world)
        if self.rank >= len(bounds):
            return []
        start, end = bounds[self.rank]
        return rows[start:end]

    def sequences(self, batch: StepBatch, rows: list[int]) -> SequenceBatch:
        return sequences(self.policy, batch, rows)

    # -- checkpoint state ----------------------------------------------------------------
    def full_parameters(self) -> contextlib.AbstractContextManager:
        """The policy's whole parameters in this process (a ZeRO-3 gather; otherwise nothing to do)."""
        return self.backend.full_parameters()

    def save(self, folder: Path) -> None:
        self.backend.save(folder)
        if self.critic is not None:
            with self.critic_backend.full_parameters():
                self.critic.save(folder)
            (Path(folder) / "critic").mkdir(exist_ok=True)
            self.critic_backend.save(Path(folder) / "critic")

    def load(self, folder: Path) -> None:
        self.backend.load(folder)
        if self.critic is not None:
            if self.config.backend != "deepspeed":  # DeepSpeed's own checkpoint restores the critic's weights
                self.critic.load(folder)
            self.critic_backend.load(Path(folder) / "critic")

    def close(self) -> None:
        """Release the backends (DeepSpeed engines and their process-wide changes)."""
        for backend in (self.backend, self.critic_backend):
            if backend is not None:
                backend.close()

    def _micro_step(self, batch: StepBatch, micro: MicroBatch, kl_coef: float, stats: dict[str, float]) -> None:
        """Forward and backward of one micro-batch; its statistics added to `stats` as its share of the minibatch's."""
        cfg, lc, kc, rows = self.config, self.loss_cfg, self.kl_cfg, micro.rows
        seqs = self.sequences(batch, rows)
        T = seqs.response_mask.shape[1]
        m, old = batch.mask[rows][:, :T], batch.old_logprobs[rows][:, :T]
        logprobs, entropy = self.policy.logprobs_and_entropy(seqs, cfg.temperature)
        adv = batch.advantages[rows]
        adv = adv if adv.dim() == 1 else adv[:, :T]  # per sequence (GRPO family) or per token (PPO)
        loss_out = alg.policy_loss(lc.policy, logprobs, old, adv, m, lc.clip_low, lc.clip_high, lc.ratio_max)
        token_loss = loss_out.token_loss
        if kl_coef > 0 and kc.mode == "loss":
            token_kl = alg.kl_estimate(logprobs, batch.ref_logprobs[rows][:, :T], kc.estimator, kc.max)
            if kc.importance_weighted:
                token_kl = alg.importance_weighted_kl(token_kl, loss_out.log_ratio)
            token_loss = token_loss + kl_coef * token_kl
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


def sequences(policy: Policy, batch: StepBatch, rows: list[int]) -> SequenceBatch:
    """Rows of `batch` packed as the policy's prompt-then-response sequences, prompts' audio encoded."""
    rollouts = batch.rollouts
    return policy.sequences(
        [rollouts[i].prompt_ids for i in rows], [rollouts[i].response_ids for i in rows],
        [batch.encoded[rollouts[i].prompt.id] for i in rows],
    )


def combine_ranks(per_rank: list[list[dict[str, float]]]) -> dict[str, float]:
    """The update's statistics from each rank's `optimiser_steps`: each optimiser step's
    statistics summed over the ranks (a gradient norm, the same on every rank, from rank
    0), then averaged over the optimiser steps."""
    totals: dict[str, list[float]] = defaultdict(list)
    for parts in zip(*per_rank):
        merged: dict[str, float] = defaultdict(float)
        for rank, part in enumerate(parts):
            for key, value in part.items():
                if not key.endswith("grad_norm"):
                    merged[key] += value
                elif rank == 0:
                    merged[key] = value
        for key, value in merged.items():
            totals[key].append(value)
    return {k: sum(v) / len(v) for k, v in totals.items() if v}
