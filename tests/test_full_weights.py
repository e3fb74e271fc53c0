"""Full-weight RL through the whole run loop on DeepSpeed ZeRO stages 1, 2 and 3 (CPU,
one process over gloo), with a KL to a frozen reference copy of the weights.

Each stage trains two GRPO steps of the demo recipe cut down, then its checkpoint is
loaded back and compared with the weights the run started from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vocalign.model.loading import load_policy
from vocalign.rewards import RewardSpec
from vocalign.rl.config import Recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

from test_training import TEXT_REWARD  # pytest puts tests/ on sys.path

RUN = [
    "sft.steps=0", "rl.steps=2", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=2",
    "rl.group_size=4", "rl.max_new_tokens=12", "rl.minibatches=2", "rl.lr=1e-3", "kl.coef=0.05",
    "rl.lora.enabled=false", "rl.backend=deepspeed", "rewards=[{name: correctness, weight: 1.0}]",
    "logging.wandb=false", "logging.audio_every=0", "run.progress=false", "run.save_every=2",
]


pytestmark = pytest.mark.usefixtures("one_deepspeed_process_group")  # see conftest.py


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_full_weight_grpo_through_zero(stage: int, tmp_path: Path) -> None:
    recipe = load_recipe("demo", [*RUN, f"rl.deepspeed.zero_stage={stage}", f"run.output_dir={tmp_path / 'run'}"], Recipe)
    recipe.rewards.append(RewardSpec(TEXT_REWARD, weight=0.01))  # differs between samples: a real gradient
    run_dir = train(recipe, "demo")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["rl", "rl"]
    assert all(r["grad_norm"] > 0 and r["entropy"] > 0 for r in rows)
    # the first step's policy is its reference (a frozen copy); after an update it is not
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[1]["kl"] > 1e-7
    checkpoint = run_dir / "checkpoints" / "step-2"
    assert (checkpoint / "deepspeed").is_dir()  # DeepSpeed's own optimiser state
    trained = load_policy(checkpoint).model.state_dict()  # the full model, gathered under ZeRO-3
    from vocalign.model.loading import embedded_policy

    initial = embedded_policy(0).model.state_dict()
    changed = [n for n in initial if not torch.equal(initial[n], trained[n])]
    assert any(n.startswith("lm.model.layers.") for n in changed)
    assert not any(n.startswith("encoder.") for n in changed), "the audio encoder is frozen"
