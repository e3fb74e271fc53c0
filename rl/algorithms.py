"""The math of policy optimisation, as small pure tensor functions."""

from __future__ import annotations

import torch


def group_normalized_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std when `scale`.

    `rewards` is flat, grouped by prompt ([P * group_size]); the result has the same shape.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 samples to normalise within")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token ([B, T]) and whether each token was clipped.

    `advantages` is per sequence ([B]) and applies to every token of it.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, max_kl: float | None = None) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1, d = ref - policy.

    Written as expm1(d) - d: in float32, exp(d) - 1 cancels to 0 for small d. The
    estimate grows like exp(d) on a sampled token the policy has learned to avoid but the
    reference likes (d = 8 gives about 2,970), so a single such token can swamp a
    batch's loss; `max_kl` caps each token's estimate there (its gradient is then 0), as
    verl's "low_var_kl" does at 10.
    """
    d = ref_logprobs - logprobs
    kl = torch.expm1(d) - d
    return kl if max_kl is None else kl.clamp(max=max_kl)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is 1 (token-mean aggregation)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
