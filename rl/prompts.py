"""A run's prompts: SFT, RL and held-out evaluation prompts from the recipe's tasks or files."""

from __future__ import annotations

from vocalign.data.tasks import make_task
from vocalign.data.types import Prompt
from vocalign.data.user_data import load_prompts
from vocalign.model.policy import Policy

from .config import Recipe, TaskSpec


def synthetic_prompts(tasks: list[TaskSpec], seed: int) -> list[Prompt]:
    prompts: list[Prompt] = []
    for k, task in enumerate(tasks):
        prompts += make_task(task.name, task.n, seed + 7919 * k, **task.params)
    return prompts


def audio_limit(policy: Policy) -> float | None:
    """The longest clip, in seconds, the policy's audio encoder takes (None: it has no such limit)."""
    limit = getattr(policy.model, "max_audio_seconds", None)
    if limit is None:
        limit = getattr(getattr(policy.model, "config", None), "max_audio_seconds", None)
    return float(limit) if limit is not None else None


def held_out_count(rows: int, eval_prompts: int) -> int:
    """How many of a training file's first rows are held out for evaluation: data.eval_prompts, but
    at most a tenth of the file (at least one row when it has two or more)."""
    return min(eval_prompts, max(1, rows // 10)) if rows >= 2 else 0


def _load_user_file(key: str, path: str, recipe: Recipe, max_seconds: float | None, say) -> tuple[list[Prompt], int]:
    """The prompts of a recipe's data file; each skipped row is reported on the console."""
    loaded = load_prompts(path, on_bad_row=recipe.data.on_bad_row, max_seconds=max_seconds)
    for reason in loaded.skipped_reasons[:10]:
        say(f"data.{key}: skipped {reason}")
    if loaded.skipped > 10:
        say(f"data.{key}: ... and {loaded.skipped - 10} more rows skipped (summary.json lists the count)")
    return loaded.prompts, loaded.skipped


def build_data(recipe: Recipe, max_seconds: float | None = None, say=print) -> tuple[list[Prompt], list[Prompt], list[Prompt], dict[str, int]]:
    """SFT prompts, RL prompts and held-out evaluation prompts (different seeds: no overlap).

    Rows of your own files are checked as they load (audio longer than `max_seconds` is a
    bad row); SFT rows need a reference `response`.
    """
    d, skipped = recipe.data, {}
    sft = synthetic_prompts(d.sft_tasks, d.seed) if recipe.sft.steps > 0 else []
    if d.sft_file and recipe.sft.steps > 0:
        rows, skipped["sft_file"] = _load_user_file("sft_file", d.sft_file, recipe, max_seconds, say)
        missing = [p.id for p in rows if p.target is None]
        if missing:
            raise ValueError(f"data.sft_file {d.sft_file}: rows {missing[:5]} have no `response`; SFT learns to answer "
                             f"with it: add a response to every row, or give these rows as data.train_file (RL) instead")
        sft += rows
    if d.train_file:
        rl, skipped["train_file"] = _load_user_file("train_file", d.train_file, recipe, max_seconds, say)
        if len(rl) < 2:
            raise ValueError(f"data.train_file {d.train_file} has {len(rl)} usable rows; it needs at least 2 (one to "
                             f"train on, one held out for evaluation)")
        n_held = held_out_count(len(rl), d.eval_prompts)
        if n_held < d.eval_prompts:
            say(f"data.train_file: holding out its first {n_held} of {len(rl)} rows for evaluation (a tenth of the file; "
                f"data.eval_prompts={d.eval_prompts} asks for more); the other {len(rl) - n_held} train")
        rl, held_out = rl[n_held:], rl[:n_held]
    else:
        rl = synthetic_prompts(d.rl_tasks, d.seed + 1)
        held_out = synthetic_prompts([TaskSpec(t.name, d.eval_prompts, t.params) for t in d.rl_tasks[:1]], d.seed + 2)
    if not rl:
        raise ValueError("no RL prompts: set data.rl_tasks or data.train_file")
    return sft, rl, held_out, skipped
