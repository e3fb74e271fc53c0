"""The recipe checks that depend on whether model.path is a Qwen2.5-Omni checkpoint (kept apart
from config.py, which calls them, so that neither grows past one concern). `recipe` is a
`vocalign.rl.config.Recipe`."""

from __future__ import annotations

import json
from pathlib import Path


def is_omni(recipe) -> bool:
    """Whether model.path is a Qwen2.5-Omni checkpoint (its config.json says so)."""
    config = Path(recipe.model.path) / "config.json" if recipe.model.path else None
    try:
        return config is not None and json.loads(config.read_text()).get("model_type") == "qwen2_5_omni"
    except (OSError, ValueError):
        return False


def omni_problems(recipe) -> list[str]:
    """rl.train_parts and the Omni model settings: only for a Qwen2.5-Omni model.path."""
    from vocalign.model.omni_policy import PARTS, parts_problem

    parts, problems = recipe.rl.train_parts, []
    if recipe.model.path and not (Path(recipe.model.path) / "config.json").is_file():
        return []  # a missing or unknown model.path is reported on its own
    if not is_omni(recipe):
        if sorted(parts) != sorted(PARTS):
            problems.append(f"rl.train_parts={parts} chooses among Qwen2.5-Omni's parts; model.path is not a Qwen2.5-Omni "
                            "checkpoint, whose model trains as one part: remove rl.train_parts")
        if recipe.model.speaker is not None:
            problems.append(f"model.speaker={recipe.model.speaker!r} picks a Qwen2.5-Omni voice; model.path is not a "
                            "Qwen2.5-Omni checkpoint: remove it")
        if recipe.model.render_steps is not None:
            problems.append(f"model.render_steps={recipe.model.render_steps} sets Qwen2.5-Omni's token2wav; model.path is not a "
                            "Qwen2.5-Omni checkpoint: remove it")
        return problems
    if parts_problem(parts):
        problems.append(parts_problem(parts))
    if recipe.model.max_speech_tokens < 1:
        problems.append(f"model.max_speech_tokens={recipe.model.max_speech_tokens} must be at least 1")
    if recipe.model.render_steps is not None and recipe.model.render_steps < 2:
        problems.append(f"model.render_steps={recipe.model.render_steps}: token2wav's ODE needs at least 2 time points "
                        "(the released model uses 10)")
    if recipe.model.detokenizer is not None:
        problems.append("model.detokenizer is for a Qwen2-Audio model.path; Qwen2.5-Omni speaks through its own talker "
                        "and token2wav: remove it")
    if recipe.rollouts.tools or "tool_use" in recipe.eval.suites:
        problems.append("Qwen2.5-Omni cannot call tools yet: remove rollouts.tools and the tool_use eval suite")
    return problems
