"""Data: prompts, rollouts and speech (`types`, `espeak`, `render`, `speakers`), the synthetic
tasks (`tasks`), and users' own files (`user_data`).

Importing this package registers the built-in synthetic tasks, so `make_task("arithmetic", ...)`
works after `import vocalign.data`.
"""

from vocalign.data import synthetic as _synthetic  # noqa: F401  (registers the speech and arithmetic tasks)
from vocalign.data import tool_tasks as _tool_tasks  # noqa: F401  (registers "tool_use")
