"""The run loop with rollouts on 2 Ray workers trains as the in-process run does.

Sampling is seeded per (seed, prompt, sample), so the workers generate the in-process
worker's responses; after each update the trainer sends the adapter, checks every
worker's version and checksum, and the next step's rollouts carry the new version.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_training import TEXT_REWARD  # pytest puts tests/ on sys.path

from vocalign.rewards import RewardSpec
from vocalign.rl.config import Recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

RUN = [
    "sft.steps=0", "rl.steps=3", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=3",
    "rl.group_size=4", "rl.max_new_tokens=12", "kl.coef=0.05", "rewards=[{name: correctness, weight: 1.0}]",
    "logging.wandb=false", "logging.audio_every=0", "run.progress=false",
]
SAME = ("reward/mean", f"reward/{TEXT_REWARD}", "loss", "kl", "clip_frac", "response/tokens", "entropy")


def _run(tmp_path: Path, workers: int, *more: str) -> list[dict]:
    out = tmp_path / f"{workers}{len(more)}"
    recipe = load_recipe("demo", [*RUN, f"rollouts.num_workers={workers}", f"run.output_dir={out}", *more], Recipe)
    recipe.rewards.append(RewardSpec(TEXT_REWARD, weight=0.01))
    return read_metrics(train(recipe, "demo") / "metrics.jsonl")


def test_two_ray_workers_train_as_in_process(tmp_path: Path) -> None:
    local, remote = _run(tmp_path, 0), _run(tmp_path, 2)
    assert len(local) == len(remote) == 3
    for a, b in zip(local, remote):
        for key in SAME:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
        assert a["sync/bytes"] == 0  # in-process: the worker shares the trainer's weights
        assert b["sync/bytes"] > 0 and b["rollouts/restarts"] == 0  # the adapter went to the workers
    assert remote[-1]["grad_norm"] > 0


def test_async_generation_is_one_step_off_policy(tmp_path: Path) -> None:
    """Step k+1's rollouts are generated while step k updates: they come from the weights
    one version behind the trainer's (the first step's are on-policy), and the clipped
    ratio sees the difference."""
    rows = _run(tmp_path, 2, "rollouts.async_generation=true", "rl.minibatches=1")
    assert [r["rollouts/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["clip_frac"] == 0.0 and rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["approx_kl"] > 1e-6  # sampled by the weights before the last update
    assert all(r["sync/bytes"] > 0 and r["rollouts/restarts"] == 0 for r in rows)


def test_tool_use_on_two_ray_workers_trains_as_in_process(tmp_path: Path) -> None:
    """Multi-turn rollouts with the calculator run inside the workers: the calls, their
    results and the answers after them are the in-process run's (the loss masks too, or the
    losses would differ)."""
    tool_run = [
        "sft.steps=0", "rl.steps=2", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=3",
        "rl.group_size=4", "rl.max_new_tokens=12", "rl.minibatches=1", "logging.wandb=false", "run.progress=false",
    ]

    def run(workers: int) -> list[dict]:
        out = tmp_path / f"tools{workers}"
        recipe = load_recipe("tool_use_grpo", [*tool_run, f"rollouts.num_workers={workers}", f"run.output_dir={out}"], Recipe)
        return read_metrics(train(recipe, "tool_use_grpo") / "metrics.jsonl")

    local, remote = run(0), run(2)
    assert len(local) == len(remote) == 2
    for a, b in zip(local, remote):
        for key in ("reward/mean", "reward/tool_call", "reward/correctness", "loss", "response/tokens", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
        assert b["sync/bytes"] > 0 and b["rollouts/restarts"] == 0
