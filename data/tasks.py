"""The synthetic tasks, by the name a recipe gives (`data.sft_tasks`, `data.rl_tasks`).

A task is a function `fn(n, seed, **params) -> list[Prompt]` registered with `@task(name)`.
The built-in tasks register when `vocalign.data` is imported: `arithmetic`,
`transcription`, `perception` and `styled_speech` (data/synthetic.py) and `tool_use`
(data/tool_tasks.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vocalign.common.registry import Registry

from .types import Prompt

TaskFn = Callable[..., list[Prompt]]
TASKS: Registry[TaskFn] = Registry("synthetic task", "Register one with @task(name) (vocalign.data.tasks).")
task = TASKS.register  # @task("name") registers the decorated function as that task


def make_task(name: str, n: int, seed: int, **params) -> list[Prompt]:
    """`n` prompts of the task called `name` (see TASKS); `params` go to its function."""
    return TASKS.get(name)(n, seed, **params)


def check_count(n: int, task: str) -> None:
    """A task's `n` is a non-negative int; else a ValueError naming the task."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{task}: n={n!r} must be a non-negative int (the number of prompts)")
