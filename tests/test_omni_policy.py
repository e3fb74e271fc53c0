"""Qwen2.5-Omni behind the `Policy` interface (model/omni_policy.py): one combined token
stream (text, then codes past the thinker's vocabulary), parts chosen by `rl.train_parts`,
and GRPO through the project's own `RLTrainer` on a reward measured from the waveform."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.model.omni_policy import OmniPolicy, load_omni_policy
from vocalign.model.omni_tiny import write_tiny_omni
from vocalign.model.policy import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_omni(tmp_path_factory.mktemp("qwen2.5-omni"), seed=0)


def _policy(released: Path, parts: list[str], lora: bool = True) -> OmniPolicy:
    policy = load_omni_policy(released, max_codes=24, train_parts=parts)
    if lora:
        policy.enable_lora(r=4, alpha=8)
    policy.freeze_encoder()
    return policy


def test_generation_logprobs_are_the_training_forward_s(released: Path) -> None:
    policy = _policy(released, ["thinker", "talker"])
    prompts = make_task("arithmetic", 2, seed=5)
    batch = policy.encode_prompts(prompts)
    gens = policy.generate(batch, 2, Sampling(temperature=1.0, max_new_tokens=6), seed=3)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    seqs = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                            [batch.encoded[g.prompt_index] for g in gens])
    logprobs, entropy = policy.logprobs_and_entropy(seqs)
    for r, g in enumerate(gens):
        n = len(g.response_ids)
        assert logprobs[r, :n].detach() == pytest.approx(torch.tensor(g.logprobs), abs=1e-5)
        assert (entropy[r, :n] > 0).all() and float(logprobs[r, n:].abs().sum()) == 0.0
        text, codes = policy.tokenizer.split(g.response_ids)
        assert text and codes and all(0 <= c < policy.tokenizer.n_audio for c in codes)
    parsed = policy.tokenizer.parse_response(gens[0].response_ids)
    speech = policy.detokenizer.render(parsed.audio_ids)
    assert speech.sample_rate == 24_000 and len(speech.waveform) == 480 * len(parsed.audio_ids)
    assert np.array_equal(speech.waveform, policy.detokenizer.render(parsed.audio_ids).waveform)  # seeded by the codes


@pytest.mark.parametrize("parts", [["thinker"], ["talker"], ["thinker", "talker"]])
@pytest.mark.parametrize("lora", [True, False])
def test_gradients_reach_exactly_the_parts_named(released: Path, parts: list[str], lora: bool) -> None:
    policy = _policy(released, parts, lora)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        owner = "thinker" if ".thinker." in f".{name}" else "talker"
        assert owner in parts and "audio_tower" not in name and "token2wav" not in name and "visual" not in name
        assert ("lora_" in name) == lora
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    prompt = make_task("arithmetic", 1, seed=6)
    batch = policy.encode_prompts(prompt)
    g = policy.generate(batch, 1, Sampling(max_new_tokens=5), seed=1)[0]
    seqs = policy.sequences(batch.ids, [g.response_ids], batch.encoded)
    weights = torch.tensor([policy.trained_tokens(g.response_ids)])
    assert weights.sum() > 0 and set(weights[0].tolist()) <= {0.0, 1.0}
    logprobs, _ = policy.logprobs_and_entropy(seqs, entropy=False)
    (-(logprobs * weights).sum()).backward()
    optimiser = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    optimiser.step()
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= set(trainable)
    assert {("thinker" if ".thinker." in f".{n}" else "talker") for n in changed} == set(parts)


def test_a_part_the_model_lacks_is_refused(released: Path) -> None:
    with pytest.raises(ValueError, match=r"rl.train_parts=\['vocoder'\]: Qwen2.5-Omni's trainable parts are thinker, talker"):
        load_omni_policy(released, train_parts=["vocoder"])
    with pytest.raises(ValueError, match=r"speaker 'Serena' is not one of this checkpoint's voices"):
        load_omni_policy(released, speaker="Serena")


TARGET_S = 0.1  # the duration the talker-only learning check rewards


def short_speech(rollouts):
    """1 at TARGET_S seconds of speech, falling by 1 per 0.5 s away from it (0 with no speech)."""
    return [max(0.0, 1.0 - abs((0.0 if r.waveform is None else len(r.waveform) / r.sample_rate) - TARGET_S) / 0.5)
            for r in rollouts]


def _held_out_reward(policy: OmniPolicy, prompts, seed: int) -> list[float]:
    from vocalign.rollouts.worker import RolloutWorker

    rollouts = RolloutWorker(policy).generate(prompts, 4, Sampling(temperature=1.0, max_new_tokens=6), seed=seed)
    return short_speech(rollouts)


@pytest.mark.slow
def test_grpo_on_the_talker_alone_learns_a_reward_measured_from_its_waveform(released: Path) -> None:
    """Random weights cannot say words, but the talker can learn when to stop: GRPO under LoRA
    on the talker alone, rewarded by the duration of token2wav's waveform, raises that
    reward on held-out prompts (a paired bootstrap's 95% interval of the gain above 0).
    token2wav integrates its ODE over 2 time points, not the released 10: the waveform's
    duration (two mel frames a code) does not depend on them, and rendering is most of
    this test's time."""
    from vocalign.rewards import RewardSpec
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer import PromptCursor, RLTrainer
    from vocalign.rollouts.worker import RolloutWorker

    policy = _policy(released, ["talker"])
    policy.model.render_steps = 2
    train_prompts, held_out = make_task("arithmetic", 16, seed=1), make_task("arithmetic", 12, seed=99)
    before = _held_out_reward(policy, held_out, seed=7)
    config = RLConfig(prompts_per_step=2, group_size=8, minibatches=1, max_new_tokens=6, lr=5e-3)
    trainer = RLTrainer(policy, RolloutWorker(policy), [RewardSpec(f"{__name__}:short_speech", weight=1.0)], config,
                        LossConfig(), KLConfig(coef=0.0), seed=0)
    cursor = PromptCursor(train_prompts, 0)
    curve = [trainer.step(cursor, i)[0]["reward/mean"] for i in range(24)]
    after = _held_out_reward(policy, held_out, seed=7)
    gains = np.array(after) - np.array(before)
    rng = np.random.default_rng(0)
    boot = [rng.choice(gains, len(gains)).mean() for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    print(f"talker-only GRPO: train reward first 6 steps {statistics.mean(curve[:6]):.3f} -> last 6 "
          f"{statistics.mean(curve[-6:]):.3f}; held-out {np.mean(before):.3f} -> {np.mean(after):.3f} "
          f"(gain 95% CI {low:.3f}..{high:.3f})")
    assert low > 0
    assert statistics.mean(curve[-6:]) > statistics.mean(curve[:6])


def test_bfloat16_weights_keep_token2wav_in_float32(released: Path) -> None:
    """model.dtype=bfloat16: the thinker and talker in bf16, token2wav in float32 (it runs only so);
    sampling and the training forward then agree to bf16's precision, not float32's."""
    policy = load_omni_policy(released, max_codes=16, dtype="bfloat16")
    hf = policy.model.hf
    assert hf.thinker.dtype == hf.talker.dtype == torch.bfloat16 and hf.token2wav.dtype == torch.float32
    prompt = make_task("arithmetic", 1, seed=5)
    batch = policy.encode_prompts(prompt)
    g = policy.generate(batch, 1, Sampling(max_new_tokens=5), seed=1)[0]
    logprobs = policy.logprobs(policy.sequences(batch.ids, [g.response_ids], batch.encoded)).detach()[0]
    assert logprobs[: len(g.logprobs)] == pytest.approx(torch.tensor(g.logprobs), abs=2e-2)
    speech = policy.detokenizer.render(policy.tokenizer.parse_response(g.response_ids).audio_ids)
    assert speech.waveform.dtype == np.float32 and len(speech.waveform) > 0


def test_sft_on_codec_targets_teaches_the_talker(released: Path) -> None:
    """A target whose speech is given as codec codes trains the talker on them (and the thinker
    on the text): the loss on those targets falls; without codes only the thinker learns."""
    from vocalign.data.types import Response
    from vocalign.rl.sft import SFTTrainer, target_ids

    policy = load_omni_policy(released, max_codes=16)
    policy.freeze_encoder()
    prompts = make_task("arithmetic", 4, seed=8)
    for k, p in enumerate(prompts):
        p.target = Response(text="eight", codes=[3 + k, 5, 7, 11, 13, policy.model.codec["eos"]])
    ids = target_ids(policy, prompts[0])
    assert [i - policy.tokenizer.audio_offset for i in ids if policy.tokenizer.is_audio(i)] == prompts[0].target.codes
    talker_before = {n: p.detach().clone() for n, p in policy.model.hf.talker.named_parameters()}
    sft = SFTTrainer(policy, prompts, batch_size=4, lr=3e-3, warmup_steps=0, grad_clip=1.0, seed=0)
    losses = [sft.step(i)["loss"] for i in range(12)]
    assert losses[-1] < losses[0] * 0.7
    assert any(not torch.equal(p.detach(), talker_before[n]) for n, p in policy.model.hf.talker.named_parameters())
    prompts[0].target = Response(text="eight", codes=[policy.tokenizer.n_audio + 1])
    with pytest.raises(ValueError, match=r"response.codes has \[\d+\], outside the model's 64 audio codes"):
        target_ids(policy, prompts[0])
