"""The policy-optimisation math (`vocalign.rl.algorithms`) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vocalign.rl.algorithms import (
    batch_normalized_advantages,
    clipped_policy_loss,
    gae_advantages,
    group_normalized_advantages,
    kl_estimate,
    kl_k3,
    masked_mean,
    rloo_advantages,
)

# --- group-normalised advantages -------------------------------------------------------


def test_advantages_subtract_the_group_mean_without_scaling() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.5; group 2: every reward equals the mean
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_normalized_advantages(rewards, 4, scale=False), expected)


def test_advantages_divide_by_the_group_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: deviations +-0.5, sample std sqrt((4 * 0.25) / 3) = 1/sqrt(3), so +-sqrt(3)/2.
    # group 2: no spread; eps keeps 0 / 0 from becoming NaN, and the advantages stay 0.
    half_root3 = math.sqrt(3) / 2
    expected = torch.tensor([half_root3, -half_root3, -half_root3, half_root3, 0.0, 0.0, 0.0, 0.0])
    advantages = group_normalized_advantages(rewards, 4, scale=True)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-5)
    assert advantages.shape == rewards.shape


def test_advantages_of_an_uneven_group() -> None:
    # mean 0.75, deviations (-0.75, -0.75, -0.75, 2.25), sample variance 6.75 / 3 = 2.25, std 1.5
    rewards = torch.tensor([0.0, 0.0, 0.0, 3.0, 2.0, 4.0, 2.0, 4.0])
    # second group: mean 3, deviations +-1, sample std sqrt(4 / 3)
    g2 = 1 / math.sqrt(4 / 3)
    expected = torch.tensor([-0.5, -0.5, -0.5, 1.5, -g2, g2, -g2, g2])
    torch.testing.assert_close(group_normalized_advantages(rewards, 4), expected, rtol=0, atol=1e-5)


def demo_tie_values() -> list[float]:
    """Every total the demo's reward weights give a group whose samples all score alike.

    Components as the demo's rewards return them: correctness 0/1 or None, the spoken
    answer's 1 - WER for answers of up to three words, the fraction of up to two requested
    style attributes (or None); totals combined by the reward registry itself.
    """
    from vocalign.rewards.registry import _combine
    from vocalign.rl.config import Recipe
    from vocalign.rl.recipe import load_recipe

    specs = load_recipe("demo", [], Recipe).rewards
    assert [s.name for s in specs] == ["correctness", "speech_consistency", "paralinguistic"]
    values = {
        "correctness": [None, 0.0, 1.0],
        "speech_consistency": [None, 0.0, 1 / 3, 0.5, 2 / 3, 1.0],
        "paralinguistic": [None, 0.0, 0.5, 1.0],
    }
    ties = set()
    for c in values["correctness"]:
        for s in values["speech_consistency"]:
            for p in values["paralinguistic"]:
                ties.add(_combine(specs, [([c], 0), ([s], 0), ([p], 0)], 1).total[0])
    return sorted(ties)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [2, 3, 5, 6, 7, 8, 16])
def test_tied_groups_get_exactly_zero(dtype: torch.dtype, group_size: int) -> None:
    ties = demo_tie_values()
    assert len(ties) >= 25 and {0.1, 0.2, 0.3, 0.7, 0.8} <= {round(t, 12) for t in ties}
    # one tied group per value, beside a group with spread so that the batch std is not 0
    spread = torch.arange(group_size, dtype=torch.float64) ** 2  # no sample at its group mean
    rewards = torch.cat([torch.full((group_size,), t, dtype=torch.float64) for t in ties] + [spread]).to(dtype)
    tied = slice(0, len(ties) * group_size)
    for scale, scope in [(True, "group"), (True, "batch"), (False, "group")]:
        adv = group_normalized_advantages(rewards, group_size, scale=scale, std_scope=scope)
        assert adv.dtype == dtype
        assert (adv[tied] == 0).all(), (scale, scope, adv[tied][adv[tied] != 0][:4])
        assert (adv[tied.stop :] != 0).all()  # the group with spread still learns
    for t in ties:
        assert (batch_normalized_advantages(torch.full((group_size,), t, dtype=torch.float64).to(dtype)) == 0).all()


def test_tied_float32_group_was_not_zero_in_its_own_dtype() -> None:
    """The rounding that the tie rule guards against: float32 statistics of 8 rewards tied at 0.1."""
    rewards = torch.full((8,), 0.1, dtype=torch.float32)
    residual = rewards - rewards.mean()
    naive = residual / (rewards.std() + 1e-6)
    assert naive.abs().max() > 1e-3  # what every sample would have been told, had it been computed so
    assert (group_normalized_advantages(rewards, 8) == 0).all()


def test_advantages_need_whole_groups() -> None:
    with pytest.raises(ValueError, match="7 rewards do not split into groups of 4"):
        group_normalized_advantages(torch.zeros(7), 4)


# --- the clipped policy loss -----------------------------------------------------------

CLIP = 0.2


def test_clipped_loss_values_and_flags() -> None:
    ratios = torch.tensor([[1.0, 1.1, 1.5, 0.5], [1.0, 0.9, 1.5, 0.5]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.25, -2.0, -1.0]])
    logprobs = (old + ratios.log()).requires_grad_()
    advantages = torch.tensor([1.0, -2.0])

    loss, clipped = clipped_policy_loss(logprobs, old, advantages, CLIP)

    # loss = -min(r * A, clip(r, 0.8, 1.2) * A), token by token:
    #  A = +1: r 1.0 -> -1;  1.1 -> -1.1 (inside);  1.5 -> -1.2 (clipped);  0.5 -> -0.5 (min keeps r A)
    #  A = -2: r 1.0 ->  2;  0.9 ->  1.8 (inside);  1.5 ->  3 (min keeps r A);  0.5 -> 1.6 (clipped)
    expected = torch.tensor([[-1.0, -1.1, -1.2, -0.5], [2.0, 1.8, 3.0, 1.6]])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert clipped.tolist() == [[False, False, True, False], [False, False, False, True]]

    # A clipped token passes no gradient; elsewhere d(-r A)/d logprob = -r A.
    loss.sum().backward()
    expected_grad = torch.tensor([[-1.0, -1.1, 0.0, -0.5], [2.0, 1.8, 3.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-6)


def test_clipped_loss_at_ratio_one_is_minus_the_advantage() -> None:
    logprobs = torch.tensor([[-0.7, -1.3, -2.0], [-0.1, -0.2, -0.3]])
    loss, clipped = clipped_policy_loss(logprobs, logprobs.clone(), torch.tensor([0.5, -3.0]), CLIP)
    torch.testing.assert_close(loss, torch.tensor([[-0.5] * 3, [3.0] * 3]))
    assert not clipped.any()


def test_clipped_loss_with_zero_advantage_is_zero() -> None:
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[0.5, 1.0, 2.0]]))
    loss, clipped = clipped_policy_loss(logprobs, old, torch.zeros(1), CLIP)
    assert torch.equal(loss.abs(), torch.zeros(1, 3))
    assert not clipped.any()


# --- k3 KL -------------------------------------------------------------------------------


def test_k3_is_zero_where_policy_and_reference_agree() -> None:
    logprobs = torch.tensor([[-0.1, -2.5, -7.0]])
    assert torch.equal(kl_k3(logprobs, logprobs.clone()), torch.zeros(1, 3))


def test_k3_hand_computed() -> None:
    # d = ref - policy. policy 0.5, ref 0.25: d = -ln 2, k3 = 0.5 + ln 2 - 1 = 0.193147
    #                   policy 0.25, ref 0.5: d = ln 2,  k3 = 2 - ln 2 - 1   = 0.306853
    logprobs = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(kl_k3(logprobs, ref), torch.tensor([0.5 + math.log(2) - 1, 1 - math.log(2)]))


def test_k3_is_accurate_for_small_differences() -> None:
    # k3 = d**2 / 2 + O(d**3): a policy a little away from its reference has a small, nonzero KL
    d = torch.tensor([1e-4, -1e-4, 1e-3])
    torch.testing.assert_close(kl_k3(torch.zeros(3), d), d**2 / 2, rtol=1e-3, atol=0)


def test_k3_cap_limits_only_the_exploding_tokens() -> None:
    # policy 1e-4 on a token the reference gives 0.3: d = ln 3000, k3 = 3000 - ln 3000 - 1 = 2990.99
    logprobs = torch.log(torch.tensor([1e-4, 0.5]))
    ref = torch.log(torch.tensor([0.3, 0.25]))
    uncapped = kl_k3(logprobs, ref)
    assert float(uncapped[0]) == pytest.approx(3000 - math.log(3000) - 1, rel=1e-4)
    logprobs.requires_grad_(True)
    capped = kl_estimate(logprobs, ref, "k3", max_kl=10.0)
    assert float(capped[0].detach()) == 10.0 and float(capped[1].detach()) == pytest.approx(float(uncapped[1]))
    capped.sum().backward()
    assert float(logprobs.grad[0]) == 0.0 and float(logprobs.grad[1]) != 0.0  # the capped token pushes no gradient


def test_k3_averaged_over_the_policy_is_the_exact_kl() -> None:
    # policy (0.5, 0.5), reference (0.25, 0.75):
    # KL(policy || ref) = 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75) = 0.143841
    policy = torch.tensor([0.5, 0.5])
    ref = torch.tensor([0.25, 0.75])
    expected_kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    per_token = kl_k3(policy.log(), ref.log())
    assert (per_token >= 0).all()
    assert float((policy * per_token).sum()) == pytest.approx(expected_kl, abs=1e-6)
    assert expected_kl == pytest.approx(0.143841, abs=1e-6)


# --- masked mean ---------------------------------------------------------------------------


def test_masked_mean_averages_only_the_masked_tokens() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token mean: (1 + 2 + 4) / 3, not the mean of the row means (1.5 + 4) / 2
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)


def test_masked_mean_ignores_what_is_under_the_mask() -> None:
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    with_padding = torch.tensor([[2.0, 1000.0], [4.0, -1000.0]])
    assert masked_mean(with_padding, mask).item() == pytest.approx(3.0)


def test_masked_mean_of_an_empty_mask_is_zero_not_nan() -> None:
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_rl_learning_rate_schedules() -> None:
    from vocalign.rl.algorithms import scheduled_lr

    # lr 1e-3, 2 warm-up steps, 10 steps
    assert [scheduled_lr(1e-3, 2, "constant", 10, s) for s in (0, 1, 5, 9)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    # step s of 10 runs at lr * (1 - s / 10): 1e-3 at the first step, 1e-4 at the last
    assert [scheduled_lr(1e-3, 0, "linear", 10, s) for s in (0, 5, 9)] == pytest.approx([1e-3, 5e-4, 1e-4])


# --- the GRPO family and PPO: estimators, losses, aggregation, KL controllers --------------


def test_rloo_subtracts_the_mean_of_the_other_samples() -> None:
    from vocalign.rl.algorithms import rloo_advantages

    # groups of 2: [1, 0] -> [1 - 0, 0 - 1]; [0, 1] -> [-1, 1]
    assert rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2).tolist() == [1.0, -1.0, -1.0, 1.0]
    # a group of 3, [3, 0, 0]: 3 - 0 = 3; 0 - (3 + 0) / 2 = -1.5 (twice)
    assert rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), 3).tolist() == [3.0, -1.5, -1.5]
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.tensor([1.0]), 1)


def test_reinforce_pp_normalises_over_the_batch() -> None:
    from vocalign.rl.algorithms import batch_normalized_advantages

    # mean 2, sample std 1
    torch.testing.assert_close(batch_normalized_advantages(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]),
                               rtol=0, atol=1e-5)


def test_gae_hand_computed() -> None:
    from vocalign.rl.algorithms import gae_advantages

    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 9.0]])  # 9.0 sits on padding: never used
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # lam = 1, gamma = 1: advantages are Monte Carlo returns minus values: 1 - 0.5 everywhere
    advantages, returns = gae_advantages(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0]]))
    # lam = 0.5. Row 0: deltas (0, 0, 0.5) -> A = (0.125, 0.25, 0.5).
    # Row 1: t1 delta = 1 + 0 - 0.4 = 0.6; t0 delta = 0 + 0.4 - 0.2 = 0.2, A0 = 0.2 + 0.5 * 0.6 = 0.5
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.125, 0.25, 0.5], [0.5, 0.6, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.625, 0.75, 1.0], [0.7, 1.0, 0.0]]))


def test_asymmetric_clipping() -> None:
    # ratio 1.25 with advantage +1: clipped at 1.2 by clip_eps 0.2, inside 1 + 0.28
    logprobs, old = torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1)
    loss, clipped = clipped_policy_loss(logprobs, old, torch.tensor([1.0]), 0.2)
    assert loss.item() == pytest.approx(-1.2) and clipped.item()
    loss, clipped = clipped_policy_loss(logprobs, old, torch.tensor([1.0]), 0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and not clipped.item()
    # ratio 0.7 with advantage -1: min(-0.7, -0.8) = -0.8, the lower clip still applies
    loss, clipped = clipped_policy_loss(torch.log(torch.tensor([[0.7]])), old, torch.tensor([-1.0]), 0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(0.8) and clipped.item()


def test_gspo_uses_one_ratio_per_sequence() -> None:
    from vocalign.rl.algorithms import gspo_policy_loss

    # token ratios 1.1 and 1.3 (and a padding token): the sequence ratio is sqrt(1.1 * 1.3) = 1.195826
    logprobs = torch.log(torch.tensor([[1.1, 1.3, 5.0], [1.3, 1.3, 1.0]]))
    old, mask = torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, clipped = gspo_policy_loss(logprobs, old, torch.tensor([1.0, 1.0]), mask, 0.2)
    ratio = math.sqrt(1.1 * 1.3)
    # row 1: ratios 1.3, 1.3, 1.0 -> (1.3^2)^(1/3) = 1.191 inside the clip range
    row1 = (1.3 * 1.3) ** (1 / 3)
    torch.testing.assert_close(loss, torch.tensor([[-ratio, -ratio, 0.0], [-row1, -row1, -row1]]))
    assert clipped.tolist() == [False, False]
    loss, clipped = gspo_policy_loss(torch.log(torch.tensor([[1.3, 1.3]])), torch.zeros(1, 2), torch.tensor([1.0]),
                                     torch.ones(1, 2), 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2]]))
    assert clipped.tolist() == [True]


def test_loss_aggregations() -> None:
    from vocalign.rl.algorithms import aggregate_loss

    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(token_loss, mask).item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert aggregate_loss(token_loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)  # (2 + 4) / 2
    # sums 6 and 4, each over the padded length 3: (2 + 4/3) / 2
    assert aggregate_loss(token_loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(5 / 3)
    assert aggregate_loss(token_loss, mask, "seq-mean-token-sum-norm", norm=4).item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="'sum' is not known; use one of token-mean"):
        aggregate_loss(token_loss, mask, "sum")


def test_k1_and_k2_hand_computed() -> None:
    from vocalign.rl.algorithms import kl_k1, kl_k2

    # policy 0.5, reference 0.25: k1 = ln 2, k2 = (ln 2)^2 / 2
    logprobs, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert kl_k1(logprobs, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(logprobs, ref).item() == pytest.approx(math.log(2) ** 2 / 2)
    assert kl_k1(ref, logprobs).item() == pytest.approx(-math.log(2))  # k1 can be negative; k2 cannot
    assert kl_k2(ref, logprobs).item() == pytest.approx(math.log(2) ** 2 / 2)


def test_kl_controllers() -> None:
    from vocalign.rl.algorithms import AdaptiveKLController, FixedKLController

    assert FixedKLController(0.1).update(kl=5.0, n_steps=32) == 0.1
    adaptive = AdaptiveKLController(0.1, target=1.0, horizon=10)
    # KL twice the target: error clipped to +0.2, weight x (1 + 0.2 * 1 / 10)
    assert adaptive.update(kl=2.0, n_steps=1) == pytest.approx(0.102)
    # KL half the target: error -0.5 clipped to -0.2, weight x (1 - 0.2 * 5 / 10)
    assert adaptive.update(kl=0.5, n_steps=5) == pytest.approx(0.102 * 0.9)
    with pytest.raises(ValueError, match="target > 0 and horizon > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --- the registries: every estimator and loss the trainer reaches is looked up by name ---------------


def _step_batch(n: int = 6, width: int = 5, seed: int = 0):
    from vocalign.rl.algorithms import AdvantageInput

    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1][:n])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    return AdvantageInput(
        rewards=torch.rand(n, generator=g), group_size=3, mask=mask, every=mask,
        token_kl=torch.rand(n, width, generator=g) * mask, kl_coef=0.1,
        values=torch.rand(n, width, generator=g) * mask,
    )


def test_compute_advantages_is_each_estimator_on_the_kl_penalised_rewards() -> None:
    from dataclasses import replace

    from vocalign.rl.algorithms import ADVANTAGE_ESTIMATORS, compute_advantages

    batch = _step_batch()
    penalised = batch.rewards - 0.1 * batch.token_kl.sum(-1)
    expected = {
        "group": group_normalized_advantages(penalised, 3),
        "rloo": rloo_advantages(penalised, 3),
        "reinforce++": batch_normalized_advantages(penalised),
    }
    assert set(ADVANTAGE_ESTIMATORS) == {*expected, "gae"}
    for name, want in expected.items():
        got = compute_advantages(name, batch)
        torch.testing.assert_close(got.advantages, want, rtol=0, atol=0)
        assert got.returns is None
    # without a KL penalty the rewards are used as they are
    plain = compute_advantages("group", replace(batch, token_kl=None))
    torch.testing.assert_close(plain.advantages, group_normalized_advantages(batch.rewards, 3), rtol=0, atol=0)
    unscaled = compute_advantages("group", replace(batch, token_kl=None, scale_rewards="none"))
    torch.testing.assert_close(unscaled.advantages, group_normalized_advantages(batch.rewards, 3, scale=False))


def test_gae_puts_the_reward_on_the_last_trained_token_and_whitens() -> None:
    from vocalign.rl.algorithms import compute_advantages

    batch = _step_batch()
    out = compute_advantages("gae", batch)
    token_rewards = torch.zeros_like(batch.mask)
    for i, n in enumerate(batch.mask.sum(-1).long().tolist()):
        token_rewards[i, n - 1] = batch.rewards[i]
    token_rewards -= 0.1 * batch.token_kl
    raw, returns = gae_advantages(token_rewards, batch.values, batch.mask, 1.0, 0.95)
    torch.testing.assert_close(out.returns, returns)
    whitened = out.advantages[batch.mask.bool()]
    assert float(whitened.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(whitened.var(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert torch.corrcoef(torch.stack([whitened, raw[batch.mask.bool()]]))[0, 1] > 0.9999  # an affine map of GAE
    assert (out.advantages[batch.mask == 0] == 0).all()


def test_registries_refuse_unknown_and_repeated_names() -> None:
    from vocalign.rl.algorithms import compute_advantages, policy_loss, register_advantage, register_policy_loss

    with pytest.raises(ValueError, match="advantage estimator 'grpo' is not registered; .*registered advantage estimators: gae, group, reinforce"):
        compute_advantages("grpo", _step_batch())
    with pytest.raises(ValueError, match="'rloo' is already registered"):
        register_advantage("rloo")(lambda batch: batch)
    with pytest.raises(ValueError, match="'gspo' is already registered"):
        register_policy_loss("gspo")(lambda *a: a)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="policy loss 'ppo2' is not registered; .*registered policy losses: clip, gspo"):
        policy_loss("ppo2", x, x, torch.zeros(2), torch.ones(2, 3), 0.2)
    with pytest.raises(ValueError, match="KL estimator 'k4' is not known"):
        kl_estimate(x, x, "k4")


def test_the_clip_loss_is_the_token_level_surrogate_and_ppo_is_its_old_name() -> None:
    from vocalign.rl.algorithms import clipped_policy_loss, gspo_policy_loss, policy_loss

    g = torch.Generator().manual_seed(3)
    logprobs, old = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask, adv = (torch.rand(4, 6, generator=g) > 0.3).float(), torch.randn(4, generator=g)
    clip = policy_loss("clip", logprobs, old, adv, mask, 0.2, 0.28, 3.0)
    old_name = policy_loss("ppo", logprobs, old, adv, mask, 0.2, 0.28, 3.0)
    token_loss, clipped = clipped_policy_loss(logprobs, old, adv, 0.2, 0.28, 3.0)
    torch.testing.assert_close(clip.token_loss, token_loss, rtol=0, atol=0)
    torch.testing.assert_close(old_name.token_loss, token_loss, rtol=0, atol=0)
    assert float(clip.clip_frac) == pytest.approx(float(masked_mean(clipped.float(), mask)))
    assert float(clip.dual_frac) > 0  # ratios of exp(randn) pass 3.0 on some negative-advantage tokens
    gspo = policy_loss("gspo", logprobs, old, adv, mask, 0.2, 0.28, None)
    seq_loss, seq_clipped = gspo_policy_loss(logprobs, old, adv, mask, 0.2, 0.28, None)
    torch.testing.assert_close(gspo.token_loss, seq_loss, rtol=0, atol=0)
    assert float(gspo.clip_frac) == pytest.approx(float(seq_clipped.float().mean()))
    assert gspo.log_ratio.shape == (4, 1) and float(gspo.dual_frac) == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_units_make_a_minibatch_loss_independent_of_its_split(mode: str) -> None:
    from vocalign.rl.algorithms import aggregate_loss, loss_units

    g = torch.Generator().manual_seed(4)
    token_loss = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    mask[:, 0] = 1.0
    whole = aggregate_loss(token_loss, mask, mode, norm=7)
    units = loss_units(mask, mode)
    for split in ([2, 3], [1, 4], [1, 1, 3]):
        parts, start = [], 0
        for size in split:
            rows = slice(start, start + size)
            parts.append(aggregate_loss(token_loss[rows], mask[rows], mode, norm=7, units=units))
            start += size
        assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)
    with pytest.raises(ValueError, match="must not be negative"):
        aggregate_loss(token_loss, mask, mode, units=-1)
