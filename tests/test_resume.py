"""Exact resume: a run killed with SIGKILL and resumed ends where an uninterrupted run ends.

Each case runs the real command line (`vocalign train`) in subprocesses on one torch
thread: an uninterrupted run, and a run of the same recipe and seed that is killed
with SIGKILL as soon as its checkpoint after step K exists, then started again with
`run.resume=true`. The final weights must be bitwise equal, and every metric of every
step after the checkpoint the same (time measurements aside).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vocalign.rl.checkpoint import latest_checkpoint, read_state
from vocalign.rl.tracking import read_metrics

STEPS, KILL_AFTER = 5, 2

REWARD_MODULE = '''
def text_characters(rollouts):
    """The length of each visible text answer: differs between samples, so updates are not zero."""
    return [float(len(r.text)) for r in rollouts]
'''

BASE = [
    "sft.steps=0", f"rl.steps={STEPS}", "data.rl_tasks[0].n=32", "data.eval_prompts=4", "eval.suites=[]",
    "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=12", "rl.minibatches=2", "rl.lr=1e-2",
    "rewards=[{name: 'resume_reward:text_characters', weight: 0.1}, {name: correctness, weight: 1.0}]",
    "run.save_every=1", "run.keep_last=2", "run.progress=false", "logging.audio_every=0",
]
CASES = {
    "lora": ["rl.lora.enabled=true", "kl.coef=0.05", "logging.mode=offline"],
    "ppo-lora": ["rl.algorithm=ppo", "rl.epochs=2", "rl.lora.enabled=true", "kl.coef=0.05", "kl.mode=reward", "logging.wandb=false"],
    "full-zero2": ["rl.lora.enabled=false", "rl.backend=deepspeed", "rl.deepspeed.zero_stage=2", "kl.coef=0.05",
                   "logging.wandb=false", "rl.lr=1e-3"],
}
TIMING = ("time/", "throughput/")


def _command(out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "vocalign.rl.cli", "train", "demo", *BASE, *extra, f"run.output_dir={out}"]


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    for variable, folder in [("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")]:
        env[variable] = str(tmp / "wandb_home" / folder)
    for variable in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(variable, None)
    # a free port per process for DeepSpeed's one-process group
    env.pop("MASTER_PORT", None)
    return env


def _weights(folder: Path) -> dict:
    name = "adapter.safetensors" if (folder / "adapter.safetensors").exists() else "model.safetensors"
    weights = load_file(str(folder / name))
    if (folder / "critic.safetensors").exists():
        weights.update({f"critic.{k}": v for k, v in load_file(str(folder / "critic.safetensors")).items()})
    return weights


def _assert_same_final_weights(whole: Path, resumed: Path) -> dict:
    """The two runs' last checkpoints hold bitwise-equal weights; returns the first run's."""
    a, b = _weights(whole / "checkpoints" / f"step-{STEPS}"), _weights(resumed / "checkpoints" / f"step-{STEPS}")
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), f"{name} differs after resume"
    return a


def _rl_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(run / "metrics.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_matches_an_uninterrupted_run(case: str, tmp_path: Path) -> None:
    (tmp_path / "resume_reward.py").write_text(REWARD_MODULE)
    env, extra = _env(tmp_path), CASES[case]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # the uninterrupted run and the one to kill, side by side (one thread each)
    reference = subprocess.Popen(_command(whole, extra), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_command(killed, extra), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / f"step-{KILL_AFTER}" / "trainer_state.json").exists():
        if victim.poll() is not None:
            pytest.fail(f"the run ended before step {KILL_AFTER} was saved:\n{victim.stdout.read()}")
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    before = read_state(latest_checkpoint(killed))
    interrupted_at = before["step"]
    assert KILL_AFTER <= interrupted_at < STEPS, "the kill came too late to interrupt the run"

    resumed = subprocess.run(_command(killed, [*extra, "run.resume=true"]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {killed / 'checkpoints' / f'step-{interrupted_at}'}" in resumed.stdout + resumed.stderr
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out

    # bitwise-equal final weights (the policy's adapter or all its weights, and the critic)
    a = _assert_same_final_weights(whole, killed)
    # training really moved the weights (the test would pass trivially otherwise)
    first = _weights(whole / "checkpoints" / f"step-{STEPS - 1}")
    assert any(first[n].numpy().tobytes() != a[n].numpy().tobytes() for n in a if n in first)

    # the same rewards, losses, KL... for every step after the checkpoint; one row per step
    rows_a, rows_b = _rl_rows(whole), _rl_rows(killed)
    assert sorted(rows_b) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once after a resume"
    for s in range(interrupted_at + 1, STEPS + 1):
        assert rows_a[s] == rows_b[s], f"step {s}: {rows_a[s]} != {rows_b[s]}"
    assert all(k in rows_b[STEPS] for k in ("reward/mean", "loss", "kl", "entropy", "clip_frac", "approx_kl"))
    state = read_state(killed / "checkpoints" / f"step-{STEPS}")
    assert state["stage_step"] == STEPS and state["cursor"] == STEPS * 2
    if "logging.mode=offline" in extra:  # the resumed run continues the same W&B run
        first_id = before["wandb_id"]
        assert first_id and state["wandb_id"] == first_id
        runs = sorted(p.name for p in (killed / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and all(r.endswith(first_id) for r in runs), runs


KILL_IN_SAVE = '''
import os, signal, sys
import vocalign.rl.checkpoint as checkpoint

write_manifest, saves = checkpoint.write_manifest, []

def dies_writing_the_third_checkpoint(folder):
    # the third step folder's files are written but it is not renamed into place yet
    saves.append(folder)
    if sum(".tmp-step-" in str(f) for f in saves) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(folder)

checkpoint.write_manifest = dies_writing_the_third_checkpoint
from vocalign.rl.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_complete_one(tmp_path: Path) -> None:
    """A kill in the middle of saving step 3 leaves step 2 the latest checkpoint; the resumed run
    ends bitwise where an uninterrupted one does."""
    (tmp_path / "resume_reward.py").write_text(REWARD_MODULE)
    (tmp_path / "dies_in_save.py").write_text(KILL_IN_SAVE)
    env, extra = _env(tmp_path), CASES["lora"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(_command(whole, extra), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    dying = subprocess.run([sys.executable, "dies_in_save.py", *_command(killed, extra)[3:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert dying.returncode == -signal.SIGKILL, dying.stdout + dying.stderr
    assert [p.name for p in (killed / "checkpoints").glob("step-*")] == ["step-2"] or sorted(
        p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-1", "step-2"]
    assert list((killed / "checkpoints").glob(".tmp-step-3-*")), "the kill should have come inside the save"
    resumed = subprocess.run(_command(killed, [*extra, "run.resume=true"]), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from {killed / 'checkpoints' / 'step-2'}" in resumed.stdout + resumed.stderr
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    _assert_same_final_weights(whole, killed)
    assert not list((killed / "checkpoints").glob(".tmp-*")), "the next save cleans up the broken temporary folder"
