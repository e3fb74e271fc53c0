"""The synthetic tasks, by the name a recipe gives (`data.sft_tasks`, `data.rl_tasks`).

A task is a function `fn(n, seed, **params) -> list[Prompt]` registered with `@task(name)`.
The built-in tasks register when `vocalign.data` is imported: `arithmetic`,
`transcription`, `perception` and `styled_speech` (data/synthetic.py) and `tool_use`
(data/tool_tasks.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .types import Prompt

TaskFn = Callable[..., list[Prompt]]
TASKS: dict[str, TaskFn] = {}


def task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Register the decorated function as the synthetic task `name`; the function is returned unchanged."""

    def register(fn: TaskFn) -> TaskFn:
        if name in TASKS:
            raise ValueError(f"synthetic task {name!r} is registered twice ({TASKS[name].__module__} and {fn.__module__})")
        TASKS[name] = fn
        return fn

    return register


def make_task(name: str, n: int, seed: int, **params) -> list[Prompt]:
    """`n` prompts of the task called `name` (a key of TASKS); `params` go to its function."""
    if name not in TASKS:
        raise ValueError(f"synthetic task {name!r} is not known; use one of {', '.join(TASKS)}")
    return TASKS[name](n, seed, **params)


def check_count(n: int, task: str) -> None:
    """A task's `n` is a non-negative int; else a ValueError naming the task."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{task}: n={n!r} must be a non-negative int (the number of prompts)")
