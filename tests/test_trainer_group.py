"""Data-parallel RL training (`rl.trainers`): two ranks on a local Ray train as one process does.

The ranks split every minibatch, divide their losses by the whole minibatch's token count
and sum their gradients (gloo) before each optimiser step, so two ranks take the update
one process takes on the whole minibatch. Bitwise: with the minibatch cut the same way
(two ranks of one micro-batch each, one process of two micro-batches: `rl.grad_accum=2`)
and one torch thread everywhere, the weights are equal to the last bit. Cut differently,
float sums are added in another order and Adam, which divides every gradient by its own
running size, turns that rounding into weight differences of about 1e-6 (LoRA) to 1e-5
(full weights) after three steps at learning rate 1e-3, as one process shows between
`rl.grad_accum=1` and `2`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vocalign.common.ray_cluster import ensure_ray
from vocalign.model.loading import embedded_policy
from vocalign.rewards import RewardSpec
from vocalign.rl.checkpoint import load_checkpoint
from vocalign.rl.config import Recipe, RecipeCheckError, check_recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

RUN = [
    "sft.steps=0", "rl.steps=3", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=2",
    "rl.group_size=4", "rl.minibatches=2", "rl.max_new_tokens=12", "kl.coef=0.05", "rewards=[{name: correctness, weight: 1.0}]",
    "logging.wandb=false", "logging.audio_every=0", "run.progress=false", "run.save_every=3",
]
SAME = ("loss", "grad_norm", "reward/mean", "kl", "entropy", "clip_frac", "approx_kl", "advantage/mean", "response/tokens")
TOLERANCE = 1e-6  # metrics: logged statistics summed over the ranks in another order than over micro-batches


def token_parity(rollouts):
    """A reward that differs within every group from the first step (sampled tokens differ), so every step trains."""
    return [sum(r.response_ids) % 7 / 7 for r in rollouts]


def _run(tmp_path: Path, trainers: int, *more: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    out = tmp_path / f"trainers{trainers}"
    recipe = load_recipe("demo", [*RUN, f"rl.trainers={trainers}", f"run.output_dir={out}", *more], Recipe)
    recipe.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
    run_dir = train(recipe, "demo")
    policy = load_checkpoint(run_dir / "checkpoints" / "step-3")
    return read_metrics(run_dir / "metrics.jsonl"), {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_two_trainers_take_the_update_one_process_takes(tmp_path: Path, weights: str) -> None:
    more = [] if weights == "lora" else ["rl.lora.enabled=false"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank: the same float reduction order in every matmul
    try:
        (one, w1), (two, w2) = _run(tmp_path, 1, "rl.grad_accum=2", *more), _run(tmp_path, 2, *more)
    finally:
        torch.set_num_threads(threads)
    rl1, rl2 = [r for r in one if r.get("stage") == "rl"], [r for r in two if r.get("stage") == "rl"]
    assert len(rl1) == len(rl2) == 3
    for a, b in zip(rl1, rl2):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), key
        assert a["grad_norm"] > 0 and a["loss"] != 0  # an update that trains, not two zeros agreeing
        assert b["trainers/allreduce_bytes"] > 0 and "trainers/allreduce_bytes" not in a
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) == 0.0


def test_each_rank_trains_on_its_own_half_of_every_minibatch() -> None:
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup

    ensure_ray(num_cpus=2)
    config = RLConfig(prompts_per_step=2, group_size=4, minibatches=2, epochs=2)
    group = TrainerGroup(embedded_policy(0), 2, config, LossConfig(), KLConfig(), seed=3)
    try:
        seen = group.rows_seen(8, step=5)
    finally:
        group.close()
    assert len(seen) == 2 and all(len(steps) == 4 for steps in seen)  # 2 epochs x 2 minibatches
    for first, second in zip(*seen):
        assert len(first) == len(second) == 2 and not set(first) & set(second)
    for epoch in range(2):
        rows = [r for rank in seen for steps in rank[2 * epoch : 2 * epoch + 2] for r in steps]
        assert sorted(rows) == list(range(8))  # each epoch covers the batch once, split over the ranks


@pytest.mark.parametrize("overrides, message", [
    (["rl.trainers=2", "rl.backend=deepspeed", "rl.lora.enabled=false"], "DeepSpeed ZeRO across trainers is not built yet"),
    (["rl.trainers=2", "rl.algorithm=ppo"], "PPO's critic is not data-parallel yet"),
    (["rl.trainers=3", "rl.prompts_per_step=2", "rl.group_size=4"], "does not split over rl.trainers=3"),
    (["rl.trainers=2", "rl.prompts_per_step=1", "rl.group_size=4", "rl.grad_accum=4"], "at least rl.grad_accum=4"),
    (["rl.trainers=0"], "rl.trainers=0 must be at least 1"),
])
def test_a_trainer_group_it_cannot_serve_is_refused_before_anything_runs(overrides: list[str], message: str) -> None:
    recipe = load_recipe("demo", overrides, Recipe)
    with pytest.raises(RecipeCheckError, match=message):
        check_recipe(recipe)


def test_more_trainers_than_the_local_ray_has_cpus_fail_at_once() -> None:
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer_group import TrainerGroup

    ensure_ray(num_cpus=2)
    with pytest.raises(ValueError, match=r"rl.trainers=3 trainer processes need 3 CPUs, but the local Ray has"):
        TrainerGroup(embedded_policy(0), 3, RLConfig(), LossConfig(), KLConfig(), seed=0)


@pytest.mark.slow
def test_a_run_of_two_trainers_resumes_with_one(tmp_path: Path) -> None:
    """Checkpoints hold one optimiser state whatever the number of ranks (theirs are equal), so a
    run trained by two ranks resumes with one and ends where the uninterrupted run ends."""
    import shutil

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "run"
        steps = [*RUN, "run.save_every=1", "run.keep_last=3", f"run.output_dir={out}"]
        whole = load_recipe("demo", [*steps, "rl.trainers=2"], Recipe)
        whole.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
        uninterrupted = [r for r in read_metrics(train(whole, "demo") / "metrics.jsonl") if r.get("stage") == "rl"]
        final = load_checkpoint(out / "checkpoints" / "step-3").model.state_dict()
        shutil.rmtree(out / "checkpoints" / "step-3")  # as if the run had stopped after step 2
        resumed_recipe = load_recipe("demo", [*steps, "rl.trainers=1", "rl.grad_accum=2", "run.resume=true"], Recipe)
        resumed_recipe.rewards.append(RewardSpec(f"{__name__}:token_parity", weight=1.0))
        resumed = [r for r in read_metrics(train(resumed_recipe, "demo") / "metrics.jsonl") if r.get("stage") == "rl"]
        again = load_checkpoint(out / "checkpoints" / "step-3").model.state_dict()
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for key in SAME:
        assert resumed[-1][key] == pytest.approx(uninterrupted[-1][key], rel=TOLERANCE, abs=TOLERANCE), key
    assert "trainers/allreduce_bytes" in uninterrupted[-1] and "trainers/allreduce_bytes" not in resumed[-1]
    assert max(float((final[k] - again[k]).abs().max()) for k in final) == 0.0
