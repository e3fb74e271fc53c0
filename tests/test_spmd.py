"""SPMD launches: `torchrun` and DeepSpeed's launcher start two copies of `vocalign train`;
rank 0 runs the run and writes everything, rank 1 trains its share of every minibatch and
generates its share of the rollouts (rl/spmd.py). The result is one process's run with
`rl.grad_accum=2`, within the two-rank tolerance of tests/test_trainer_group.py (the ranks
generate in half batches), and the run folder is written once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vocalign.rl.checkpoint import load_checkpoint
from vocalign.rl.cli import main
from vocalign.rl.tracking import read_metrics

ARGS = [
    "sft.steps=0", "rl.steps=3", "data.rl_tasks[0].n=16", "data.eval_prompts=4", "eval.suites=[]", "rl.prompts_per_step=2",
    "rl.group_size=4", "rl.minibatches=2", "rl.max_new_tokens=12", "kl.coef=0.05",
    "rewards=[{name: correctness, weight: 1.0}, {name: 'spmd_rewards:token_parity', weight: 1.0}]",
    "logging.wandb=false", "logging.audio_every=0", "run.progress=false", "run.save_every=3",
]
# `token_parity` varies within every group, so every step trains; with KILL_AT=k, the launcher's
# other process gets a SIGKILL during step k's rewards (as an OOM kill would)
REWARDS = """
import os, signal
import psutil
CALLS = []
def token_parity(rollouts):
    CALLS.append(1)
    if len(CALLS) == int(os.environ.get("KILL_AT", 0)):
        me = psutil.Process()
        for other in me.parent().children():
            if other.pid != me.pid:
                os.kill(other.pid, signal.SIGKILL)
    return [sum(r.response_ids) % 7 / 7 for r in rollouts]
"""
ZERO2 = ["rl.lora.enabled=false", "rl.backend=deepspeed", "rl.deepspeed.zero_stage=2"]


def _launch(tmp_path: Path, name: str, launcher: list[str], *more: str, kill: dict[str, str] = {},  # noqa: B006
            fails: bool = False) -> tuple[Path, str]:
    """Run `vocalign train demo` under `launcher` (empty: one plain process); the run folder and the console."""
    (tmp_path / "spmd_rewards.py").write_text(REWARDS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(kill)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    out = tmp_path / name
    command = [*launcher, *(["-m"] if launcher and launcher[-1] != "--module" else []), "vocalign.rl.cli", "train", "demo",
               *ARGS, f"run.output_dir={out}", *more]
    if not launcher:
        command = [sys.executable, "-m", *command]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    console = done.stdout + done.stderr
    assert (done.returncode != 0) == fails, console[-4000:]
    return out, console


def _compare(one: Path, two: Path) -> None:
    rows1 = [r for r in read_metrics(one / "metrics.jsonl") if r.get("stage") == "rl"]
    rows2 = [r for r in read_metrics(two / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == [1, 2, 3]  # each step logged once
    for a, b in zip(rows1, rows2):
        for key in ("loss", "grad_norm", "reward/mean", "kl", "entropy", "response/tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
        assert a["grad_norm"] > 0 and b["trainers/allreduce_bytes"] > 0 and "trainers/allreduce_bytes" not in a
    w1 = load_checkpoint(one / "checkpoints" / "step-3").model.state_dict()
    w2 = load_checkpoint(two / "checkpoints" / "step-3").model.state_dict()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 2e-7


@pytest.mark.slow
def test_torchrun_splits_the_run_over_two_processes(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, console = _launch(tmp_path, "two", torchrun)
    one, _ = _launch(tmp_path, "one", [], "rl.grad_accum=2")
    _compare(one, two)
    # only rank 0 ran the driver: its console lines appear once, and one run folder was written
    assert console.count("trainers: 2 data-parallel ranks (launcher processes)") == 1
    assert console.count("run folder:") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "__pycache__") == ["one", "two"]


@pytest.mark.slow
def test_the_deepspeed_launcher_runs_zero2_over_two_processes(tmp_path: Path) -> None:
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--module"]
    two, console = _launch(tmp_path, "two", deepspeed, *ZERO2)
    one, _ = _launch(tmp_path, "one", [], *ZERO2, "rl.grad_accum=2")
    _compare(one, two)
    assert console.count("run folder:") == 1
    shards = sorted(p.name for p in (two / "checkpoints" / "step-3" / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_rl_trainers_must_match_the_launch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "demo", "rl.trainers=3"]) == 2
    assert "rl.trainers=3 but the launcher started 2 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_a_launch_that_loses_a_process_ends_and_resumes_bitwise(tmp_path: Path) -> None:
    """SIGKILL of rank 1 during step 2: torchrun stops the launch (no hang), step 1's checkpoint is
    there, and `run.resume=true` ends bitwise where the uninterrupted launch ends."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    every = "run.save_every=1"
    whole, _ = _launch(tmp_path, "whole", torchrun, every)
    killed, console = _launch(tmp_path, "killed", torchrun, every, kill={"KILL_AT": "2"}, fails=True)
    assert "Signal 9 (SIGKILL)" in console
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-1"]
    _launch(tmp_path, "killed", torchrun, every, "run.resume=true")
    rows = [r for r in read_metrics(killed / "metrics.jsonl") if r.get("stage") == "rl"]
    expected = [r for r in read_metrics(whole / "metrics.jsonl") if r.get("stage") == "rl"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    w1 = load_checkpoint(whole / "checkpoints" / "step-3").model.state_dict()
    w2 = load_checkpoint(killed / "checkpoints" / "step-3").model.state_dict()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) == 0.0
