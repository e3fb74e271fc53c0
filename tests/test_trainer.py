"""The RL trainer's options, each through a real `RLTrainer.step` on the tiny embedded model.

Every test builds a fresh policy (the embedded model, seed 0), runs one or a few steps on
2 arithmetic prompts x 4 samples, and checks what the option must change: the loss the
step reports, the gradients, the weights, the optimiser's step counts or the metrics.

Two facts make exact expectations possible:
- on the first minibatch of a step the trained log-probabilities equal the sampled ones
  (ratio 1, nothing clipped), so each response token's policy loss is minus its advantage
  and the token-mean loss is -sum_i(A_i * n_i) / sum_i(L_i), with n_i the (weighted)
  tokens of response i that carry loss and L_i the tokens the mean is taken over;
- generation is seeded per (seed, prompt, sample), and a fresh LoRA adapter leaves the
  model's outputs unchanged, so fresh policies with the same trainer seed sample the same
  rollouts whatever the options.

An untrained model samples its end-of-turn token about once in a thousand tokens, so
nearly every response would run to max_new_tokens. `make_policy` gives the end-of-turn
logit a fixed bias (about a 10% chance per token) so that responses end at different
lengths, some finished and some cut, as the loss options need.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from vocalign.data.tasks import make_task
from vocalign.data.types import Prompt, Rollout
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy
from vocalign.rewards import RewardSpec
from vocalign.rl import algorithms as alg
from vocalign.rl.config import CriticConfig, KLConfig, LossConfig, RLConfig
from vocalign.rl.critic import ValueModel
from vocalign.rl.trainer import PromptCursor, RLTrainer
from vocalign.rollouts.worker import RolloutWorker

PROMPTS, GROUP, MAX_NEW = 2, 4, 10
N = PROMPTS * GROUP
SEED = 0  # trainer seed: under it the rollouts mix finished and cut responses of several lengths, some with audio
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TIME_KEYS = {"time/rollout_s", "time/reward_s", "time/advantage_s", "time/update_s", "time/sync_s"}


# --- rewards, imported by the trainer as `test_trainer:<function>` -------------------------


def first_token(rollouts: list[Rollout]) -> list[float]:
    """The id of each response's first token: differs between samples of an untrained model."""
    return [float(r.response_ids[0]) for r in rollouts]


def tied_for(rollouts: list[Rollout], prompt_ids: list[str]) -> list[float]:
    """1.0 for every sample of the prompts in `prompt_ids` (a group with nothing to learn), else `first_token`."""
    return [1.0 if r.prompt.id in prompt_ids else float(r.response_ids[0]) for r in rollouts]


def zero(rollouts: list[Rollout]) -> list[float]:
    """0.0 for every sample: without a KL term, every advantage is 0."""
    return [0.0] * len(rollouts)


def one(rollouts: list[Rollout]) -> list[float]:
    """1.0 for every sample: the return a critic has to learn."""
    return [1.0] * len(rollouts)


def reward(function: Callable, **params) -> RewardSpec:
    return RewardSpec(f"{__name__}:{function.__name__}", params=params)


# --- building and running trainers ---------------------------------------------------------


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return make_task("arithmetic", 8, seed=5)


def make_policy(lora: bool = True) -> Policy:
    """The embedded model with an end-of-turn bias (see the module docstring); a LoRA adapter
    seeded the same way every time, or full weights with the audio encoder frozen."""
    policy = embedded_policy(0)
    head = policy.model.lm.lm_head
    vocab = head.weight.shape[0]
    bias = torch.zeros(vocab)
    bias[policy.tokenizer.eot_id] = math.log(vocab / 9)  # e^b / (vocab + e^b) = 0.1
    head.bias = nn.Parameter(bias, requires_grad=False)
    if lora:
        torch.manual_seed(1)
        policy.enable_lora(r=LORA["r"], alpha=LORA["alpha"])
    policy.freeze_encoder()
    return policy


def make_trainer(
    policy: Policy, spec: RewardSpec, rl: dict | None = None, loss: dict | None = None, kl: dict | None = None,
    critic: ValueModel | None = None,
) -> RLTrainer:
    config = RLConfig(**{"prompts_per_step": PROMPTS, "group_size": GROUP, "max_new_tokens": MAX_NEW, **(rl or {})})
    return RLTrainer(policy, RolloutWorker(policy), [spec], config, LossConfig(**(loss or {})), KLConfig(**(kl or {})),
                     seed=SEED, critic=critic)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


def record_gradients(trainer: RLTrainer) -> list[torch.Tensor]:
    """Every gradient the policy's optimiser steps on, flattened into one vector per step."""
    seen: list[torch.Tensor] = []
    step = trainer.backend.step

    def recording_step() -> float:
        seen.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainer.backend.params
        ]))
        return step()

    trainer.backend.step = recording_step
    return seen


def lengths(rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([float(len(r.response_ids)) for r in rollouts])


def audio_counts(policy: Policy, rollouts: list[Rollout]) -> torch.Tensor:
    return torch.tensor([float(sum(policy.tokenizer.is_audio(i) for i in r.response_ids)) for r in rollouts])


def ratio_one_loss(advantages: torch.Tensor, loss_tokens: torch.Tensor, mean_over: torch.Tensor) -> float:
    """The token-mean policy loss at ratio 1: -sum_i(A_i * n_i) / sum_i(L_i)."""
    return float(-(advantages * loss_tokens).sum() / mean_over.sum())


def grpo_advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """The advantages of rl.advantage / rl.scale_rewards `kind`, from rl/algorithms.py."""
    if kind == "rloo":
        return alg.rloo_advantages(rewards, GROUP)
    if kind == "reinforce++":
        return alg.batch_normalized_advantages(rewards)
    scale = kind.removeprefix("group/")
    return alg.group_normalized_advantages(
        rewards, GROUP, scale=scale != "none", std_scope="batch" if scale == "batch" else "group"
    )


# --- 1. gradient accumulation ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def accum_runs(request: pytest.FixtureRequest, prompts: list[Prompt]) -> dict[int, tuple]:
    """For one loss.aggregation: one step on the same rollouts in 1, 2 and 3 micro-batches;
    per grad_accum the metrics, rollouts, the gradient the optimiser stepped on and the update."""
    runs = {}
    for accum in (1, 2, 3):
        policy = make_policy()
        trainer = make_trainer(policy, reward(first_token), rl={"grad_accum": accum}, loss={"aggregation": request.param})
        gradients = record_gradients(trainer)
        before = weights(policy.model)
        metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)
        update = {name: p.detach() - before[name] for name, p in policy.model.named_parameters()}
        runs[accum] = (metrics, rollouts, gradients, update)
    return runs


def test_grad_accum_gives_the_update_of_one_micro_batch(accum_runs: dict[int, tuple]) -> None:
    """The same rollouts trained in 1, 2 or 3 micro-batches give the same gradient and the
    same new weights. The micro-batches hold different numbers of tokens (responses of
    different lengths) and, with 3 of them over 8 responses, of sequences (3, 3, 2), so a
    micro-batch loss that is its own mean, or the minibatch mean divided by grad_accum,
    would weigh them wrongly. The gradient is compared, not only the update: AdamW's first
    update is nearly lr * sign(gradient), blind to the gradient's scale, and it magnifies
    float noise on gradients near its eps (measured: gradients agree to 4e-7, updates to 6e-5)."""
    metrics, rollouts, gradients, update = accum_runs[1]
    assert len(set(lengths(rollouts).tolist())) > 2, "responses of several lengths make the split matter"
    assert len(gradients) == 1 and gradients[0].norm() > 0
    for accum in (2, 3):
        other_metrics, other_rollouts, other_gradients, other_update = accum_runs[accum]
        assert [r.response_ids for r in other_rollouts] == [r.response_ids for r in rollouts]
        assert len(other_gradients) == 1, "grad_accum micro-batches make one optimiser step"
        difference = (other_gradients[0] - gradients[0]).norm() / gradients[0].norm()
        assert difference < 1e-5, f"grad_accum={accum}: gradient differs by {difference:.2e} (relative)"
        assert other_metrics["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
        assert other_update.keys() == update.keys()
        delta = torch.cat([u.flatten() for u in update.values()])
        other_delta = torch.cat([u.flatten() for u in other_update.values()])
        difference = (other_delta - delta).norm() / delta.norm()
        assert difference < 1e-3, f"grad_accum={accum}: weight update differs by {difference:.2e} (relative)"


def test_grad_accum_logs_what_one_micro_batch_logs(accum_runs: dict[int, tuple]) -> None:
    """The logged loss is the minibatch's loss, the one the update minimises, and the token
    means (entropy, -log-prob) are means over the minibatch's tokens, however the minibatch
    is split into micro-batches."""
    metrics = accum_runs[1][0]
    wrong = []
    for accum in (2, 3):
        for key in ("loss", "entropy", "neg_logprob", "approx_kl", "clip_frac"):
            if accum_runs[accum][0][key] != pytest.approx(metrics[key], rel=1e-5, abs=1e-7):
                wrong.append(f"grad_accum={accum} {key}={accum_runs[accum][0][key]:.6g}, not {metrics[key]:.6g}")
    assert not wrong, "; ".join(wrong)


# --- 2. truncated responses --------------------------------------------------------------------


def test_mask_truncated_leaves_cut_responses_out_of_the_loss(prompts: list[Prompt]) -> None:
    """With loss.mask_truncated, a response cut by max_new_tokens has no loss: the token mean
    runs over the finished responses only (their advantages still come from every reward)."""
    policy = make_policy()
    trainer = make_trainer(policy, reward(first_token), loss={"mask_truncated": True})
    metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)

    finished = torch.tensor([float(r.finished) for r in rollouts])
    assert 0 < finished.sum() < N, f"this seed should give finished and cut responses, got {finished.tolist()}"
    advantages = grpo_advantages(torch.tensor(first_token(rollouts)), "group/group")
    L = lengths(rollouts)
    expected = ratio_one_loss(advantages, L * finished, L * finished)
    unmasked = ratio_one_loss(advantages, L, L)
    assert abs(expected - unmasked) > 1e-3
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["response/finished"] == pytest.approx(float(finished.mean()))


def test_mask_truncated_with_every_response_cut_updates_nothing(prompts: list[Prompt]) -> None:
    """When max_new_tokens cuts every response, nothing carries loss: zero gradient, no weight
    moves (AdamW with no weight decay), although the rewards differ."""
    policy = make_policy()
    trainer = make_trainer(policy, reward(first_token), rl={"max_new_tokens": 1}, loss={"mask_truncated": True})
    before = weights(policy.model)
    metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)

    assert not any(r.finished for r in rollouts), [r.response_ids for r in rollouts]
    assert len(set(first_token(rollouts))) > 1  # the advantages are not all zero
    assert metrics["grad_norm"] == 0.0 and metrics["loss"] == 0.0
    assert not changed(before, policy.model)


# --- 3. audio token weight ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def audio_weight_runs(prompts: list[Prompt]) -> dict[float, tuple[dict, list[Rollout], Policy]]:
    runs = {}
    for weight in (0.0, 1.0):
        policy = make_policy()
        trainer = make_trainer(policy, reward(first_token), loss={"audio_token_weight": weight})
        metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)
        runs[weight] = (metrics, rollouts, policy)
    return runs


def test_audio_token_weight_zero_takes_audio_tokens_out_of_the_loss(audio_weight_runs: dict) -> None:
    """loss.audio_token_weight=0: audio tokens add nothing to the loss. Every response token
    still counts in the token mean's denominator (the weight scales each token's loss), so
    the loss is -sum_i(A_i * text_i) / sum_i(L_i)."""
    metrics, rollouts, policy = audio_weight_runs[0.0]
    L, audio = lengths(rollouts), audio_counts(policy, rollouts)
    assert audio.sum() > 0, "this seed should sample audio tokens"
    # the trainer's audio mask and the tokenizer agree on which tokens are audio
    batch = policy.sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                             [[] for _ in rollouts])
    assert policy.audio_token_mask(batch).sum(-1).tolist() == audio.tolist()

    advantages = grpo_advantages(torch.tensor(first_token(rollouts)), "group/group")
    expected = ratio_one_loss(advantages, L - audio, L)
    assert abs(expected - ratio_one_loss(advantages, L, L)) > 1e-3, "audio tokens should sit in responses of different advantages"
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)

    full_metrics, full_rollouts, _ = audio_weight_runs[1.0]
    assert [r.response_ids for r in full_rollouts] == [r.response_ids for r in rollouts]
    assert full_metrics["loss"] == pytest.approx(ratio_one_loss(advantages, L, L), abs=1e-5)


# --- 9. metrics ------------------------------------------------------------------------------


def test_step_metrics_describe_the_step(audio_weight_runs: dict) -> None:
    """The logged response statistics match the rollouts; the training statistics are in range."""
    metrics, rollouts, policy = audio_weight_runs[1.0]
    L, audio = lengths(rollouts), audio_counts(policy, rollouts)
    assert metrics["response/tokens"] == pytest.approx(float(L.mean()))
    assert metrics["response/audio_tokens"] == pytest.approx(float(audio.mean())) and metrics["response/audio_tokens"] > 0
    assert metrics["response/text_tokens"] + metrics["response/audio_tokens"] == pytest.approx(metrics["response/tokens"])
    assert metrics["response/samples"] == N
    vocab = policy.model.lm.get_output_embeddings().weight.shape[0]
    assert 0 < metrics["entropy"] <= math.log(vocab)
    # on policy, sampled and trained log-probs agree (up to float rounding, either side of 0);
    # test_epochs_repeat_the_minibatches sees it grow off policy
    assert abs(metrics["approx_kl"]) < 1e-6
    assert metrics["neg_logprob"] > 0
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-3)
    assert metrics["clip_frac"] == 0.0
    assert TIME_KEYS <= metrics.keys(), f"missing {TIME_KEYS - metrics.keys()}"
    assert all(metrics[k] >= 0 for k in TIME_KEYS)
    assert metrics["time/rollout_s"] > 0 and metrics["time/update_s"] > 0
    assert metrics["throughput/tokens_per_s"] > 0 and metrics["throughput/samples_per_s"] > 0
    assert metrics["batch/reward_mean"] == pytest.approx(sum(first_token(rollouts)) / N)
    assert math.isnan(metrics["kl"]) and metrics["kl_coef"] == 0.0  # no KL term


# --- 4. dynamic sampling -----------------------------------------------------------------------


def test_dynamic_sampling_refills_tied_groups_from_later_prompts(prompts: list[Prompt]) -> None:
    """DAPO's dynamic sampling. In the cursor's order the prompts 0 and 2 get the same reward
    for every sample. Round 1 takes prompts 0 and 1 and keeps 1; round 2 takes prompt 2
    (tied, dropped); round 3 takes prompt 3 and fills the batch. The step trains on the
    groups of prompts 1 and 3, renumbered 0 and 1."""
    cursor = PromptCursor(prompts, 0)
    ordered = [prompts[k] for k in cursor.order]
    tied = [ordered[0].id, ordered[2].id]
    policy = make_policy()
    trainer = make_trainer(policy, reward(tied_for, prompt_ids=tied),
                           rl={"dynamic_sampling": True, "dynamic_sampling_tries": 3})
    metrics, rollouts = trainer.step(cursor, step=0)

    assert metrics["dynamic_sampling/rounds"] == 3
    assert metrics["dynamic_sampling/seen_groups"] == 4
    assert metrics["dynamic_sampling/kept_groups"] == PROMPTS
    assert cursor.position == 4, "each refill round takes new prompts from the cursor"
    assert [r.prompt.id for r in rollouts] == [ordered[1].id] * GROUP + [ordered[3].id] * GROUP
    assert [r.group for r in rollouts] == [0] * GROUP + [1] * GROUP
    assert metrics["response/samples"] == N
    rewards = torch.tensor(tied_for(rollouts, tied)).view(PROMPTS, GROUP)
    assert (rewards.max(1).values > rewards.min(1).values).all(), "every kept group has rewards that differ"
    # the trained batch is the kept groups with their own rewards
    advantages = grpo_advantages(rewards.flatten(), "group/group")
    L = lengths(rollouts)
    assert metrics["loss"] == pytest.approx(ratio_one_loss(advantages, L, L), abs=1e-5)


def test_dynamic_sampling_trains_on_fewer_groups_when_tries_run_out(prompts: list[Prompt]) -> None:
    """With one refill round only, the tied prompt 2 leaves the batch one group short: the
    step trains on the one group it kept rather than sampling on."""
    cursor = PromptCursor(prompts, 0)
    ordered = [prompts[k] for k in cursor.order]
    tied = [ordered[0].id, ordered[2].id]
    policy = make_policy()
    trainer = make_trainer(policy, reward(tied_for, prompt_ids=tied),
                           rl={"dynamic_sampling": True, "dynamic_sampling_tries": 1})
    metrics, rollouts = trainer.step(cursor, step=0)

    counts = [metrics[f"dynamic_sampling/{key}"] for key in ("rounds", "seen_groups", "kept_groups")]
    assert counts == [2, 3, 1]
    assert cursor.position == 3
    assert [r.prompt.id for r in rollouts] == [ordered[1].id] * GROUP and metrics["response/samples"] == GROUP


# --- 5. advantage estimators -------------------------------------------------------------------

ESTIMATORS = {
    "group/group": {"advantage": "group", "scale_rewards": "group"},
    "group/batch": {"advantage": "group", "scale_rewards": "batch"},
    "group/none": {"advantage": "group", "scale_rewards": "none"},
    "rloo": {"advantage": "rloo"},
    "reinforce++": {"advantage": "reinforce++"},
}


@pytest.mark.parametrize("kind", ["group/batch", "group/none", "rloo", "reinforce++"])
def test_advantage_estimator_reaches_the_loss(prompts: list[Prompt], kind: str) -> None:
    """The step's loss is -sum_i(A_i * L_i) / sum_i(L_i) with A from the configured estimator,
    and differs from what every other estimator would give on the same rollouts."""
    policy = make_policy()
    trainer = make_trainer(policy, reward(first_token), rl=ESTIMATORS[kind])
    metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)

    rewards, L = torch.tensor(first_token(rollouts)), lengths(rollouts)
    expected = {k: ratio_one_loss(grpo_advantages(rewards, k), L, L) for k in ESTIMATORS}
    assert metrics["loss"] == pytest.approx(expected[kind], rel=1e-5, abs=1e-5)
    for other, value in expected.items():
        if other != kind:
            assert abs(value - expected[kind]) > 1e-3 * max(1.0, abs(value)), f"{kind} and {other} agree on these rollouts"
    advantages = grpo_advantages(rewards, kind)
    assert metrics["advantage/mean"] == pytest.approx(float((advantages * L).sum() / L.sum()), rel=1e-5, abs=1e-6)


# --- 6. KL to the reference ---------------------------------------------------------------------


def test_reference_copy_only_for_full_weights_with_kl() -> None:
    """A reference costs a model's memory: none without KL; under LoRA the base model with the
    adapters off serves, so nothing is copied either."""
    policy = make_policy(lora=False)
    make_trainer(policy, reward(first_token), kl={"coef": 0.0})
    assert policy._reference is None

    lora_policy = make_policy()
    make_trainer(lora_policy, reward(first_token), kl={"coef": 0.1})
    assert lora_policy._reference is None


def test_full_weight_reference_is_a_frozen_copy(prompts: list[Prompt]) -> None:
    policy = make_policy(lora=False)
    trainer = make_trainer(policy, reward(first_token), kl={"coef": 0.1})
    reference = policy._reference
    assert reference is not None and reference is not policy.model
    assert not any(p.requires_grad for p in reference.parameters())
    start = weights(policy.model)
    assert all(torch.equal(start[name], p) for name, p in reference.named_parameters())

    metrics, _ = trainer.step(PromptCursor(prompts, 0), step=0)
    assert changed(start, policy.model), "the full-weight policy trains"
    assert all(torch.equal(start[name], p) for name, p in reference.named_parameters()), "the reference stays"
    assert policy._reference is reference
    assert abs(metrics["kl"]) < 1e-5  # sampled from the policy that is still the reference


def perturb_adapter(policy: Policy) -> None:
    """Move the LoRA adapter away from zero: the policy then differs from its reference (the
    base model), as it does after some training."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def reference_logprobs(policy: Policy, rollouts: list[Rollout], temperature: float = 1.0) -> torch.Tensor:
    """Each response's log-probabilities under the reference ([N, R], 0 past its end),
    packed as the trainer packs them (one batch of every response)."""
    unique = list({r.prompt.id: r.prompt for r in rollouts}.values())
    encoded = dict(zip([p.id for p in unique], policy.encode_prompts(unique).encoded))
    batch = policy.sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                             [encoded[r.prompt.id] for r in rollouts])
    policy.model.eval()
    with torch.no_grad(), policy.reference() as ref:
        return ref.logprobs(batch, temperature)


def padded(values: list[list[float]]) -> torch.Tensor:
    out = torch.zeros(len(values), max(len(v) for v in values))
    for k, v in enumerate(values):
        out[k, : len(v)] = torch.tensor(v)
    return out


KL_COEF, HORIZON = 0.5, 100


def test_kl_in_loss_mode_adds_to_the_loss_and_adaptive_coef_grows(prompts: list[Prompt]) -> None:
    """kl.mode=loss with every reward 0: the advantages are 0 and the loss is the KL term alone,
    coef * token-mean k3 (at ratio 1 the trained log-probs are the sampled ones the step's
    `kl` metric measures). It has a gradient. The adaptive controller, with the KL above its
    target, raises the coefficient by 1 + 0.2 * N / horizon."""
    policy = make_policy()
    perturb_adapter(policy)
    trainer = make_trainer(policy, reward(zero), kl={"coef": KL_COEF, "mode": "loss", "controller": "adaptive",
                                                     "target": 1e-4, "horizon": HORIZON})
    metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)

    old = padded([r.logprobs for r in rollouts])
    mask = padded([[1.0] * len(r.response_ids) for r in rollouts])
    ref = reference_logprobs(policy, rollouts)
    measured = float((alg.kl_k3(old, ref) * mask).sum() / mask.sum())
    assert measured > 1e-3, "the perturbed adapter should move the policy away from the reference"
    assert metrics["kl"] == pytest.approx(measured, rel=1e-4)
    assert metrics["advantage/mean"] == 0.0
    assert metrics["loss"] == pytest.approx(KL_COEF * measured, rel=1e-4)
    assert metrics["grad_norm"] > 0
    assert metrics["kl_coef"] == KL_COEF
    assert trainer.kl_coef == pytest.approx(KL_COEF * (1 + 0.2 * N / HORIZON))


def test_kl_in_reward_mode_changes_the_advantages_and_adaptive_coef_shrinks(prompts: list[Prompt]) -> None:
    """kl.mode=reward with every reward 0: each response's reward becomes -coef * its summed
    k3, so (unscaled) group advantages are -coef * (KL_i - group mean) and no KL term is added
    to the loss. With the KL below the adaptive target, the coefficient shrinks."""
    policy = make_policy()
    perturb_adapter(policy)
    trainer = make_trainer(policy, reward(zero), rl={"scale_rewards": "none"},
                           kl={"coef": KL_COEF, "mode": "reward", "controller": "adaptive", "target": 100.0,
                               "horizon": HORIZON})
    metrics, rollouts = trainer.step(PromptCursor(prompts, 0), step=0)

    old = padded([r.logprobs for r in rollouts])
    mask = padded([[1.0] * len(r.response_ids) for r in rollouts])
    kl_sums = (alg.kl_k3(old, reference_logprobs(policy, rollouts)) * mask).sum(-1)
    advantages = grpo_advantages(-KL_COEF * kl_sums, "group/none")
    assert advantages.abs().max() > 1e-3
    L = lengths(rollouts)
    expected = ratio_one_loss(advantages, L, L)
    assert abs(expected) > 1e-4, "without the KL every advantage, and the loss, would be 0"
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["batch/reward_mean"] == 0.0  # the logged rewards are the rewards, before the KL
    assert metrics["kl_coef"] == KL_COEF
    assert trainer.kl_coef == pytest.approx(KL_COEF * (1 - 0.2 * N / HORIZON))


# --- 7. PPO with a critic -------------------------------------------------------------------------

PPO_STEPS = 12


@pytest.fixture(scope="module")
def ppo_run(prompts: list[Prompt]) -> dict:
    """PPO (a LoRA critic) for PPO_STEPS steps with every reward 1.0."""
    policy = make_policy(lora=False)
    critic = ValueModel(policy, LORA)
    torch.manual_seed(1)
    policy.enable_lora(r=LORA["r"], alpha=LORA["alpha"])
    trainer = make_trainer(policy, reward(one), rl={"algorithm": "ppo", "critic": CriticConfig(lr=1e-3)}, critic=critic)
    cursor = PromptCursor(prompts, 0)
    policy_before, critic_before = weights(policy.model), weights(critic)
    history = [trainer.step(cursor, step=0)]
    run = {"trainer": trainer, "policy": policy, "critic": critic, "policy_changed": changed(policy_before, policy.model),
           "critic_changed": changed(critic_before, critic), "head": critic.head.weight.detach().clone()}
    history += [trainer.step(cursor, step=s) for s in range(1, PPO_STEPS)]
    run["history"] = history
    return run


def test_ppo_step_trains_policy_and_critic(ppo_run: dict) -> None:
    """One PPO step moves the policy's adapter and the critic's zero-initialised value head,
    and logs the critic's loss. At that step the critic says 0 everywhere, so with gamma 1
    GAE's returns are lam^(steps to the end) and the value loss is 0.5 * their token-mean square."""
    assert ppo_run["policy_changed"] and all("lora_" in name for name in ppo_run["policy_changed"])
    assert {"head.weight", "head.bias"} <= ppo_run["critic_changed"]
    assert ppo_run["head"].abs().sum() > 0
    assert all("lora_" in name or name.startswith("head.") for name in ppo_run["critic_changed"])

    metrics, rollouts = ppo_run["history"][0]
    lam = CriticConfig().lam
    returns = [lam ** (len(r.response_ids) - 1 - t) for r in rollouts for t in range(len(r.response_ids))]
    expected = 0.5 * sum(g * g for g in returns) / len(returns)
    assert metrics["critic/value_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["critic/value_mean"] == 0.0
    assert metrics["critic/grad_norm"] > 0 and metrics["grad_norm"] > 0
    steps = {int(s["step"]) for s in ppo_run["trainer"].critic_backend.optimizer.state.values()}
    assert steps == {PPO_STEPS}


def test_ppo_critic_learns_the_return(ppo_run: dict) -> None:
    """Every reward is 1 and gamma is 1, so the value of every position is 1: the critic's
    loss falls and its values approach 1."""
    losses = [metrics["critic/value_loss"] for metrics, _ in ppo_run["history"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.25 * first, f"value loss did not fall: {[round(v, 4) for v in losses]}"
    assert 0.5 < ppo_run["history"][-1][0]["critic/value_mean"] < 1.5


def test_ppo_needs_a_critic() -> None:
    with pytest.raises(ValueError, match="critic"):
        make_trainer(make_policy(), reward(one), rl={"algorithm": "ppo"})


# --- 8. epochs -------------------------------------------------------------------------------------


def test_epochs_repeat_the_minibatches(prompts: list[Prompt], monkeypatch: pytest.MonkeyPatch) -> None:
    """rl.epochs=2 with 2 minibatches: 4 optimiser steps on one batch. The first minibatch is on
    policy (nothing clipped); with a large learning rate the later ones are off policy enough
    that the clipped ratio acts in the second epoch."""
    policy = make_policy()
    trainer = make_trainer(policy, reward(first_token), rl={"epochs": 2, "minibatches": 2, "lr": 0.05})
    clipped_tokens: list[int] = []  # per minibatch (one micro-batch each), in training order
    clipped_policy_loss = alg.clipped_policy_loss

    def recording_policy_loss(*args, **kwargs):
        loss, clipped = clipped_policy_loss(*args, **kwargs)
        clipped_tokens.append(int(clipped.sum()))  # padding has ratio exp(0 - 0) = 1: never clipped
        return loss, clipped

    monkeypatch.setattr(alg, "clipped_policy_loss", recording_policy_loss)
    metrics, _ = trainer.step(PromptCursor(prompts, 0), step=0)

    assert {int(s["step"]) for s in trainer.backend.optimizer.state.values()} == {4}
    assert len(clipped_tokens) == 4 and clipped_tokens[0] == 0
    assert max(clipped_tokens[2:]) > 0, f"clipped tokens per minibatch: {clipped_tokens}"
    assert metrics["clip_frac"] > 0 and metrics["approx_kl"] > 0


def test_dual_clip_is_logged_apart_from_the_clip_fraction(prompts: list[Prompt]) -> None:
    """With loss.ratio_max, clip_frac counts the capped tokens too; clip_frac/dual says how many
    of them the cap alone changed (clip_frac - clip_frac/dual is TRL's clip_ratio/region_mean)."""
    rl = {"epochs": 2, "minibatches": 2, "lr": 0.05}
    metrics, _ = make_trainer(make_policy(), reward(first_token), rl=rl, loss={"ratio_max": 1.21}).step(
        PromptCursor(prompts, 0), step=0)
    assert 0.0 < metrics["clip_frac/dual"] <= metrics["clip_frac"]
    plain, _ = make_trainer(make_policy(), reward(first_token), rl=rl).step(PromptCursor(prompts, 0), step=0)
    assert "clip_frac/dual" not in plain
