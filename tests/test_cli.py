"""The `vocalign` command, run in-process through `vocalign.rl.cli.main` (and once as the
installed console script): listing recipes and rewards, training a recipe, and the
messages a user gets for a mistyped key, a wrong type or an unknown recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vocalign.rl.cli import main
from vocalign.rl.recipe import packaged_recipes_dir
from vocalign.rl.tracking import read_metrics


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "vocalign"
    assert script.is_file(), f"the console script is not installed beside {sys.executable}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vocalign")
    for command in ("train", "rewards", "recipes"):
        assert command in done.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: vocalign" in capsys.readouterr().err


def test_recipes_lists_demo_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    description = OmegaConf.load(packaged_recipes_dir() / "demo.yaml").description
    lines = capsys.readouterr().out.splitlines()
    demo = [line for line in lines if line.split()[0] == "demo"]
    assert len(demo) == 1
    assert demo[0].split(None, 1)[1] == description


def test_rewards_lists_correctness_with_its_params(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[0] == "correctness")
    assert "1.0 when the response's answer equals meta[field]" in lines[at]
    assert lines[at + 1].split() == ["params:", "field='answer',", "speech=False"]


def test_unknown_key_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "demo", "rl.stpes=3"]) == 2
    captured = capsys.readouterr()
    assert "recipe key 'rl.stpes' is not known; did you mean 'rl.steps'?" in captured.err
    assert "override 'rl.stpes=3'" in captured.err  # names where the mistake is
    assert captured.out == ""  # nothing ran


def test_wrong_type_names_the_key_and_the_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "demo", "rl.steps=many"]) == 2
    assert "recipe key 'rl.steps' expects int, got 'many'" in capsys.readouterr().err


def test_unknown_recipe_lists_the_available_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vocalign: recipe 'no-such-recipe' not found")
    assert "recipes available by name: demo" in err


def test_train_names_the_run_folder_after_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [
        "sft.steps=0", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4",
        "data.rl_tasks[0].n=4", "data.eval_prompts=2", "eval.suites=[]", "logging.wandb=false", "run.progress=false",
    ]
    assert main(["train", "demo", *overrides]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("demo-")  # runs/<recipe name>-<timestamp>
    assert [row["stage"] for row in read_metrics(run_dir / "metrics.jsonl")] == ["rl"]
    assert f"run folder: runs/{run_dir.name}" in capsys.readouterr().out
