"""`vocalign train omni_speech_cpu` end to end on a tiny random Qwen2.5-Omni in the released
layout: GRPO under LoRA on the talker alone with a waveform reward, checkpoints, a bitwise
resume, and `vocalign export` to a folder that loads with the same log-probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vocalign.data.tasks import make_task
from vocalign.model.loading import load_policy
from vocalign.model.omni_policy import OmniPolicy
from vocalign.model.omni_tiny import write_tiny_omni
from vocalign.model.policy import Sampling
from vocalign.rl.checkpoint import load_checkpoint
from vocalign.rl.config import Recipe, RecipeCheckError, check_recipe
from vocalign.rl.export import export_checkpoint
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py
SHORT = ["rl.steps=4", "run.save_every=2", "run.keep_last=4", "run.progress=false", "data.rl_tasks[0].n=16",
         "data.eval_prompts=2", "model.max_speech_tokens=16", "model.render_steps=2"]  # token2wav's ODE coarser: faster


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_omni(tmp_path_factory.mktemp("qwen2.5-omni"), seed=0)


def _train(released: Path, out: Path, *more: str) -> Path:
    return train(load_recipe("omni_speech_cpu", [*SHORT, f"model.path={released}", f"run.output_dir={out}", *more], Recipe),
                 "omni_speech_cpu")


@pytest.mark.slow
def test_the_omni_recipe_trains_resumes_bitwise_and_exports(released: Path, tmp_path: Path) -> None:
    whole = _train(released, tmp_path / "whole")
    rows = [r for r in read_metrics(whole / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in rows)
    assert all(0.0 <= r["reward/speech_duration"] <= 1.0 for r in rows)
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "checkpoints" / "step-4")
    for p in ("metrics.jsonl", "summary.json"):
        (again / p).unlink()
    _train(released, tmp_path / "again", "run.resume=true")
    resumed = [r for r in read_metrics(again / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["loss"] for r in resumed[-2:]] == [r["loss"] for r in rows[-2:]]
    a, b = (load_checkpoint(d / "checkpoints" / "step-4") for d in (whole, again))
    assert isinstance(a, OmniPolicy) and a.lora
    sa, sb = a.trainable_state(), b.trainable_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(".talker." in k for k in sa)  # rl.train_parts: [talker]
    out = tmp_path / "exported"
    export_checkpoint(whole / "checkpoints" / "step-4", out)
    plain = load_policy(out)
    assert isinstance(plain, OmniPolicy) and not plain.lora
    prompt = make_task("arithmetic", 1, seed=11)
    batch = a.encode_prompts(prompt)
    g = a.generate(batch, 1, Sampling(max_new_tokens=5), seed=2)[0]
    seq_a = a.sequences(batch.ids, [g.response_ids], batch.encoded)
    seq_p = plain.sequences(batch.ids, [g.response_ids], plain.encode_prompts(prompt).encoded)
    assert plain.logprobs(seq_p).detach() == pytest.approx(a.logprobs(seq_a).detach(), abs=1e-5)


def test_omni_settings_are_checked_before_anything_runs(released: Path) -> None:
    def problems(*overrides: str) -> str:
        with pytest.raises(RecipeCheckError) as caught:
            check_recipe(load_recipe("omni_speech_cpu", [f"model.path={released}", *overrides], Recipe))
        return str(caught.value)

    assert "rl.train_parts=['vocoder']: Qwen2.5-Omni's trainable parts are thinker, talker" in problems(
        "rl.train_parts=[vocoder]")
    assert "Qwen2.5-Omni cannot call tools yet" in problems("eval.suites=[tool_use]")
    assert "model.render_steps=1: token2wav's ODE needs at least 2 time points" in problems("model.render_steps=1")
    demo = load_recipe("demo", ["rl.train_parts=[talker]"], Recipe)
    with pytest.raises(RecipeCheckError, match=r"rl.train_parts=\['talker'\] chooses among Qwen2.5-Omni's parts"):
        check_recipe(demo)
    with pytest.raises(RecipeCheckError, match=r"model.render_steps=3 sets Qwen2.5-Omni's token2wav; model.path is not"):
        check_recipe(load_recipe("demo", ["model.render_steps=3"], Recipe))


@pytest.mark.slow
def test_a_ray_rollout_worker_gives_the_in_process_run(released: Path, tmp_path: Path) -> None:
    """The worker holds a replica (adapters of the talker included), takes each update's adapter,
    verified by version and checksum, and generates what the trainer's own process would."""
    few = ["rl.steps=2", "run.save_every=2"]
    alone = _train(released, tmp_path / "alone", *few)
    worker = _train(released, tmp_path / "worker", *few, "rollouts.num_workers=1")
    a = [r for r in read_metrics(alone / "metrics.jsonl") if r.get("stage") == "rl"]
    b = [r for r in read_metrics(worker / "metrics.jsonl") if r.get("stage") == "rl"]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "reward/mean", "response/tokens"):
            assert y[key] == x[key], key
    assert b[-1]["sync/bytes"] > 0
    sa = load_checkpoint(alone / "checkpoints" / "step-2").trainable_state()
    sb = load_checkpoint(worker / "checkpoints" / "step-2").trainable_state()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_real_checkpoint_recipe_parses_and_names_the_missing_folder() -> None:
    recipe = load_recipe("omni_speech_grpo", [], Recipe)
    assert recipe.rl.train_parts == ["thinker", "talker"] and recipe.model.speaker == "Chelsie"
    with pytest.raises(RecipeCheckError) as caught:
        check_recipe(recipe)
    assert "model.path=Qwen2.5-Omni-3B does not exist" in str(caught.value)
    assert "model.speaker" not in str(caught.value)


@pytest.mark.slow
def test_two_trainer_ranks_take_the_one_process_update(released: Path, tmp_path: Path) -> None:
    """Two Ray trainer ranks, each generating its share and training on its half of every
    minibatch, match one process of two micro-batches (tests/test_trainer_group.py's tolerance)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        few = ["rl.steps=2", "run.save_every=2"]
        one = _train(released, tmp_path / "one", *few, "rl.grad_accum=2")
        two = _train(released, tmp_path / "two", *few, "rl.trainers=2")
    finally:
        torch.set_num_threads(threads)
    a = [r for r in read_metrics(one / "metrics.jsonl") if r.get("stage") == "rl"]
    b = [r for r in read_metrics(two / "metrics.jsonl") if r.get("stage") == "rl"]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "reward/mean", "response/tokens"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6), key
        assert y["trainers/allreduce_bytes"] > 0
    sa = load_checkpoint(one / "checkpoints" / "step-2").trainable_state()
    sb = load_checkpoint(two / "checkpoints" / "step-2").trainable_state()
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 2e-7


@pytest.mark.slow
def test_ppo_with_a_two_stream_critic_trains_and_resumes_bitwise(released: Path, tmp_path: Path) -> None:
    """PPO's critic over Qwen2.5-Omni reads the thinker's states at text tokens and the talker's at
    codes (one value head per stream, `OmniPolicy.response_hidden_states`); it trains, and a run
    resumed from its checkpoint ends where the uninterrupted one ends."""
    ppo = ["rl.algorithm=ppo"]
    whole = _train(released, tmp_path / "whole", *ppo)
    rows = [r for r in read_metrics(whole / "metrics.jsonl") if r.get("stage") == "rl"]
    assert all(r["critic/value_loss"] > 0 and r["critic/grad_norm"] > 0 for r in rows)
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "checkpoints" / "step-4")
    for p in ("metrics.jsonl", "summary.json"):
        (again / p).unlink()
    _train(released, again, *ppo, "run.resume=true")
    resumed = [r for r in read_metrics(again / "metrics.jsonl") if r.get("stage") == "rl"]
    for key in ("loss", "critic/value_loss", "grad_norm"):
        assert [r[key] for r in resumed[-2:]] == [r[key] for r in rows[-2:]], key


@pytest.mark.slow
def test_sft_then_grpo_on_the_existing_rewards(released: Path, tmp_path: Path) -> None:
    """The run loop's two stages on Qwen2.5-Omni: SFT on the synthetic tasks' text targets (the
    thinker), then GRPO on both parts, scored by correctness on the text, the embedded recognizer
    on token2wav's waveform (resampled to its rate), and the waveform's duration."""
    rewards = ("rewards=[{name: correctness, weight: 0.3}, {name: speech_consistency, weight: 0.3, "
               "params: {against: reference, reference_key: answer}}, {name: speech_duration, weight: 0.4, "
               "params: {target_s: 0.1, tolerance_s: 0.5}}]")
    run = _train(released, tmp_path / "run", "sft.steps=2", "sft.batch_size=2", "data.sft_tasks=[{name: arithmetic, n: 8}]",
                 "rl.steps=2", "rl.train_parts=[thinker,talker]", rewards)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["sft", "sft", "rl", "rl"]
    assert all(r["grad_norm"] > 0 for r in rows)
    for r in rows[2:]:
        for name in ("correctness", "speech_consistency", "speech_duration"):
            assert 0.0 <= r[f"reward/{name}"] <= 1.0, name
