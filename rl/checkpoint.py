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
during a save leaves the previous checkpoint as the latest, never a broken one. Its
last file is `manifest.json`: every other file's size and SHA-256. Resume, export and
`vocalign eval` verify a checkpoint against it (and `checkpoints/base` against its own)
before they read it: a file damaged after the save (truncated by a full disk, an
interrupted copy, a bad sync) makes them fall back to the newest intact checkpoint,
with a warning that names the damaged files, instead of failing inside a library.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
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
MANIFEST_NAME = "manifest.json"


class CheckpointError(ValueError):
    """No intact checkpoint to use: the message names the damaged files and what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (recursively) with its size and SHA-256, in manifest.json."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    (folder / MANIFEST_NAME).write_text(json.dumps({"version": 1, "files": files}, indent=1))


# Files only a resume reads (optimiser, RNG, critic, DeepSpeed's own): loading a policy ignores them.
RESUME_ONLY = ("optimizer", "rng.pt", "critic", "deepspeed")


def damaged_files(folder: Path, for_loading: bool = False) -> list[str]:
    """What is wrong with `folder` against its manifest ([] when intact); a folder saved before
    manifests existed has none and is taken as it is. `for_loading` checks only the files that
    loading the policy reads (export, eval), not the optimiser and RNG states a resume needs."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        return []
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, OSError) as e:
        return [f"{MANIFEST_NAME} (unreadable: {e})"]
    problems = []
    for name, expected in files.items():
        if for_loading and name.startswith(RESUME_ONLY):
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} (missing)")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} ({path.stat().st_size} bytes, saved with {expected['bytes']})")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name} (its contents changed after the save)")
    return problems


def _write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling folder, then rename: a kill never leaves a half checkpoint."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a process killed while saving this step
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    write(tmp)
    write_manifest(tmp)  # last: a folder with a manifest was written whole
    if final.exists():  # only when a step is saved twice; the older copy goes first
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def save_base(policy: Policy, run_dir: Path, name: str = "base") -> Path:
    """The weights an RL stage under LoRA adapts (checkpoints/base; checkpoints/base-<stage> in a staged run)."""
    return _write_atomically(Path(run_dir) / "checkpoints" / name, lambda d: save_policy(policy, d))


def base_of(checkpoint: Path) -> Path:
    """The base folder a LoRA checkpoint's adapter applies to (its state names it; older ones: checkpoints/base)."""
    return Path(checkpoint).parent / read_state(checkpoint).get("base", "base")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: a run starts from `run.seed` alone."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def intact_checkpoint(run_dir: Path, newest: Path | None = None, for_loading: bool = False) -> Path | None:
    """The newest checkpoint of `run_dir` (at or before `newest`, when given) whose files match
    its manifest, and whose base does under LoRA; None when the run has no checkpoint.

    Each damaged one passed over is named in a warning with its damaged files. When every
    checkpoint is damaged, a CheckpointError lists them and says what to do.
    """
    found = checkpoints(Path(run_dir) / "checkpoints")
    if newest is not None:
        found = [(step, path) for step, path in found if step <= _step_of(newest)]
    if not found:
        return None
    skipped = []
    for _, path in reversed(found):
        problems = damaged_files(path, for_loading)
        if not problems and read_state(path).get("lora"):
            base = base_of(path)
            problems = [f"base/{p}" for p in damaged_files(base)]
            if problems:  # every adapter checkpoint shares this base: none can be used
                raise CheckpointError(
                    f"{base} is damaged ({'; '.join(p.removeprefix('base/') for p in problems)}); every "
                    f"LoRA checkpoint of {run_dir} applies to it, so none can be loaded. Restore it from a copy, or "
                    f"start the run again in a new run.output_dir"
                )
        if not problems:
            for damaged, what in skipped:
                warnings.warn(f"checkpoint {damaged} is damaged ({'; '.join(what)}); using {path} instead. "
                              f"Remove {damaged} once you no longer need it", stacklevel=2)
            return path
        skipped.append((path, problems))
    listing = "; ".join(f"{p.name}: {', '.join(what)}" for p, what in skipped)
    raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({listing}); restore the files "
                          f"from a copy, or start the run again in a new run.output_dir")


def verified(checkpoint: Path) -> Path:
    """`checkpoint` when the files that load its policy match its manifest, else the newest such
    checkpoint of its run before it (with a warning); a CheckpointError when there is none."""
    checkpoint = Path(checkpoint)
    if checkpoint.name.startswith("step-") and checkpoint.name.split("-", 1)[1].isdigit():
        return intact_checkpoint(checkpoint.parent.parent, newest=checkpoint, for_loading=True) or checkpoint
    return checkpoint


def _step_of(folder: Path) -> int:
    return int(Path(folder).name.split("-", 1)[1])


def read_state(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not (folder / STATE_NAME).exists():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_NAME}); pass RUN_DIR/checkpoints/step-N")
    try:
        return json.loads((folder / STATE_NAME).read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / STATE_NAME} is not valid JSON ({e}); the checkpoint is damaged: use an "
                              f"older one, or remove {folder}") from None


def load_checkpoint(folder: str | Path, verify: bool = True) -> Policy:
    """The policy of a checkpoint folder (base + adapter under LoRA), verified against its manifest
    first (unless the caller has, `verify=False`): a damaged one is replaced by the newest intact
    checkpoint before it, with a warning."""
    folder = verified(folder) if verify else Path(folder)
    state = read_state(folder)
    if not state["lora"]:
        return load_policy(folder)
    policy = load_policy(base_of(folder))
    policy.enable_lora(**state["lora_config"])
    policy.load_trainable_state(load_file(str(folder / ADAPTER_NAME)))
    return policy
