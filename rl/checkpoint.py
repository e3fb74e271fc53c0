"""Checkpoints: `checkpoints/step-<N>/`, written atomically, the oldest pruned.

A full-weight checkpoint holds the whole policy (config, safetensors weights,
tokenizer). Under LoRA it holds only `adapter.safetensors`; the base model it adapts is
saved once, in `checkpoints/base/`, when the adapters are attached. Each checkpoint
also has `trainer_state.json` (stage, step, and where the base is).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from vocalign.model.loading import load_policy, save_policy
from vocalign.model.policy import Policy

STATE_NAME = "trainer_state.json"
ADAPTER_NAME = "adapter.safetensors"


def _write_atomically(final: Path, write) -> Path:
    """Write into a temporary sibling folder, then rename: a kill never leaves a half checkpoint."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_base(policy: Policy, run_dir: Path) -> Path:
    return _write_atomically(run_dir / "checkpoints" / "base", lambda d: save_policy(policy, d))


def save_checkpoint(policy: Policy, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step}"

    def write(d: Path) -> None:
        if policy.lora:
            save_file({k: v.contiguous() for k, v in policy.trainable_state().items()}, str(d / ADAPTER_NAME))
        else:
            save_policy(policy, d)
        (d / STATE_NAME).write_text(json.dumps({**state, "step": step, "lora": policy.lora}, indent=2))

    _write_atomically(folder, write)
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.parent.glob("step-*"))
    for _, old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old)
    return folder


def load_checkpoint(folder: str | Path) -> Policy:
    """The policy of a checkpoint folder (base + adapter under LoRA)."""
    folder = Path(folder)
    if not (folder / STATE_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_NAME}); pass RUN_DIR/checkpoints/step-N")
    state = json.loads((folder / STATE_NAME).read_text())
    if not state["lora"]:
        return load_policy(folder)
    policy = load_policy(folder.parent / "base")
    policy.enable_lora(**state["lora_config"])
    policy.load_trainable_state(load_file(str(folder / ADAPTER_NAME)))
    return policy
