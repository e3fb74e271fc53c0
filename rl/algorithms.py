"""The math of policy optimisation, as small pure tensor functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vocalign.common.registry import Registry


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
    units: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss from per-token losses ([B, T]) over the tokens where `mask` is 1.

    - `token-mean`: the mean over every token of the batch (long responses weigh more);
    - `seq-mean-token-mean`: each sequence's token mean, then the mean over sequences
      (GRPO's original form);
    - `seq-mean-token-sum-norm`: each sequence's token sum divided by a constant `norm`
      (default: T, the padded length), then the mean over sequences (Dr.GRPO: no length bias).

    `units`, when given, replaces this batch's own count as the divisor of the final mean:
    tokens for `token-mean`, sequences for the other two. Pass the count of the whole
    minibatch (all its micro-batches, and ranks when the gradients are summed) so that
    the minibatch's loss is the same however it is split into micro-batches (DAPO; TRL's
    `num_items_in_batch`). Without it, each micro-batch is its own mean (TRL's "bnpo").
    """
    mask = mask.to(token_loss.dtype)
    if mode == "token-mean":
        mean = masked_mean(token_loss, mask)
    elif mode == "seq-mean-token-mean":
        mean = ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif mode == "seq-mean-token-sum-norm":
        mean = ((token_loss * mask).sum(-1) / (norm or token_loss.shape[-1])).mean()
    else:
        raise ValueError(f"loss aggregation {mode!r} is not known; use one of {', '.join(AGGREGATIONS)}")
    if units is None:
        return mean
    if float(units) < 0:
        raise ValueError(f"units={float(units)} must not be negative: it is the minibatch's number of tokens or sequences")
    # a minibatch with no trained token (all truncated and masked) gives a zero loss
    return mean * (loss_units(mask, mode) / max(float(units), 1e-12))


def scheduled_lr(lr: float, warmup_steps: int, decay: str, steps: int, step: int) -> float:
    """The learning rate at step `step` (0-based): linear warm-up, then constant or a linear decay to 0."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if decay == "linear":
        warm *= max(0.0, 1.0 - step / max(1, steps))
    return lr * warm


def loss_units(mask: torch.Tensor, mode: str) -> float:
    """What `aggregate_loss` averages over in `mask`'s rows: tokens (token-mean) or sequences."""
    return float(mask.sum()) if mode == "token-mean" else float(mask.shape[0])


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(policy || reference) per token: log policy - log reference (unbiased, can be negative)."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 estimator per token: (log policy - log reference)^2 / 2 (biased, low variance, never negative)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1, d = ref - policy.

    Written as expm1(d) - d: in float32, exp(d) - 1 cancels to 0 for small d. The
    estimate grows like exp(d) on a sampled token the policy has learned to avoid but the
    reference likes (d = 8 gives about 2,970), so a single such token can swamp a
    batch's loss; `kl_estimate` caps each token's estimate there (its gradient is then 0),
    as verl's "low_var_kl" does at 10.
    """
    d = ref_logprobs - logprobs
    return torch.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", max_kl: float = 10.0) -> torch.Tensor:
    """Per-token KL(policy || reference) by the named estimator, each token's estimate within [-max_kl, max_kl]."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {estimator!r} is not known; use one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs).clamp(min=-max_kl, max=max_kl)


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


# -- registries: an estimator or a loss is one function, looked up by the name a recipe gives --


@dataclass(frozen=True)
class AdvantageInput:
    """What an advantage estimator may use: one step's batch, N responses padded to T tokens.

    `rewards` are the responses' total rewards ([N], grouped by prompt, `group_size` each);
    `mask` marks the tokens the loss trains ([N, T]) and `every` all response tokens,
    inserted tool results included. `token_kl` ([N, T]), when given, is subtracted from the
    reward times `kl_coef` (KL in reward mode): summed per sequence for the GRPO family, per
    token for GAE. `values` are the critic's ([N, T]); GAE needs them.
    """

    rewards: torch.Tensor
    group_size: int
    mask: torch.Tensor
    every: torch.Tensor
    scale_rewards: str = "group"  # group advantages: "group", "batch" or "none"
    token_kl: torch.Tensor | None = None
    kl_coef: float = 0.0
    values: torch.Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95


@dataclass(frozen=True)
class Advantages:
    """Per sequence ([N]; the GRPO family) or per token ([N, T]; GAE), and GAE's value targets."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


AdvantageEstimator = Callable[[AdvantageInput], Advantages]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry(
    "advantage estimator", "Register one with @register_advantage(name) (vocalign.rl.algorithms).")
# @register_advantage("name") registers an estimator under the value of `rl.advantage` ("gae" is PPO's)
register_advantage = ADVANTAGE_ESTIMATORS.register


def compute_advantages(estimator: str, batch: AdvantageInput) -> Advantages:
    """The advantages of one step by the named estimator (group, rloo, reinforce++ or gae)."""
    return ADVANTAGE_ESTIMATORS.get(estimator)(batch)


def _sequence_rewards(batch: AdvantageInput) -> torch.Tensor:
    """Each response's reward, less its summed KL penalty in reward mode."""
    if batch.token_kl is None:
        return batch.rewards.clone()
    return batch.rewards - batch.kl_coef * batch.token_kl.sum(-1)


@register_advantage("group")
def _group(batch: AdvantageInput) -> Advantages:
    scale = batch.scale_rewards != "none"
    scope = "batch" if batch.scale_rewards == "batch" else "group"
    return Advantages(group_normalized_advantages(_sequence_rewards(batch), batch.group_size, scale=scale, std_scope=scope))


@register_advantage("rloo")
def _rloo(batch: AdvantageInput) -> Advantages:
    return Advantages(rloo_advantages(_sequence_rewards(batch), batch.group_size))


@register_advantage("reinforce++")
def _reinforce_pp(batch: AdvantageInput) -> Advantages:
    return Advantages(batch_normalized_advantages(_sequence_rewards(batch)))


@register_advantage("gae")
def _gae(batch: AdvantageInput) -> Advantages:
    """PPO: the reward on each response's last trained token (less a per-token KL penalty),
    GAE with the critic's values, then whitened over the batch's trained tokens."""
    if batch.values is None:
        raise ValueError("GAE advantages need the critic's values (rl.algorithm=ppo builds a critic)")
    mask = batch.mask
    N, T = mask.shape
    token_rewards = torch.zeros(N, T, device=mask.device)
    last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(-1)  # each response's last trained token
    token_rewards[torch.arange(N, device=mask.device), last] = batch.rewards
    if batch.token_kl is not None:
        token_rewards = token_rewards - batch.kl_coef * batch.token_kl
    # GAE runs through inserted tool results (the reward reaches the tokens before them); they train nothing
    advantages, returns = gae_advantages(token_rewards, batch.values, batch.every, batch.gamma, batch.lam)
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean) ** 2, mask)
    return Advantages((advantages - mean) * torch.rsqrt(var + 1e-8) * mask, returns)


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss per token ([B, T], not yet aggregated), the log-ratio that weights an
    importance-weighted KL ([B, T] or [B, 1]), and the fractions clipped and dual-clipped."""

    token_loss: torch.Tensor
    log_ratio: torch.Tensor
    clip_frac: torch.Tensor
    dual_frac: torch.Tensor


PolicyLossFn = Callable[..., PolicyLoss]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry(
    "policy loss", "Register one with @register_policy_loss(name) (vocalign.rl.algorithms).", "policy losses")
# @register_policy_loss("name") registers a loss under the value of `loss.policy`. It takes (logprobs,
# old_logprobs, advantages, mask, clip_low, clip_high, ratio_max), advantages per sequence ([B]) or
# per token ([B, T]), and returns a `PolicyLoss`.
register_policy_loss = POLICY_LOSSES.register
# old spellings still accepted, with the name to use instead
POLICY_LOSS_ALIASES = {"ppo": "clip"}


def policy_loss(
    name: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip_low: float, clip_high: float | None = None, ratio_max: float | None = None,
) -> PolicyLoss:
    """The named policy loss of one micro-batch."""
    return POLICY_LOSSES.get(POLICY_LOSS_ALIASES.get(name, name))(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio_max)


@register_policy_loss("clip")
def _token_clip(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio_max) -> PolicyLoss:
    """PPO's clipped surrogate on each token's ratio (GRPO, DAPO)."""
    token_loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high, ratio_max)
    log_ratio = logprobs - old_logprobs
    token_adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    dual = dual_clipped(log_ratio.detach().exp(), token_adv, ratio_max)
    return PolicyLoss(token_loss, log_ratio, masked_mean(clipped.float(), mask), masked_mean(dual.float(), mask))


@register_policy_loss("gspo")
def _sequence_clip(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio_max) -> PolicyLoss:
    """GSPO: the clipped surrogate on each sequence's ratio; per-token advantages (GAE) are
    averaged over each sequence's trained tokens."""
    if advantages.dim() == 2:
        advantages = advantages.sum(-1) / mask.sum(-1).clamp(min=1)
    token_loss, clipped = gspo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio_max)
    log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask).unsqueeze(-1)
    dual = dual_clipped(log_ratio.detach().exp().squeeze(-1), advantages, ratio_max)
    return PolicyLoss(token_loss, log_ratio, clipped.float().mean(), dual.float().mean())
