"""A user's own reward, in a module outside the package, named by a recipe, trains two steps.

This is the README's "Write your own reward" path, run as a user runs it: the module and
the recipe sit in a folder of their own, and `vocalign train` is started there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

MY_REWARDS = textwrap.dedent('''
    from pathlib import Path

    from vocalign.rewards import reward


    @reward("short_answer")
    def short_answer(rollouts, max_words: int = 3):
        """1.0 when the visible text answer has at most `max_words` words."""
        scores = [float(len(r.text.split()) <= max_words) for r in rollouts]
        with Path("calls.jsonl").open("a") as log:  # what the trainer asked, for the test to check
            log.write(f"{len(rollouts)} {max_words}\\n")
        return scores


    def text_characters(rollouts):
        return [float(len(r.text)) for r in rollouts]
''')

RECIPE = textwrap.dedent('''
    description: "two GRPO steps on a user's rewards"
    data:
      rl_tasks: [{name: arithmetic, n: 8}]
      eval_prompts: 2
    rl: {steps: 2, prompts_per_step: 2, group_size: 3, max_new_tokens: 8}
    rewards:
      - {name: "my_rewards:short_answer", weight: 1.0, params: {max_words: 2}}
      - {name: "my_rewards:text_characters", weight: 0.1}
    run: {output_dir: out, progress: false}
    logging: {wandb: false}
''')


def test_a_reward_module_outside_the_package_trains_two_steps(tmp_path: Path) -> None:
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "vocalign.rl.cli", "train", "recipe.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in grpo] == [1, 2]
    for row in grpo:
        short, chars = row["reward/my_rewards:short_answer"], row["reward/my_rewards:text_characters"]
        assert 0.0 <= short <= 1.0 and chars >= 0.0
        assert abs(row["reward/mean"] - (short + 0.1 * chars)) < 1e-6  # the weighted sum
    # the function was called by the trainer: once per step on the 2 x 3 rollouts, then on
    # the 2 held-out prompts, each time with the recipe's params
    calls = (tmp_path / "calls.jsonl").read_text().split("\n")[:-1]
    assert calls == ["6 2", "6 2", "2 2"]
