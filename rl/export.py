"""`vocalign export`: a checkpoint as one self-contained model folder, with a model card.

A LoRA checkpoint is only an adapter; it needs `checkpoints/base/` and peft to be used.
Exporting merges the adapter into the base weights (W + B·A·alpha/r, exactly what the
adapted layers compute) and saves the plain model with its tokenizer, so
`vocalign.model.loading.load_policy(OUT)` loads it with no peft and no run folder. A
full-weight checkpoint is saved as it is.

Beside the weights, README.md says how the model was trained: the recipe the run wrote
to RUN_DIR/config.yaml, the checkpoint's step and stage, and the run's final numbers
from RUN_DIR/summary.json when the run got that far. The checkpoint is read with
`load_checkpoint`; files of the checkpoint this module does not know (optimizer state,
RNG state, ...) are ignored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vocalign.model.loading import save_policy
from vocalign.model.policy import Policy

from .checkpoint import STATE_NAME, CheckpointError, load_checkpoint, verified
from .recipe import redact_secrets

CARD_NAME = "README.md"
# Name fragments that only peft's LoRA layers and wrappers give to weights; none may
# be left in an exported model.
PEFT_KEY_MARKERS = ("lora_", "base_model.model.", "base_layer.")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what to change."""


@dataclass
class ExportResult:
    out: Path
    step: int
    stage: str
    merged_lora: bool  # the checkpoint was a LoRA adapter, merged into its base


def checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, checked to be one."""
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass RUN_DIR/checkpoints/step-N")
    state_path = checkpoint / STATE_NAME
    if not checkpoint.is_dir() or not state_path.is_file():
        raise ExportError(f"{checkpoint} is not a checkpoint (no {STATE_NAME}); pass RUN_DIR/checkpoints/step-N")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{state_path} is not valid JSON ({e}); the checkpoint is damaged, export another one") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ExportError(f"{state_path} has no integer 'step'; the checkpoint is damaged, export another one")
    return state


def _check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an OUT that would lose work: not empty (without --force), or overlapping the checkpoints."""
    checkpoints = checkpoint.resolve().parent  # RUN_DIR/checkpoints: the step folders and base/
    target = out.resolve()
    if target == checkpoints or checkpoints.is_relative_to(target) or target.is_relative_to(checkpoints):
        raise ExportError(
            f"OUT {out} overlaps the run's checkpoints ({checkpoints}); export to a folder outside it, "
            "e.g. RUN_DIR/export"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {out} is a file; pass a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"OUT {out} exists and is not empty; pass an empty or new folder, or --force to replace it")


def merge_lora(policy: Policy) -> None:
    """Fold the LoRA adapter into the base weights, in place; the policy is then a plain model."""
    if not policy.lora:
        return
    policy.merge_lora()
    left = [key for key in policy.model.state_dict() if any(m in key for m in PEFT_KEY_MARKERS)]
    if left:
        raise RuntimeError(f"merging the LoRA adapter left peft weights behind: {left[:5]}")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> ExportResult:
    """Write the checkpoint's model (LoRA merged) and a model card into `out`.

    `out` is written completely in a temporary sibling folder and then moved into
    place, so a failed export leaves no half model; with `force` an existing `out` is
    replaced only once the new one is complete.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    checkpoint_state(checkpoint)
    _check_out(out, checkpoint, force)
    # a checkpoint damaged after its save falls back to the newest intact one before it (with a warning)
    try:
        checkpoint = verified(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    state = checkpoint_state(checkpoint)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method deprecated in 5.x; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        try:
            policy = load_checkpoint(checkpoint, verify=False)  # verified above
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot load checkpoint {checkpoint}: {e}") from None
        except (KeyError, ValueError) as e:  # a trainer state or adapter this version does not read
            raise ExportError(
                f"cannot load checkpoint {checkpoint} ({type(e).__name__}: {e}); it is damaged or was written by "
                "another vocalign version"
            ) from None
        merged = policy.lora
        merge_lora(policy)

    run_dir = checkpoint.resolve().parent.parent
    card = model_card(state, read_run_config(run_dir), read_summary(run_dir), checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_policy(policy, tmp)
        (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # empty, or replaced with --force (checked above); the new model is complete
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, state["step"], str(state.get("stage", "unknown")), merged)


# --- the model card ---------------------------------------------------------------------


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/config.yaml as plain data (not checked against today's schema: old runs
    keep their old keys), or None when the run folder has none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return redact_secrets(data) if isinstance(data, dict) else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def model_card(
    state: Mapping[str, Any], config: Mapping[str, Any] | None, summary: Mapping[str, Any] | None, checkpoint: Path
) -> str:
    """README.md text: what this model is, how to load it, and how it was trained."""
    step, stage = state["step"], state.get("stage", "unknown")
    config = config or {}
    lines = [
        "---",
        "library_name: vocalign",
        "tags: [vocalign, speech, audio, reinforcement-learning]",
        "---",
        "",
        f"# vocalign model: step {step} ({stage})",
        "",
        f"Exported with `vocalign export` from checkpoint `{checkpoint.name}` of run `{checkpoint.resolve().parent.parent.name}`: "
        f"training step **{step}**, stage **{stage}**."
        + (" The LoRA adapter is merged into the base weights." if state.get("lora") else " Full weights."),
        "",
        "```python",
        "from vocalign.model.loading import load_policy",
        "",
        'policy = load_policy("path/to/this/folder")',
        "```",
        "",
    ]
    if config.get("description"):
        lines += [f"> {config['description']}", ""]
    if state.get("wandb_id"):
        lines += [f"W&B run id: `{state['wandb_id']}`.", ""]
    lines += _recipe_section(config) if config else ["No `config.yaml` was found beside the checkpoints: the recipe is unknown.", ""]
    so_far = state.get("summary")
    if summary:
        lines += [
            "## Final metrics of the run",
            "",
            f"From the run's `summary.json`: numbers at the end of the run, which may be later than this checkpoint (step {step}).",
            "",
            *_metric_tables(summary),
        ]
    elif isinstance(so_far, Mapping) and _metric_tables(so_far):
        lines += [
            "## Metrics up to this checkpoint",
            "",
            "The run has no `summary.json` (it did not finish); these are the numbers it had when it saved this checkpoint.",
            "",
            *_metric_tables(so_far),
        ]
    else:
        lines += ["No `summary.json` in the run folder: the run did not finish, so there are no final metrics.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _recipe_section(config: Mapping[str, Any]) -> list[str]:
    lines = ["## Training recipe", ""]
    model = config.get("model") or {}
    lines += [f"- **Model**: {model.get('path') or 'the embedded Step-Audio-2-style model (built from its config)'}"]
    data = config.get("data") or {}
    for key, label in (("sft_tasks", "SFT tasks"), ("rl_tasks", "RL tasks")):
        tasks = data.get(key) or []
        if tasks:
            lines.append(f"- **{label}**: " + "; ".join(_task(t) for t in tasks))
    for key in ("train_file", "sft_file"):
        if data.get(key):
            lines.append(f"- **data.{key}**: `{data[key]}`")
    lines.append("")
    # The RL section is `grpo` in older runs and `rl` in newer ones; `loss` and `kl` may follow it.
    for section in ("sft", "grpo", "rl", "loss", "kl"):
        values = config.get(section)
        if not isinstance(values, Mapping) or (section == "sft" and not values.get("steps")):
            continue
        # settings of parts the run did not use (a critic without PPO, DeepSpeed on the torch backend) are left out
        unused = {"critic"} if values.get("algorithm", "ppo") != "ppo" else set()
        unused |= {"deepspeed"} if values.get("backend", "deepspeed") != "deepspeed" else set()
        lines += [f"### `{section}`", "", "| setting | value |", "|---|---|"]
        lines += [
            f"| `{key}` | `{_show(value)}` |" for key, value in _flatten(values) if key.split(".")[0] not in unused
        ]
        lines.append("")
    rewards = config.get("rewards") or []
    if rewards:
        lines += ["### Rewards", "", "| reward | weight | params |", "|---|---|---|"]
        for reward in rewards:
            params = reward.get("params") or {}
            shown = ", ".join(f"{k}={_show(v)}" for k, v in params.items()) or "-"
            lines.append(f"| `{reward.get('name')}` | {_show(reward.get('weight', 1.0))} | {shown} |")
        lines.append("")
    return lines


def _metric_tables(summary: Mapping[str, Any]) -> list[str]:
    """Per stage of a run summary: the reward over the first and last 10% of steps, and held-out scores."""
    lines: list[str] = []
    for stage, values in summary.items():
        if not isinstance(values, Mapping):
            continue
        ends = list(dict.fromkeys(k.rsplit(" ", 2)[0] for k in values if k.endswith((" first 10%", " last 10%"))))
        if ends:
            lines += [f"### `{stage}`: reward over training", "", "| metric | first 10% of steps | last 10% of steps |", "|---|---|---|"]
            lines += [
                f"| `{k}` | {_number(values.get(k + ' first 10%'))} | {_number(values.get(k + ' last 10%'))} |"
                for k in ends
            ]
            lines.append("")
        # `<stage>.eval`, or a stage that is itself a held-out score (`sft`): greedy on held-out prompts.
        # The total and each component only; their /std, /none_frac, /failed stay in summary.json.
        held_out = values.get("eval") if isinstance(values.get("eval"), Mapping) else (None if ends else values)
        scores = {k: v for k, v in (held_out or {}).items() if k.startswith("reward/") and k.count("/") == 1}
        if scores:
            lines += [f"### `{stage}`: greedy responses on held-out prompts", "", "| metric | value |", "|---|---|"]
            lines += [f"| `{k}` | {_number(v)} |" for k, v in scores.items()]
            lines.append("")
    return lines


def _task(task: Mapping[str, Any]) -> str:
    params = task.get("params") or {}
    shown = f" ({', '.join(f'{k}={_show(v)}' for k, v in params.items())})" if params else ""
    return f"`{task.get('name')}` x {task.get('n')}{shown}"


def _flatten(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _show(value: Any) -> str:
    """A setting as it reads in YAML/JSON, safe inside a Markdown table cell."""
    text = json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return "nan" if isinstance(value, float) and not math.isfinite(value) else f"{value:.4g}"
