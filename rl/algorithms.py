"""The math of policy optimisation, as small pure tensor functions."""

from __future__ import annotations

import torch


STD_SCOPES = ("group", "batch")


def group_normalized_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6, std_scope: str = "group"
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by a reward std when `scale`.

    `rewards` is flat, grouped by prompt ([P * group_size]); the result has the same shape
    and dtype. `std_scope` picks the std: "group" (GRPO: each group's own) or "batch" (one
    std of all the rewards, "Lite PPO", TRL's scale_rewards="batch"), which keeps a group
    whose rewards barely differ from having its tiny differences blown up to unit size.
    `eps` is added to the std (TRL uses 1e-4).

    A group whose rewards are all equal gets exactly 0, whatever their value and dtype.
    Rounding makes that a rule of its own: in float32 the mean of 8 rewards tied at 0.1
    differs from 0.1 by about one ulp, and dividing that residual by (0 + eps) gave every
    sample of the group the same spurious advantage (up to ~0.1). The statistics are
    computed in float64, and tied groups are set to 0 by an exact comparison.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 samples to normalise within")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope={std_scope!r} is not known; use one of {', '.join(STD_SCOPES)}")
    grouped = rewards.view(-1, group_size).to(torch.float64)
    tied = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if std_scope == "group" else grouped.std()
        adv = adv / (std + eps)
    return adv.masked_fill(tied, 0.0).to(rewards.dtype).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* samples of its group.

    Equal to G / (G - 1) times the reward minus the group mean (Ahmadian et al., 2024).
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: leave-one-out needs at least 2 samples per group")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def batch_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: rewards normalised over the whole batch (no groups, no critic).

    Computed in float64; a batch whose rewards are all equal gets exactly 0 (see
    `group_normalized_advantages` for why that needs its own rule).
    """
    flat = rewards.to(torch.float64)
    if bool(flat.amax() == flat.amin()):
        return torch.zeros_like(rewards)
    return ((flat - flat.mean()) / (flat.std() + eps)).to(rewards.dtype)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens ([B, T]) for PPO with a critic.

    `rewards[b, t]` is the reward after token t (usually the sequence reward on its last
    token, minus any per-token KL); `values` are the critic's estimates; the value after
    the last response token is 0. Returns (advantages, returns = advantages + values),
    zero where `mask` is 0.
    """
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float, clip_high: float | None, ratio_max: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_high) * A), and where the clip changed the loss.

    `ratio_max` also caps the unclipped ratio ("dual clip", TRL's `delta`): with a
    negative advantage the plain min keeps ratio * A however large the ratio grows, so one
    token the policy has come to like far more than the sampler did can dominate the
    loss; the cap bounds it. It should exceed 1 + clip_high, and then only changes tokens
    with A < 0 and ratio > ratio_max.
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + (clip_eps if clip_high is None else clip_high)) * advantages
    capped = unclipped if ratio_max is None else ratio.clamp(max=ratio_max) * advantages
    surrogate = torch.minimum(capped, clipped)
    return -surrogate, surrogate != unclipped


def dual_clipped(ratio: torch.Tensor, advantages: torch.Tensor, ratio_max: float | None) -> torch.Tensor:
    """Where the dual clip (`ratio_max`) capped the loss: A < 0 and ratio > ratio_max.

    The clipped losses flag these as clipped, since the cap changed their loss; TRL's
    `clip_ratio/region_mean` does not (it counts ratio < 1 - eps with A < 0 and ratio >
    1 + eps_high with A > 0 only), so its value is our clip fraction minus this one's.
    """
    if ratio_max is None:
        return torch.zeros_like(ratio, dtype=torch.bool)
    return (advantages < 0) & (ratio > ratio_max)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_high: float | None = None,
    ratio_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token ([B, T]) and whether each token was clipped.

    `advantages` is per sequence ([B], applied to every token of it; the GRPO family) or
    per token ([B, T]; PPO's GAE). The ratio is
    clipped to [1 - clip_eps, 1 + clip_high]; `clip_high` defaults to `clip_eps`, and a
    larger one (DAPO's "clip-higher", e.g. 0.28 with 0.2) leaves unlikely tokens more
    room to grow. `ratio_max` caps the ratio of negative-advantage tokens (dual clip).
    """
    return _clipped_surrogate(
        torch.exp(logprobs - old_logprobs), advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages,
        clip_eps, clip_high, ratio_max,
    )


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean token log-ratio over its `mask`ed tokens ([B]): the log of GSPO's ratio."""
    mask = mask.to(logprobs.dtype)
    return ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_high: float | None = None,
    ratio_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO: PPO's clipped surrogate on a sequence-level ratio (Zheng et al., 2025).

    Each sequence's ratio is the geometric mean of its token ratios,
    exp(mean over its tokens of logprob - old_logprob); every token of the sequence
    carries it (its gradient flows through each token's logprob). Returns the per-token
    loss ([B, T]) and whether each sequence was clipped ([B]).
    """
    mask = mask.to(logprobs.dtype)
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)
    per_sequence, clipped = _clipped_surrogate(torch.exp(log_ratio), advantages, clip_eps, clip_high, ratio_max)
    return per_sequence.unsqueeze(-1).expand_as(logprobs) * mask, clipped


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    norm: int | None = None,
    token_count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss from per-token losses ([B, T]) over the tokens where `mask` is 1.

    - `token-mean`: the mean over every token of the batch (long responses weigh more);
      `token_count`, when given, replaces this batch's token count as the divisor: pass
      the count of the whole optimiser step (all its micro-batches, and ranks when the
      gradients are summed) so that every token weighs the same however the step is split
      into micro-batches (DAPO; TRL's `num_items_in_batch`). Without it, each micro-batch
      is its own token mean (TRL's "bnpo");
    - `seq-mean-token-mean`: each sequence's token mean, then the mean over sequences
      (GRPO's original form);
    - `seq-mean-token-sum-norm`: each sequence's token sum divided by a constant `norm`
      (default: T, the padded length), then the mean over sequences (Dr.GRPO: no length bias).
    """
    mask = mask.to(token_loss.dtype)
    if mode == "token-mean":
        if token_count is None:
            return masked_mean(token_loss, mask)
        if float(token_count) <= 0:
            raise ValueError(f"token_count={float(token_count)} must be positive: it is the step's number of response tokens")
        return (token_loss * mask).sum() / token_count
    if token_count is not None:
        raise ValueError(f"token_count is the divisor of token-mean aggregation; loss aggregation {mode!r} does not use it")
    per_sequence = (token_loss * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        return (per_sequence / mask.sum(-1).clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return (per_sequence / (norm or token_loss.shape[-1])).mean()
    raise ValueError(f"loss aggregation {mode!r} is not known; use one of {', '.join(AGGREGATIONS)}")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(policy || reference) per token: log policy - log reference (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator per token: (log policy - log reference)^2 / 2 (biased, low variance, never negative)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


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


def importance_weighted_kl(token_kl: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """A per-token KL estimate ([B, T]) weighted by the importance ratio pi / pi_old.

    The responses were sampled from the old policy, not the current one, so the k3
    estimate's gradient is a biased estimate of the reverse KL's gradient once they
    differ; weighting by the ratio corrects it (DeepSeek-V3.2; TRL's
    `use_bias_correction_kl`, on by default there). The ratio is differentiable, so this
    changes the gradient even on-policy, where its value is 1: it adds kl * grad(logprob).
    `log_ratio` is per token ([B, T]) or per sequence ([B, 1], e.g. GSPO's
    `sequence_log_ratio(...).unsqueeze(-1)`).
    """
    return token_kl * torch.exp(log_ratio)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is 1 (token-mean aggregation)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


class FixedKLController:
    """A constant KL weight."""

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def update(self, kl: float, n_steps: int) -> float:
        return self.coef


class AdaptiveKLController:
    """Keeps the measured KL near `target` (Ziegler et al., 2019): after each batch the
    weight is multiplied by 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got target={target}, horizon={horizon})")
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef
