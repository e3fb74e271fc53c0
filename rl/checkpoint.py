"""Checkpoints: `checkpoints/step-<N>/`, written atomically, pruned by count and interval.

A checkpoint holds everything a run needs to continue exactly where it stopped:
- the policy: the whole model (config, safetensors weights, tokenizer) with full
  weights; under LoRA only `adapter.safetensors`, the base it adapts being saved once,
  in `checkpoints/base/`, when the adapters are attached;
- the optimiser state (`optimizer.pt`, or DeepSpeed's own files), and PPO's critic
  (`critic.safetensors`, `critic/`);
- `rng.pt`: the torch (and CUDA), numpy and python random states;
- `trainer_state.json`: the stage, the global and the stage's step, the data position,
  the KL coefficient, the weight version, the W&B run id and the summary so far.

Each is written into a temporary sibling folder and renamed into place, so a kill
during a save leaves the previous checkpoint as the latest, never a broken one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vocalign.model.loading import load_policy, save_policy
from vocalign.model.policy import Policy

STATE_NAME = "trainer_state.json"
ADAPTER_NAME = "adapter.safetensors"
RNG_NAME = "rng.pt"


def _write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling folder, then rename: a kill never leaves a half checkpoint."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():  # only when a step is saved twice; the older copy goes first
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def save_base(policy: Policy, run_dir: Path) -> Path:
    return _write_atomically(Path(run_dir) / "checkpoints" / "base", lambda d: save_policy(policy, d))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(folder: Path) -> None:
    state = torch.load(Path(folder) / RNG_NAME, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    policy: Policy, run_dir: Path, step: int, state: dict[str, Any], keep_last: int, keep_every: int = 0,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save the policy, `state` and whatever `extra(folder)` writes (optimiser, critic) as step `step`."""
    folder = Path(run_dir) / "checkpoints" / f"step-{step}"

    def write(d: Path) -> None:
        if policy.lora:
            save_file({k: v.contiguous() for k, v in policy.trainable_state().items()}, str(d / ADAPTER_NAME))
        else:
            save_policy(policy, d)
        if extra is not None:
            extra(d)
        torch.save(rng_state(), d / RNG_NAME)
        (d / STATE_NAME).write_text(json.dumps({**state, "step": step, "lora": policy.lora}, indent=2))

    _write_atomically(folder, write)
    prune(folder.parent, keep_last, keep_every)
    return folder


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `folder` (`step-N` with a trainer state), oldest first."""
    found = []
    for p in Path(folder).glob("step-*"):
        if p.name.split("-", 1)[1].isdigit() and (p / STATE_NAME).exists():
            found.append((int(p.name.split("-", 1)[1]), p))
    return sorted(found)


def prune(folder: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete checkpoints but the newest `keep_last` and those whose step is a multiple of `keep_every`."""
    found = checkpoints(folder)
    newest = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    for step, path in found:
        if step not in newest and not (keep_every > 0 and step % keep_every == 0):
            shutil.rmtree(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(Path(run_dir) / "checkpoints")
    return found[-1][1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / STATE_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_NAME}); pass RUN_DIR/checkpoints/step-N")
    return json.loads((folder / STATE_NAME).read_text())


def load_checkpoint(folder: str | Path) -> Policy:
    """The policy of a checkpoint folder (base + adapter under LoRA)."""
    folder = Path(folder)
    state = read_state(folder)
    if not state["lora"]:
        return load_policy(folder)
    policy = load_policy(folder.parent / "base")
    policy.enable_lora(**state["lora_config"])
    policy.load_trainable_state(load_file(str(folder / ADAPTER_NAME)))
    return policy
