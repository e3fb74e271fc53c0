"""Our GRPO-family math (`vocalign.rl.algorithms`) against TRL's own trainer code.

Each test feeds the same tensors to a method of TRL's `GRPOTrainer` and to our functions
and asserts the losses, their gradients w.r.t. the log-probabilities (what trains) and
the advantages agree. TRL's methods run for real: the trainer is made with
`object.__new__` (no model loading, no datasets), given the attributes its `__init__`
would copy from a real `GRPOConfig`, and only the infrastructure around the math is
replaced: the model forward that yields per-token log-probabilities and the generation
step return fixed tensors. Its accelerator is a real single-process CPU `Accelerator`.

The mapping these tests pin down (TRL loss_type -> our options) is written up in the
docs/algorithms.md, section "Parity with TRL".
"""

from __future__ import annotations

import warnings
from collections import defaultdict, deque
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, TrainerState
from trl import GRPOConfig, GRPOTrainer

from vocalign.rl import algorithms as alg

ATOL = 1e-6
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's clip-higher, so the two bounds are told apart
MAX_COMPLETION_LENGTH = 8  # > the padded length 6 below, so Dr.GRPO's constant is not T
GROUP = 2  # completions per prompt
LENGTHS = (6, 3, 1, 5)  # response lengths of the 4 completions: 2 prompts x 2

# TRL loss_type -> our loss.aggregation (the policy loss and clip bounds map one to one).
AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    """A real (tiny, random) model: TRL reads its `.training` and gradient-checkpointing state, never its outputs."""
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(config).train()


def trl_trainer(model: torch.nn.Module, **overrides) -> GRPOTrainer:
    """A `GRPOTrainer` whose loss and advantage methods can run, without its `__init__`.

    The attributes are those `GRPOTrainer.__init__` copies from its `GRPOConfig`, under the
    same names; anything `_compute_loss` or `_generate_and_score_completions` reads that is
    missing here fails loudly with AttributeError rather than silently taking a default.
    """
    settings = dict(output_dir="unused", report_to="none", use_cpu=True, num_generations=GROUP,
                    per_device_train_batch_size=len(LENGTHS), max_completion_length=MAX_COMPLETION_LENGTH,
                    epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH)
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices about unused arguments
        args = GRPOConfig(**settings)
    t = object.__new__(GRPOTrainer)
    t.args, t.model, t.state = args, model, TrainerState()
    t.accelerator = Accelerator(cpu=True)
    t.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    # the loss
    t.loss_type, t.beta, t.importance_sampling_level = args.loss_type, args.beta, args.importance_sampling_level
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.max_completion_length, t.top_entropy_quantile = args.max_completion_length, args.top_entropy_quantile
    t.off_policy_mask_threshold, t.aux_loss_enabled = args.off_policy_mask_threshold, False
    t.use_vllm, t.vllm_importance_sampling_correction = args.use_vllm, args.vllm_importance_sampling_correction
    t.entropy_coef, t.use_adaptive_entropy = args.entropy_coef, args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    # the advantages
    t.num_generations, t.num_iterations = args.num_generations, args.num_iterations
    t.scale_rewards, t.multi_objective_aggregation = args.scale_rewards, args.multi_objective_aggregation
    t.mask_truncated_completions, t.pad_to_multiple_of = args.mask_truncated_completions, args.pad_to_multiple_of
    t.environment_factories, t.environments, t.tools, t.ref_model = None, None, None, None
    t.log_multimodal = args.log_multimodal
    n = args.generation_batch_size
    t._logs = {"images": deque(maxlen=n), "prompt": deque(maxlen=n), "completion": deque(maxlen=n),
               "rewards": defaultdict(lambda: deque(maxlen=n)), "advantages": deque(maxlen=n),
               "extra": defaultdict(lambda: deque(maxlen=n))}
    t._pending_extra_logs, t._pending_metrics = defaultdict(list), defaultdict(list)
    return t


# --- the losses ---------------------------------------------------------------------------------


def rollout_batch(dtype: torch.dtype, seed: int = 0, lengths: tuple[int, ...] = LENGTHS) -> dict[str, torch.Tensor]:
    """Log-probabilities of a batch of responses, far enough from the old ones that the clip bites on both sides.

    Padding positions hold junk (not zeros) so that a loss that forgot the mask would show.
    """
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()  # long, as TRL pads it
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    # token noise clips tokens; a per-sequence shift (up for a positive advantage, down for
    # a negative one) clips whole sequences as well, for GSPO's sequence-level ratio
    shift = torch.tensor([0.6, -0.6] + [0.0] * (B - 2), dtype=torch.float64)[:, None]
    logprobs = old + shift + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.35
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    advantages[0], advantages[1] = abs(advantages[0]) + 0.1, -abs(advantages[1]) - 0.1  # both signs present
    junk = torch.rand(B, T, generator=g, dtype=torch.float64) - 3
    pad = mask == 0
    return {
        "logprobs": logprobs.where(~pad, junk).to(dtype),
        "old": old.where(~pad, junk + 0.5).to(dtype),
        "ref": ref.where(~pad, junk - 0.5).to(dtype),
        "advantages": advantages.to(dtype),
        "mask": mask,
    }


def trl_loss(trainer: GRPOTrainer, batch: dict[str, torch.Tensor], num_items_in_batch: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's `_compute_loss` on `batch`, and its gradient w.r.t. the log-probabilities."""
    logprobs = batch["logprobs"].detach().clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None)
    B, T = logprobs.shape
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": batch["mask"],
        "advantages": batch["advantages"], "old_per_token_logps": batch["old"],
        "num_items_in_batch": torch.tensor(num_items_in_batch if num_items_in_batch is not None else int(batch["mask"].sum())),
    }
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = batch["ref"]
    loss = trainer._compute_loss(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad


def our_loss(
    batch: dict[str, torch.Tensor], *, policy: str, aggregation: str, kl_coef: float = 0.0, bias_corrected_kl: bool = False,
    ratio_max: float | None = None, units: float | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our loss as the trainer composes it (policy loss + kl_coef * k3 per token, then one aggregation),
    its gradient w.r.t. the log-probabilities, and the clipped flags."""
    logprobs = batch["logprobs"].detach().clone().requires_grad_(True)
    old, mask, advantages = batch["old"], batch["mask"], batch["advantages"]
    if policy == "gspo":
        token_loss, clipped = alg.gspo_policy_loss(logprobs, old, advantages, mask, CLIP_LOW, CLIP_HIGH, ratio_max)
        log_ratio = alg.sequence_log_ratio(logprobs, old, mask).unsqueeze(-1)
    else:
        token_loss, clipped = alg.clipped_policy_loss(logprobs, old, advantages, CLIP_LOW, CLIP_HIGH, ratio_max)
        log_ratio = logprobs - old
    if kl_coef:
        token_kl = alg.kl_k3(logprobs, batch["ref"])
        if bias_corrected_kl:
            token_kl = alg.importance_weighted_kl(token_kl, log_ratio)
        token_loss = token_loss + kl_coef * token_kl
    loss = alg.aggregate_loss(token_loss, mask, aggregation, norm=MAX_COMPLETION_LENGTH, units=units) * scale
    (grad,) = torch.autograd.grad(loss, logprobs)
    return loss.detach(), grad, clipped


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", sorted(AGGREGATION))
def test_loss_and_gradient_match_trl(tiny_model, loss_type: str, level: str, beta: float, dtype: torch.dtype) -> None:
    """grpo / bnpo / dapo / dr_grpo, token ratios (PPO) or the sequence ratio (GSPO), with and without a k3 KL."""
    batch = rollout_batch(dtype)
    trainer = trl_trainer(tiny_model, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                          use_bias_correction_kl=False)
    theirs, their_grad = trl_loss(trainer, batch)
    policy = "gspo" if level == "sequence" else "ppo"
    ours, our_grad, clipped = our_loss(batch, policy=policy, aggregation=AGGREGATION[loss_type], kl_coef=beta)

    assert ours.dtype == theirs.dtype == dtype
    assert_same(ours, theirs)
    assert_same(our_grad, their_grad)
    assert our_grad.abs().max() > 1000 * ATOL  # a gradient that trains, not two zeros agreeing
    # The batch exercises both clip bounds (TRL's own metrics), and we flag the same tokens / sequences.
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"][-1] > 0 and metrics["clip_ratio/high_mean"][-1] > 0
    our_clip_frac = clipped.double().mean() if level == "sequence" else alg.masked_mean(clipped.double(), batch["mask"])
    assert float(our_clip_frac) == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=ATOL)
    if beta:
        their_kl = metrics["kl"][-1]  # TRL logs the k3 token mean over the batch
        assert float(alg.masked_mean(alg.kl_k3(batch["logprobs"], batch["ref"]), batch["mask"])) == pytest.approx(their_kl, abs=ATOL)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_bias_corrected_kl_matches_trl_default(tiny_model, loss_type: str, level: str) -> None:
    """TRL's default `use_bias_correction_kl=True` weights k3 by the ratio: our `importance_weighted_kl`.

    Its value changes little here, its gradient more: the ratio's own gradient adds kl * grad(logprob).
    """
    batch = rollout_batch(torch.float64, seed=1)
    trainer = trl_trainer(tiny_model, loss_type=loss_type, importance_sampling_level=level, beta=0.5)
    assert trainer.args.use_bias_correction_kl  # TRL's default: the correction is on unless turned off
    theirs, their_grad = trl_loss(trainer, batch)
    policy = "gspo" if level == "sequence" else "ppo"
    ours, our_grad, _ = our_loss(batch, policy=policy, aggregation=AGGREGATION[loss_type], kl_coef=0.5, bias_corrected_kl=True)
    assert_same(ours, theirs)
    assert_same(our_grad, their_grad)
    # and without the weighting, the gradients differ: the test can tell the two apart
    _, plain_grad, _ = our_loss(batch, policy=policy, aggregation=AGGREGATION[loss_type], kl_coef=0.5)
    assert (plain_grad - their_grad).abs().max() > 1e-3


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_two_sided_clip_matches_trl_delta(tiny_model, level: str) -> None:
    """TRL's `delta` (INTELLECT-2's two-sided clip) is our `ratio_max`: it caps ratio * A for A < 0."""
    batch = rollout_batch(torch.float64, seed=2)
    batch["logprobs"] = batch["logprobs"] + 0.4 * batch["mask"]  # push ratios up so some pass delta
    delta = 1.35
    trainer = trl_trainer(tiny_model, loss_type="grpo", importance_sampling_level=level, delta=delta)
    theirs, their_grad = trl_loss(trainer, batch)
    policy = "gspo" if level == "sequence" else "ppo"
    ours, our_grad, _ = our_loss(batch, policy=policy, aggregation="seq-mean-token-mean", ratio_max=delta)
    assert_same(ours, theirs)
    assert_same(our_grad, their_grad)
    uncapped, _, _ = our_loss(batch, policy=policy, aggregation="seq-mean-token-mean")
    assert abs(float(uncapped - theirs)) > 1e-3  # delta did cap something in this batch
    # clip_frac counts the capped tokens as clipped, TRL's clip_ratio/region_mean does not:
    # theirs is ours minus clip_frac/dual (the trainer logs both)
    _, _, clipped = our_loss(batch, policy=policy, aggregation="seq-mean-token-mean", ratio_max=delta)
    mask, adv = batch["mask"], batch["advantages"]
    if level == "sequence":
        ratio = alg.sequence_log_ratio(batch["logprobs"], batch["old"], mask).exp()
        clip_frac, dual = clipped.double().mean(), alg.dual_clipped(ratio, adv, delta).double().mean()
    else:
        ratio = (batch["logprobs"] - batch["old"]).exp()
        clip_frac = alg.masked_mean(clipped.double(), mask)
        dual = alg.masked_mean(alg.dual_clipped(ratio, adv[:, None], delta).double(), mask)
    region = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert float(dual) > 0 and float(clip_frac) > region
    assert float(clip_frac - dual) == pytest.approx(region, abs=ATOL)


def test_gradient_accumulation_matches_trl(tiny_model) -> None:
    """One optimiser step over 2 micro-batches of different token counts (TRL's gradient_accumulation_steps=2).

    dapo divides every micro-batch's token sum by the step's token count (`num_items_in_batch`):
    our token-mean with `units`, and the same as one token-mean over the whole step.
    bnpo takes each micro-batch's own token mean and halves it: our token-mean without
    `units`. grpo halves each micro-batch's sequence mean.
    """
    first, second = rollout_batch(torch.float64, seed=3, lengths=(6, 6, 5, 6)), rollout_batch(torch.float64, seed=4)
    step_tokens = int(first["mask"].sum() + second["mask"].sum())
    whole = {k: torch.cat([first[k], second[k]]) for k in first}

    def accumulated(loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = trl_trainer(tiny_model, loss_type=loss_type, gradient_accumulation_steps=2)
        assert trainer.args.steps_per_generation == 2  # one generation batch per optimiser step
        parts = [trl_loss(trainer, part, num_items_in_batch=step_tokens) for part in (first, second)]
        return parts[0][0] + parts[1][0], torch.cat([parts[0][1], parts[1][1]])

    theirs, their_grad = accumulated("dapo")
    parts = [our_loss(p, policy="ppo", aggregation="token-mean", units=step_tokens) for p in (first, second)]
    assert_same(parts[0][0] + parts[1][0], theirs)
    assert_same(torch.cat([parts[0][1], parts[1][1]]), their_grad)
    ours_whole, our_whole_grad, _ = our_loss(whole, policy="ppo", aggregation="token-mean")
    assert_same(ours_whole, theirs)
    assert_same(our_whole_grad, their_grad)

    theirs_bnpo, _ = accumulated("bnpo")
    parts = [our_loss(p, policy="ppo", aggregation="token-mean", scale=0.5) for p in (first, second)]
    assert_same(parts[0][0] + parts[1][0], theirs_bnpo)
    assert abs(float(theirs_bnpo - theirs)) > 1e-3  # per-micro-batch normalisation is not dapo's

    theirs_grpo, their_grpo_grad = accumulated("grpo")
    ours_grpo, our_grpo_grad, _ = our_loss(whole, policy="ppo", aggregation="seq-mean-token-mean")
    assert_same(ours_grpo, theirs_grpo)  # equal-sized micro-batches: the mean of halves is the whole's mean
    assert_same(our_grpo_grad, their_grpo_grad)


def test_units_divide_the_whole_minibatch_in_every_aggregation() -> None:
    token_loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    assert float(alg.aggregate_loss(token_loss, mask, units=12)) == pytest.approx(0.5)  # 6 tokens of 12
    assert float(alg.aggregate_loss(token_loss, mask, "seq-mean-token-mean", units=4)) == pytest.approx(0.5)  # 2 sequences of 4
    with pytest.raises(ValueError, match="must not be negative"):
        alg.aggregate_loss(token_loss, mask, units=-1)


# --- the advantages ---------------------------------------------------------------------------------

# 3 prompts x 2 completions x 2 reward functions; the second prompt's rewards tie (zero std).
REWARDS = {
    "correct": [1.0, 0.0, 0.5, 0.5, 0.25, 2.0],
    "short": [0.3, -0.7, 0.2, 0.2, 1.5, -0.1],
}
WEIGHTS = [1.0, 0.5]


# TRL's generation path reads `model.is_gradient_checkpointing`, which transformers 5 deprecates
ignore_checkpointing_notice = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def trl_advantages(trainer: GRPOTrainer) -> torch.Tensor:
    """TRL's `_generate_and_score_completions` on fixed completions, scored by two real reward functions."""
    n = len(REWARDS["correct"])

    def make_reward(name: str):
        def reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
            assert len(completions) == n
            return REWARDS[name]
        reward.__name__ = name
        return reward

    trainer.reward_funcs = [make_reward(name) for name in REWARDS]
    trainer.reward_func_names = list(REWARDS)
    trainer.reward_processing_classes = [None] * len(REWARDS)
    trainer.reward_weights = torch.tensor(WEIGHTS, dtype=torch.float32)
    trainer._tokenizer = SimpleNamespace(pad_token_id=0)
    trainer.eos_token_ids = [1]
    completion_ids = [[5, 6, 1], [7, 1], [5, 5, 5, 1], [6, 1], [7, 7, 1], [5, 1]]
    # generation is infrastructure: fixed token ids stand in for sampling
    trainer._generate = lambda prompts: ([[3, 4]] * n, completion_ids, None, ["text"] * n, None, {}, None, [])
    inputs = [{"prompt": f"prompt {i // GROUP}"} for i in range(n)]
    return trainer._generate_and_score_completions(inputs)["advantages"]


def weighted_rewards() -> torch.Tensor:
    """Our total reward: the weighted sum of the reward functions, as float32 like TRL's."""
    per_func = torch.tensor([REWARDS[name] for name in REWARDS], dtype=torch.float32)
    return (per_func * torch.tensor(WEIGHTS)[:, None]).sum(0)


@ignore_checkpointing_notice
@pytest.mark.parametrize("scale_rewards", ["group", "none", "batch"])
def test_advantages_match_trl(tiny_model, scale_rewards: str) -> None:
    theirs = trl_advantages(trl_trainer(tiny_model, scale_rewards=scale_rewards))
    ours = alg.group_normalized_advantages(
        weighted_rewards(), GROUP, scale=scale_rewards != "none", eps=1e-4,
        std_scope="batch" if scale_rewards == "batch" else "group",
    )
    assert theirs.dtype == ours.dtype == torch.float32
    assert_same(ours, theirs)
    assert ours[2] == ours[3] == 0  # the tied group teaches nothing
    assert ours.abs().max() > 0.1


@ignore_checkpointing_notice
def test_normalize_then_sum_matches_trl(tiny_model) -> None:
    """TRL's multi_objective_aggregation="normalize_then_sum" (GDPO): each reward normalised within its
    groups, the weighted sum then normalised over the batch: our group, then batch normalisation."""
    theirs = trl_advantages(trl_trainer(tiny_model, multi_objective_aggregation="normalize_then_sum"))
    per_func = [torch.tensor(REWARDS[name], dtype=torch.float32) for name in REWARDS]
    summed = sum(w * alg.group_normalized_advantages(r, GROUP, eps=1e-4) for w, r in zip(WEIGHTS, per_func))
    ours = alg.batch_normalized_advantages(summed, eps=1e-4)
    assert_same(ours, theirs)


def test_batch_std_scope_differs_from_group_std() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.0, 10.0])
    group = alg.group_normalized_advantages(rewards, 2)
    batch = alg.group_normalized_advantages(rewards, 2, std_scope="batch")
    # group std: each pair becomes +-0.707; batch std (4.86) keeps the first pair's small spread small
    assert torch.allclose(group, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / 2**0.5, atol=1e-4)
    assert abs(float(batch[1])) < 0.11 and float(batch[3]) > 1.0
    with pytest.raises(ValueError, match="std_scope='global' is not known"):
        alg.group_normalized_advantages(rewards, 2, std_scope="global")
