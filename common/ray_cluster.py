"""Ray start-up and the helpers every Ray user in vocalign shares (rollout and reward workers)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

# Ray's shared-memory object store; it would otherwise take most of /dev/shm.
OBJECT_STORE_BYTES = 256 * 1024**2


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Start a local Ray, join a running cluster, or keep the Ray this process already joined.

    `address` joins an existing cluster ("auto", "host:6379" or "ray://host:10001"), as
    starting the driver with RAY_ADDRESS set does. A cluster has its own CPUs and object
    store, so `num_cpus` and the object-store size apply only to a local Ray.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs |= {"num_cpus": num_cpus or os.cpu_count() or 1, "object_store_memory": OBJECT_STORE_BYTES}
    # Actors import functions named `module:function` from the driver's working directory and path.
    paths = [os.getcwd() if p == "" else p for p in sys.path]
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}, **kwargs)


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def task_error_cause(error: BaseException) -> BaseException:
    """The exception an actor raised, out of Ray's `RayTaskError` wrapper (the wrapper itself if it has none)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def shard_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges splitting `count` items over at most `parts` workers,
    sizes differing by at most one (the first ones larger); no empty range."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
