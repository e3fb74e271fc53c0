"""A real, tiny run of the whole training loop (`vocalign.rl.runner.train`), and the GRPO
trainer's masking of prompt and padding tokens.

The run is the demo recipe cut down to 3 SFT and 3 GRPO steps on 32 prompts; it takes a
few seconds on one CPU thread and every test of its outputs shares it. A freshly
initialised model never answers an arithmetic question correctly, so the correctness
reward alone would give every sample the same score, zero advantages and a GRPO that
never moves; the run adds a small reward that differs between samples
(`text_characters`, below) so the adapter really trains.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vocalign.data.tasks import make_task
from vocalign.data.types import Message, Prompt, Rollout
from vocalign.model.loading import embedded_policy, load_policy
from vocalign.rewards import RewardSpec
from vocalign.rl.algorithms import group_normalized_advantages
from vocalign.rl.checkpoint import ADAPTER_NAME, MANIFEST_NAME, STATE_NAME, load_checkpoint
from vocalign.rl.config import KLConfig, LossConfig, Recipe, RLConfig
from vocalign.rl.trainer import PromptCursor, RLTrainer
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics
from vocalign.rollouts.worker import RolloutWorker

SFT_STEPS, GRPO_STEPS = 3, 3
# The demo recipe, cut down; values the tests check are stated here, not taken from the demo.
TINY_RUN = [
    f"sft.steps={SFT_STEPS}", f"rl.steps={GRPO_STEPS}",
    "data.sft_tasks[0].n=32", "data.sft_tasks[1].n=8", "data.sft_tasks[2].n=8", "data.rl_tasks[0].n=32",
    "data.eval_prompts=8", "eval.n=7",
    "sft.batch_size=16", "sft.lr=1e-3", "sft.warmup_steps=50",
    "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=16", "kl.coef=0.02",
    "rl.minibatches=1", "rl.temperature=1.0",
    "rl.lora.r=16", "rl.lora.alpha=32", "rewards=[{name: correctness, weight: 1.0}]",
    "run.save_every=2", "run.keep_last=2", "run.progress=false",
]
# Steps are counted across stages: SFT ends at step 3 (a checkpoint), GRPO saves at its
# 2nd step (global step 5) and its last (step 6); keep_last=2 leaves the last two.
KEPT_CHECKPOINTS = ["step-5", "step-6"]


def text_characters(rollouts: list[Rollout]) -> list[float]:
    """The length of each visible text answer in characters: differs between samples."""
    return [float(len(r.text)) for r in rollouts]


TEXT_REWARD = f"{__name__}:text_characters"  # a `module:function` reward; this module is imported


@pytest.fixture(scope="module")
def isolated_wandb(tmp_path_factory: pytest.TempPathFactory):
    """W&B's own folders in a temporary folder, no credentials, no WANDB_MODE."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for variable, folder in [("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")]:
            mp.setenv(variable, str(home / folder))
        mp.setenv("NETRC", str(home / "netrc"))
        for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
            mp.delenv(variable, raising=False)
        yield home


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Recipe:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = load_recipe("demo", [*TINY_RUN, f"run.output_dir={out}", "logging.mode=offline"], Recipe)
    recipe.rewards.append(RewardSpec(TEXT_REWARD, weight=0.01))
    return recipe


@pytest.fixture(scope="module")
def run_dir(recipe: Recipe, isolated_wandb: Path) -> Path:
    run_dir = train(recipe, "demo")
    assert run_dir == Path(recipe.run.output_dir)
    return run_dir


@pytest.fixture(scope="module")
def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


# --- what the run leaves in its folder -------------------------------------------------


def test_config_yaml_is_the_resolved_recipe(run_dir: Path, recipe: Recipe) -> None:
    reloaded = load_recipe(run_dir / "config.yaml", [], Recipe)
    assert reloaded == recipe
    assert reloaded.rl.group_size == 4  # an override
    assert reloaded.rewards[1].name == TEXT_REWARD  # added in code


def test_metrics_have_one_row_per_step(metrics: list[dict]) -> None:
    evaluations = [row for row in metrics if row["stage"] == "eval"]
    # the recipe's eval suites (style) after each stage, logged at the stage's last step
    assert [row["step"] for row in evaluations] == [SFT_STEPS, SFT_STEPS + GRPO_STEPS]
    assert all("eval/style/honoured" in row for row in evaluations)
    metrics = [row for row in metrics if row["stage"] != "eval"]
    assert [row["step"] for row in metrics] == list(range(1, SFT_STEPS + GRPO_STEPS + 1))
    assert [row["stage"] for row in metrics] == ["sft"] * SFT_STEPS + ["rl"] * GRPO_STEPS
    for row in metrics[:SFT_STEPS]:
        assert row["loss"] > 0 and row["time/step_s"] > 0
    # SFT warms its learning rate up linearly over 50 steps from lr=1e-3
    assert [row["lr"] for row in metrics[:SFT_STEPS]] == pytest.approx([2e-5, 4e-5, 6e-5])


def test_grpo_rows(metrics: list[dict]) -> None:
    grpo = [row for row in metrics if row["stage"] == "rl"]
    required = {"stage", "step", "reward/mean", "reward/correctness", f"reward/{TEXT_REWARD}", "kl", "loss",
                "grad_norm", "clip_frac", "entropy", "approx_kl", "response/tokens", "response/text_tokens",
                "response/audio_tokens", "response/speech_s", "time/rollout_s", "time/reward_s", "time/update_s",
                "time/sync_s", "throughput/tokens_per_s", "time/step_s"}
    for row in grpo:
        assert required <= row.keys(), f"missing {required - row.keys()}"
        # the total is the weighted sum of the components (weights 1.0 and 0.01)
        expected = row["reward/correctness"] + 0.01 * row[f"reward/{TEXT_REWARD}"]
        assert row["reward/mean"] == pytest.approx(expected)
        assert 0 < row["response/tokens"] <= 16  # rl.max_new_tokens
        assert row["response/text_tokens"] + row["response/audio_tokens"] == pytest.approx(row["response/tokens"])
        assert row["entropy"] > 0 and row["approx_kl"] == pytest.approx(0.0, abs=1e-4)
        assert row["time/rollout_s"] > 0 and row["time/reward_s"] > 0 and row["time/update_s"] > 0
        assert row["throughput/tokens_per_s"] > 0
        assert row["clip_frac"] == 0.0  # one update per batch: the ratio to the sampler is 1
        assert row["time/step_s"] > 0
    # the text reward differs between samples, so the policy gets a gradient
    assert all(row["grad_norm"] > 0 for row in grpo)
    # kl.coef=0.02 turns the k3 KL on, measured between the sampler's log-probabilities and
    # the reference's. LoRA's B starts at zero, so the first step's policy is its reference
    # (up to the rounding of the KV-cached sampler); after an update it is not.
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert grpo[-1]["kl"] > 1e-6


def test_checkpoints_keep_the_last_two(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == KEPT_CHECKPOINTS  # step-3 (SFT) pruned
    assert not list(checkpoints.glob(".tmp-*")), "a temporary checkpoint folder was left behind"
    for name in KEPT_CHECKPOINTS:
        files = sorted(p.name for p in (checkpoints / name).iterdir())
        # under LoRA: the adapter only, with the optimiser and the RNG states, and the manifest of them all
        assert files == [ADAPTER_NAME, MANIFEST_NAME, "optimizer.pt", "rng.pt", STATE_NAME]
        manifest = json.loads((checkpoints / name / MANIFEST_NAME).read_text())["files"]
        assert set(manifest) == set(files) - {MANIFEST_NAME}
        assert manifest[ADAPTER_NAME]["bytes"] == (checkpoints / name / ADAPTER_NAME).stat().st_size
    state = json.loads((checkpoints / KEPT_CHECKPOINTS[-1] / STATE_NAME).read_text())
    assert {k: state[k] for k in ("stage", "step", "stage_step", "lora", "lora_config", "cursor", "version", "algorithm")} == {
        "stage": "rl", "step": 6, "stage_step": 3, "lora": True, "lora_config": {"r": 16, "alpha": 32, "dropout": 0.0},
        "cursor": 12, "version": 3, "algorithm": "grpo",
    }
    assert state["wandb_id"] and state["summary"]["sft"]["reward/mean"] >= 0
    base = load_policy(checkpoints / "base")  # a complete saved policy: the model after SFT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(p.numel() for p in base.model.parameters()) == summary["parameters"]


def test_last_checkpoint_loads_the_saved_adapter(run_dir: Path) -> None:
    folder = run_dir / "checkpoints" / KEPT_CHECKPOINTS[-1]
    saved = load_file(str(folder / ADAPTER_NAME))
    policy = load_checkpoint(folder)
    assert policy.lora
    state = policy.trainable_state()
    assert state.keys() == saved.keys()
    for key in saved:
        assert torch.equal(state[key], saved[key]), key
    # LoRA starts with B = 0; GRPO has moved it, and moved it again between the two checkpoints
    assert any(key.endswith("lora_B.weight") and saved[key].abs().sum() > 0 for key in saved)
    earlier = load_file(str(run_dir / "checkpoints" / KEPT_CHECKPOINTS[0] / ADAPTER_NAME))
    assert any(not torch.equal(earlier[key], saved[key]) for key in saved)


def test_checkpoint_without_its_adapter_is_the_base(run_dir: Path) -> None:
    """GRPO under LoRA trains the adapter only: a checkpoint is checkpoints/base plus it."""
    policy = load_checkpoint(run_dir / "checkpoints" / KEPT_CHECKPOINTS[-1])
    policy.model.lm = policy.model.lm.unload()  # peft: remove the LoRA layers without merging them
    weights = policy.model.state_dict()
    base = load_file(str(run_dir / "checkpoints" / "base" / "model.safetensors"))
    assert base.keys() <= weights.keys()
    for name, tensor in base.items():
        assert torch.equal(weights[name], tensor), name


def test_sft_changed_every_trainable_weight(run_dir: Path, recipe: Recipe) -> None:
    """checkpoints/base is saved after SFT; the run started from embedded_policy(seed)."""
    model = embedded_policy(recipe.run.seed, recipe.model.max_audio_seconds).model
    initial = model.state_dict()
    after_sft = load_file(str(run_dir / "checkpoints" / "base" / "model.safetensors"))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    assert [name for name in trainable if torch.equal(initial[name], after_sft[name])] == []
    # the encoder's fixed sinusoidal positions are not trained
    assert torch.equal(initial["encoder.embed_positions.weight"], after_sft["encoder.embed_positions.weight"])


def test_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.keys() == {"parameters", "skipped_rows", "sft", "rl", "time_s", "sft_suites", "rl_suites"}
    assert summary["parameters"] == sum(p.numel() for p in embedded_policy(0).model.parameters())
    assert summary["skipped_rows"] == {}
    assert {"reward/mean", "reward/correctness"} <= summary["sft"].keys()
    # the total and each reward component, at both ends of the stage
    assert summary["rl"].keys() == {
        f"reward/{name} {end}" for name in ("mean", "correctness", TEXT_REWARD) for end in ("first 10%", "last 10%")
    } | {"eval", "style"}
    assert {"reward/mean", "reward/correctness"} <= summary["rl"]["eval"].keys()
    assert summary["time_s"] > 0
    # the style suite after each stage: a share honoured per requested value, with its interval in *_suites
    for stage in ("sft", "rl"):
        table = summary[stage]["style"]
        assert table and set(table) <= {"slow", "fast", "low", "high", "soft", "loud", "none (neutral)"}
        assert all(0.0 <= v <= 1.0 for v in table.values())
        style = summary[f"{stage}_suites"]["style"]
        assert style["n"] == 7 and {"honoured", "neutral"} == set(style["metrics"])


def test_summary_reward_means_come_from_the_first_and_last_steps(run_dir: Path, metrics: list[dict]) -> None:
    grpo = json.loads((run_dir / "summary.json").read_text())["rl"]
    rewards = [row["reward/mean"] for row in metrics if row["stage"] == "rl"]
    # 10% of 3 steps rounds to none; each end is then its single step
    assert grpo["reward/mean first 10%"] == pytest.approx(rewards[0])
    assert grpo["reward/mean last 10%"] == pytest.approx(rewards[-1])
    lengths = [row[f"reward/{TEXT_REWARD}"] for row in metrics if row["stage"] == "rl"]
    assert grpo[f"reward/{TEXT_REWARD} first 10%"] == pytest.approx(lengths[0])
    assert grpo[f"reward/{TEXT_REWARD} last 10%"] == pytest.approx(lengths[-1])


def test_reward_curve_is_a_png(run_dir: Path) -> None:
    data = (run_dir / "reward_curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 200  # two panels (sft, grpo) at 5 x 3.6 inches, 100 dpi


def test_wandb_offline_run_is_in_the_run_folder(run_dir: Path, isolated_wandb: Path) -> None:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0


def test_no_wandb_folder_when_wandb_is_off(tmp_path: Path, isolated_wandb: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "no-wandb"
    recipe = load_recipe(
        "demo", [*TINY_RUN, "sft.steps=0", "rl.steps=1", "logging.wandb=false", f"run.output_dir={out}"], Recipe
    )
    run_dir = train(recipe, "demo")
    assert "W&B: off (logging.wandb=false)" in capsys.readouterr().out
    assert not (run_dir / "wandb").exists()
    assert [row["stage"] for row in read_metrics(run_dir / "metrics.jsonl")] == ["rl", "eval"]  # the eval suites log after the stage
    assert (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file()


# --- what the loss is taken over -----------------------------------------------------------


def test_sequences_pad_prompts_left_and_responses_right() -> None:
    """Padding around a row changes none of its response log-probabilities, and the response
    mask marks exactly its real response tokens."""
    policy = embedded_policy(0)
    tok = policy.tokenizer
    prompts = [make_task("arithmetic", 1, seed=3)[0], Prompt("text", [Message("human", "what is two plus two")])]
    batch = policy.encode_prompts(prompts)
    assert len(batch.ids[0]) > len(batch.ids[1])  # speech takes more tokens than the short text
    text = tok.hf.encode("the answer is seven", add_special_tokens=False)
    responses = [text[:2], text + [tok.eot_id]]
    seq = policy.sequences(batch.ids, responses, batch.encoded)
    P, R, pad = seq.prompt_len, len(responses[1]), len(batch.ids[0]) - len(batch.ids[1])
    assert P == len(batch.ids[0]) and seq.input_ids.shape == (2, P + R)
    assert seq.input_ids[1, :pad].tolist() == [tok.pad_id] * pad and seq.attention_mask[1, :pad].sum() == 0
    assert seq.input_ids[0, P + 2 :].tolist() == [tok.pad_id] * (R - 2) and seq.attention_mask[0, P + 2 :].sum() == 0
    assert seq.response_mask.tolist() == [[1.0] * 2 + [0.0] * (R - 2), [1.0] * R]
    with torch.no_grad():
        together = policy.logprobs(seq)
        for i in range(2):
            alone = policy.logprobs(policy.sequences([batch.ids[i]], [responses[i]], [batch.encoded[i]]))
            n = len(responses[i])
            torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=0, atol=1e-5)
    assert torch.equal(together[0, 2:], torch.zeros(R - 2))  # padding contributes nothing


def test_grpo_loss_is_a_mean_over_response_tokens() -> None:
    """One GRPO step on a fresh LoRA adapter: sampled and trained log-probabilities agree
    (ratio 1), so each token's loss is minus its sequence's advantage A_i and the token
    mean is -sum_i(A_i * L_i) / sum_i(L_i) over response lengths L_i. Counting prompt or
    padding tokens would change the denominator; the step changes only adapter weights."""
    policy = embedded_policy(0)
    policy.enable_lora(r=4, alpha=8)
    policy.freeze_encoder()
    config = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=16)
    # An untrained model rarely samples the end of turn; under this seed one response ends early.
    trainer = RLTrainer(policy, RolloutWorker(policy), [RewardSpec(TEXT_REWARD)], config, LossConfig(), KLConfig(), seed=24)
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}

    metrics, rollouts = trainer.step(PromptCursor(make_task("arithmetic", 4, seed=5), 0), step=0)

    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
    assert len(set(lengths.tolist())) > 1, f"this seed should give responses of different lengths, got {lengths.tolist()}"
    assert metrics["response/tokens"] == pytest.approx(lengths.mean().item())
    advantages = group_normalized_advantages(torch.tensor(text_characters(rollouts)), config.group_size)
    assert advantages.abs().sum() > 0
    expected_loss = -(advantages * lengths).sum() / lengths.sum()
    over_padding_too = -(advantages * lengths).sum() / (len(lengths) * lengths.max())
    assert abs(expected_loss - over_padding_too) > 1e-4
    assert metrics["loss"] == pytest.approx(expected_loss.item(), abs=1e-5)
    assert metrics["clip_frac"] == 0.0

    changed = {name for name, p in policy.model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all("lora_" in name for name in changed), sorted(changed)[:5]


def test_grpo_minibatches_take_one_optimiser_step_each() -> None:
    """rl.minibatches=2 splits the rollout batch in two and steps the optimiser twice;
    the second part is then scored off-policy, and the clipped ratio bounds it."""
    policy = embedded_policy(0)
    policy.enable_lora(r=4, alpha=8)
    policy.freeze_encoder()
    config = RLConfig(prompts_per_step=4, group_size=4, max_new_tokens=16, minibatches=2)
    trainer = RLTrainer(policy, RolloutWorker(policy), [RewardSpec(TEXT_REWARD)], config, LossConfig(), KLConfig(), seed=24)
    metrics, rollouts = trainer.step(PromptCursor(make_task("arithmetic", 4, seed=5), 0), step=0)
    steps = {int(state["step"]) for state in trainer.backend.optimizer.state.values()}
    assert steps == {2}
    assert len(rollouts) == 16 and metrics["response/tokens"] == pytest.approx(
        sum(len(r.response_ids) for r in rollouts) / 16
    )
