"""GRPO: group-normalised advantages, PPO's clipped loss and a k3 KL to the reference.

One step: sample `group_size` responses per prompt, score them, normalise the rewards
within each prompt's group, and take one clipped policy-gradient step on the tokens the
policy produced (prompt and padding are masked out).
"""

from __future__ import annotations

import time

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling
from vocalign.rewards import RewardSpec, score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.worker import RolloutWorker

from .algorithms import clipped_policy_loss, group_normalized_advantages, kl_k3, masked_mean
from .config import GRPOConfig


def grpo_lr(config: GRPOConfig, step: int) -> float:
    """The learning rate of GRPO step `step` (0-based): linear warm-up, then constant or a linear decay to 0."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_decay == "linear":
        warm *= max(0.0, 1.0 - step / max(1, config.steps))
    return config.lr * warm


class GRPOTrainer:
    def __init__(
        self, policy: Policy, worker: RolloutWorker, rewards: list[RewardSpec], config: GRPOConfig, seed: int,
        reward_workers: RewardWorkers | None = None,
    ) -> None:
        self.policy, self.worker, self.rewards, self.config, self.seed = policy, worker, rewards, config, seed
        self.reward_workers = reward_workers
        self.sampling = Sampling(config.temperature, config.top_p, config.max_new_tokens)
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.lr, weight_decay=0.0)
        self._encoded: dict[str, list[torch.Tensor]] = {}  # the encoder is frozen: cache its frames per prompt
        self.version = 0

    def _encoded_audio(self, prompts: list[Prompt]) -> list[list[torch.Tensor]]:
        todo = [p for p in prompts if p.id not in self._encoded]
        if todo:
            for p, frames in zip(todo, self.policy.encode_prompts(todo).encoded):
                self._encoded[p.id] = frames
        return [self._encoded[p.id] for p in prompts]

    def step(self, prompts: list[Prompt], step: int) -> tuple[dict[str, float], list[Rollout]]:
        cfg, G = self.config, self.config.group_size
        t0 = time.perf_counter()
        # 1. rollouts
        rollouts = self.worker.generate(prompts, G, self.sampling, seed=self.seed * 1_000_003 + step)
        t1 = time.perf_counter()
        # 2. rewards
        scores = score(rollouts, self.rewards, self.reward_workers)
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        advantages = group_normalized_advantages(rewards, G, scale=cfg.scale_rewards)
        t2 = time.perf_counter()
        # 3. policy update on the tokens the policy produced, in `minibatches` optimiser
        #    steps; after the first, the clipped ratio keeps the update near the sampler
        encoded = self._encoded_audio([r.prompt for r in rollouts])
        for group in self.optimizer.param_groups:
            group["lr"] = grpo_lr(cfg, step)
        self.policy.model.train()
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "grad_norm": [], "clip_frac": [], "neg_logprob": [], "tokens": []}
        order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(step)).tolist()
        size = -(-len(rollouts) // cfg.minibatches)
        for start in range(0, len(rollouts), size):
            rows = order[start : start + size]
            batch = self.policy.sequences(
                [rollouts[i].prompt_ids for i in rows], [rollouts[i].response_ids for i in rows], [encoded[i] for i in rows]
            )
            old = torch.zeros_like(batch.response_mask)
            for k, i in enumerate(rows):
                old[k, : len(rollouts[i].logprobs)] = torch.tensor(rollouts[i].logprobs)
            logprobs = self.policy.logprobs(batch, cfg.temperature)
            token_loss, clipped = clipped_policy_loss(logprobs, old, advantages[rows].to(logprobs.device), cfg.clip_eps)
            mask = batch.response_mask
            kl = torch.tensor(float("nan"))
            if cfg.kl_coef > 0:
                with torch.no_grad(), self.policy.reference():
                    ref = self.policy.logprobs(batch, cfg.temperature)
                token_kl = kl_k3(logprobs, ref, cfg.kl_max)
                token_loss = token_loss + cfg.kl_coef * token_kl
                kl = masked_mean(token_kl.detach(), mask)
            loss = masked_mean(token_loss, mask)
            self.optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.grad_clip)
            self.optimizer.step()
            stats["loss"].append(loss.item())
            stats["kl"].append(kl.item())
            stats["grad_norm"].append(grad_norm.item())
            stats["clip_frac"].append(masked_mean(clipped.float(), mask).item())
            stats["neg_logprob"].append(-masked_mean(logprobs.detach(), mask).item())
            stats["tokens"].extend(mask.sum(1).tolist())
        t3 = time.perf_counter()
        # 4. weight sync: an in-process worker shares the trainer's policy, so only the version moves
        self.version += 1
        if self.worker.policy is self.policy:
            self.worker.version = self.version
        else:
            self.worker.load_weights(self.policy.trainable_state(), self.version)
        metrics = {
            **scores.metrics(),
            **{k: sum(v) / len(v) for k, v in stats.items() if k != "tokens"},
            "response/tokens": sum(stats["tokens"]) / len(stats["tokens"]),
            "response/finished": sum(r.finished for r in rollouts) / len(rollouts),
            "response/speech_s": sum(r.speech_seconds for r in rollouts) / len(rollouts),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
        }
        return metrics, rollouts
