"""Staged recipes (`stages:`): how a stage's recipe is made, the checks that refuse bad stage
definitions before anything runs, and a cut-down Step-Audio 2 pipeline run end to end,
killed with SIGKILL in the middle of a stage and resumed, ending bitwise where an
uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vocalign.rl.checkpoint import read_state
from vocalign.rl.cli import main
from vocalign.rl.config import Recipe, RecipeCheckError, check_recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.stage_eval import stage_table
from vocalign.rl.stages import stage_plans
from vocalign.rl.tracking import read_metrics

PIPELINE = "recipes/step_audio2_pipeline.yaml"


def _pipeline(*overrides: str) -> Recipe:
    return load_recipe(Path(__file__).parent.parent / PIPELINE, list(overrides), Recipe)


def test_each_stage_runs_the_recipe_with_its_own_keys_merged_in(tmp_path: Path) -> None:
    recipe = _pipeline("stages[1].rl.steps=10", "rl.prompts_per_step=4")
    check_recipe(recipe)
    plans = stage_plans(recipe, tmp_path)
    assert [(p.name, p.type) for p in plans] == [
        ("sft", "sft"), ("think", "ppo"), ("rm", "reward_model"), ("rm_ppo", "ppo"), ("perception", "grpo")]
    think, rm_ppo, perception = plans[1].recipe, plans[3].recipe, plans[4].recipe
    assert think.rl.steps == 10 and think.rl.algorithm == "ppo"  # the override reached the stage
    assert think.rl.prompts_per_step == 4 == perception.rl.prompts_per_step  # the recipe's keys are inherited
    assert perception.rl.algorithm == "grpo" and perception.data.rl_tasks[0].name == "perception"
    assert plans[0].recipe.data.rl_tasks[0].name == "arithmetic"  # another stage's data is left alone
    assert [r.name for r in think.rewards] == ["think_length", "correctness"]
    # a reward model named by stage is served from the folder that stage saves
    served = {r.name: r.params for r in rm_ppo.rewards}["reward_model"]
    assert served == {"source": "text", "path": str(tmp_path / "reward_models" / "rm")}
    assert [p.base for p in plans] == ["base-sft", "base-think", "base-rm", "base-rm_ppo", "base-perception"]


def test_a_recipe_without_stages_is_sft_then_rl() -> None:
    recipe = load_recipe("demo", [], Recipe)
    plans = stage_plans(recipe)
    assert [(p.name, p.type, p.base, p.staged) for p in plans] == [("sft", "sft", "base", False), ("rl", "grpo", "base", False)]
    assert all(p.recipe is recipe for p in plans)


@pytest.mark.parametrize("overrides, message", [
    (["stages[2].type=dpo"], "stages[2] (rm): type 'dpo' is not a stage type; use one of sft, grpo, ppo, reward_model"),
    (["stages[3].name=think"], "stages[3].name 'think' is also the name of stages[1]; stage names must differ"),
    (["stages[3].rewards[0].params.stage=rm2"],
     "stages[3] (rm_ppo): reward reward_model uses stage='rm2', but no earlier stage of type reward_model is called "
     "that (earlier reward_model stages: rm)"),
    (["stages=[{name: a, type: ppo, rewards: [{name: reward_model, params: {stage: b}}]}, {name: b, type: reward_model}]"],
     "stages[0] (a): reward reward_model uses stage='b', but no earlier stage of type reward_model is called that "
     "(earlier reward_model stages: none)"),
    (["stages[1].rl.stpes=3"], "recipe key 'stages[1].rl.stpes' is not known; did you mean 'stages[1].rl.steps'?"),
    (["stages[1].type=grpo", "stages[1].rl.algorithm=ppo"], "stages[1] (think): type grpo but rl.algorithm=ppo"),
    (["stages[1].name=eval"], "stages[1].name 'eval' is reserved"),
    (["stages[1].name=''"], "stages[1] has no name"),
    (["stages[1].rl.steps=0"], "stages[1] (think): a ppo stage needs rl.steps >= 1"),
    (["stages[3].rewards=[{name: reward_model, params: {source: text}}]"],
     "stages[3] (rm_ppo): reward reward_model needs path=FOLDER"),
])
def test_bad_stage_definitions_are_refused_before_anything_runs(overrides, message, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", str(Path(__file__).parent.parent / PIPELINE), *overrides, f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and message in " ".join(err.split()), err
    assert not out.exists(), "nothing may run, or be written, before the stages are checked"


def test_a_stage_name_in_a_recipe_without_stages_is_refused() -> None:
    recipe = load_recipe("demo", ["rewards=[{name: reward_model, params: {stage: rm}}]"], Recipe)
    with pytest.raises(RecipeCheckError, match="names a reward_model stage, and this recipe has no stages"):
        check_recipe(recipe)


def _estimate(mean: float, half: float = 0.05) -> dict:
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": 50}


def test_the_stage_table_compares_each_stage_with_the_one_before_and_marks_losses() -> None:
    def suites(correct: float, accuracy: float) -> dict:
        return {"spoken_qa": {"metrics": {"correct": _estimate(correct)}, "groups": {}},
                "perception": {"metrics": {"accuracy": _estimate(accuracy)}, "groups": {"rate": {"accuracy": _estimate(accuracy)}}}}

    summary = {
        "initial_suites": suites(0.0, 0.3),
        "sft_suites": suites(0.9, 0.5), "sft": {"reward/mean": 0.9},
        "rm": {"reward_model/accuracy first 10%": 0.6, "reward_model/accuracy last 10%": 0.95, "held_out": {"accuracy": 0.93}},
        "grpo_suites": suites(0.7, 0.8),
        "grpo": {"reward/mean first 10%": 0.5, "reward/mean last 10%": 0.8, "eval": {"reward/mean": 0.81}},
        "grpo_before": {"reward/mean": 0.52},
    }
    table = stage_table(summary, [("sft", "sft"), ("rm", "reward_model"), ("grpo", "grpo")])
    sft, rm, grpo = table
    assert sft["own"] is None and {c["metric"]: (c["before"]["mean"], c["after"]["mean"]) for c in sft["suites"]} == {
        "spoken_qa/correct": (0.0, 0.9), "perception/accuracy": (0.3, 0.5), "perception/rate/accuracy": (0.3, 0.5)}
    # a reward-model stage leaves the policy as it was: its before is its after
    assert rm["own"] == {"metric": "reward_model/accuracy", "first": 0.6, "last": 0.95} and rm["held_out"]["accuracy"] == 0.93
    assert all(c["before"] == c["after"] for c in rm["suites"])
    # GRPO's before is SFT's after: spoken_qa fell 0.9 -> 0.7, beyond both intervals, and is marked lost
    lost = {c["metric"]: c["lost"] for c in grpo["suites"]}
    assert lost == {"spoken_qa/correct": True, "perception/accuracy": False, "perception/rate/accuracy": False}
    assert grpo["own"] == {"metric": "reward/mean", "first": 0.5, "last": 0.8}
    assert grpo["own_held_out"] == {"before": {"reward/mean": 0.52}, "after": {"reward/mean": 0.81}}


TINY = [
    "data.sft_tasks=[{name: arithmetic, n: 16, params: {think: true, voices: default, noise: none}}, {name: perception, n: 8}]",
    "data.rl_tasks=[{name: arithmetic, n: 16, params: {think: true, voices: default, noise: none}}]",
    "data.eval_prompts=4", "eval.n=4", "sft.steps=4", "sft.batch_size=4",
    "rl.prompts_per_step=2", "rl.group_size=2", "rl.minibatches=1", "rl.max_new_tokens=12", "rl.lr=1e-2",
    "stages[1].rl.steps=2",
    "stages[2].reward_model.train_pairs=20", "stages[2].reward_model.eval_pairs=10",
    "stages[2].reward_model.policy_samples=4", "stages[2].reward_model.steps=4", "stages[2].reward_model.batch_size=4",
    "stages[3].rl.steps=3", "stages[4].rl.steps=2", "stages[4].data.rl_tasks=[{name: perception, n: 8}]",
    "run.save_every=1", "run.keep_last=50", "run.progress=false", "logging.wandb=false",
]
LAST = 15  # steps: sft 4, think 2, rm 4 (its logging steps), rm_ppo 3, perception 2
TIMING = ("time/", "throughput/")


def _train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vocalign.rl.cli", "train", str(Path(__file__).parent.parent / PIPELINE), *TINY,
            *extra, f"run.output_dir={out}"]


def _final(run: Path) -> dict:
    """What the run ends with: the last stage's adapter, the base it adapts, the reward model's head."""
    weights = {f"adapter.{k}": v for k, v in load_file(str(run / "checkpoints" / f"step-{LAST}" / "adapter.safetensors")).items()}
    weights |= {f"base.{k}": v for k, v in load_file(str(run / "checkpoints" / "base-perception" / "model.safetensors")).items()}
    weights |= {f"rm.{k}": v for k, v in load_file(str(run / "reward_models" / "rm" / "hearing_head.safetensors")).items()}
    return weights


@pytest.mark.slow
def test_a_cut_down_pipeline_killed_mid_stage_resumes_bitwise(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(_train(whole), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_train(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_of_rm_ppo = killed / "checkpoints" / "step-11" / "trainer_state.json"  # the PPO stage on the reward model
    deadline = time.monotonic() + 300
    while not first_of_rm_ppo.exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before step 11 was saved:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, "no checkpoint in stage rm_ppo after 300 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = read_state(first_of_rm_ppo.parent)
    assert state["stage"] == "rm_ppo" and state["stage_step"] == 1 and state["base"] == "base-rm_ppo"
    saved = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists())
    assert saved[-1] < 13, f"the kill must come inside stage rm_ppo (steps 11-13); checkpoints {saved}"

    resumed = subprocess.run(_train(killed, "run.resume=true"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"(step {saved[-1]}, stage rm_ppo)" in resumed.stdout + resumed.stderr
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    a, b = _final(whole), _final(killed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), f"{name} differs after the resume"
    # every row after the checkpoint is the same; one row per step; each stage logged under its own name
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(whole / "metrics.jsonl")]
    again = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(killed / "metrics.jsonl")]
    assert [r for r in again if r["step"] > saved[-1]] == [r for r in rows if r["step"] > saved[-1]]
    trained = {r["stage"]: r["step"] for r in again if r["stage"] != "eval"}
    assert trained == {"sft": 4, "think": 6, "rm": 10, "rm_ppo": 13, "perception": LAST}
    summary = json.loads((killed / "summary.json").read_text())
    assert [row["name"] for row in summary["stages"]] == ["sft", "think", "rm", "rm_ppo", "perception"]
    assert summary["stages"][4]["suites"] and "initial_suites" in summary
    assert "accuracy/heard" in summary["rm"]["held_out"]
