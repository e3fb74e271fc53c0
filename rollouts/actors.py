"""A pool of Ray actors that survives a dead or stuck actor: placement, start-up, calls with
deadlines, replacement and retry. It knows nothing of rollouts or weights; `RolloutGroup`
(rollouts/group.py) says how an actor is built and what must run around a retried call.

- placement: on CPU each actor reserves its resources. With a placement strategy the
  actors are reserved together as a placement group of one bundle per actor (PACK: as
  few nodes as possible; SPREAD: across nodes), so the pool starts whole or not at all
  and a replacement returns to its bundle.
- faults: an actor that dies (RayActorError) or takes longer than `timeout_s` on a call
  (then it is killed) is replaced by a new actor from `build`, and its call runs again.
  `restarts` counts replacements; `max_restarts` bounds them within one `run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vocalign.common.ray_cluster import task_error_cause

PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class RolloutWorkerError(RuntimeError):
    """A rollout worker failed in a way a restart does not fix, or restarts ran out."""


@dataclass
class ActorCall:
    """One method call on one actor, submitted again to its replacement if the actor fails."""

    worker: int
    method: str
    args: tuple
    pin: Any = None  # what the call must run at (the pool's `around` reads it); None: whatever is current
    actor: Any = None  # the actor it was submitted to
    ref: Any = None
    deadline: float = 0.0


# (method, args) calls queued on an actor just before and just after a call
AroundCall = Callable[[ActorCall], tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]]


class ActorPool:
    """`size` Ray actors made by `build(index, ray_options)`; a failed one is built again."""

    def __init__(self, size: int, resources: dict[str, float], build: Callable[[int, dict[str, Any]], Any],
                 strategy: str | None = None, timeout_s: float = 600.0, max_restarts: int = 3,
                 startup_timeout_s: float = 300.0, around: AroundCall | None = None) -> None:
        self.size, self.resources, self.build, self.around = size, resources, build, around
        self.timeout_s, self.max_restarts, self.startup_timeout_s = timeout_s, max_restarts, startup_timeout_s
        self.restarts = 0  # actors replaced since the pool started
        self.actors: list[Any] = []
        self._placement_group: Any = None
        try:
            if strategy is not None:
                self._placement_group = self._reserve(strategy)
            self.actors = [self._start(i) for i in range(size)]
            self._wait_ready(list(range(size)), "start")
        except BaseException:
            self.close()
            raise

    def run(self, calls: list[ActorCall]) -> list[Any]:
        """Submit (if not yet) and gather `calls`, in order; replace an actor that dies or
        times out and run its call again, at most `max_restarts` times."""
        import ray

        for call in calls:
            if call.ref is None:
                self.submit(call)
        results: dict[int, Any] = {}
        restarts = 0
        while len(results) < len(calls):
            waiting = {c.ref: k for k, c in enumerate(calls) if k not in results}
            timeout = max(0.0, min(calls[k].deadline for k in waiting.values()) - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            failed = self._gather(ready, waiting, calls, results)
            if not ready:
                now = time.monotonic()
                failed += [(k, f"took over timeout_s={self.timeout_s:g} s in {calls[k].method}")
                           for k in waiting.values() if calls[k].deadline <= now]
            for k, reason in failed:
                call = calls[k]
                if call.actor is self.actors[call.worker]:  # not yet replaced by another call's failure
                    restarts += 1
                    if restarts > self.max_restarts:
                        raise RolloutWorkerError(
                            f"rollout worker {call.worker} {reason}; gave up after {self.max_restarts} restarts in one call "
                            f"(rollouts.max_restarts). Look for the cause in the worker logs (out of memory, a crash), "
                            f"or raise rollouts.timeout_s if the calls are slow rather than stuck"
                        )
                    self._replace(call.worker, reason)
                self.submit(call)
        return [results[k] for k in range(len(calls))]

    def submit(self, call: ActorCall) -> None:
        """Queue `call` on its actor (with what `around` puts before and after it); returns at once."""
        actor = self.actors[call.worker]
        before, after = self.around(call) if self.around is not None else ([], [])
        for method, args in before:
            getattr(actor, method).remote(*args)
        call.actor, call.ref = actor, getattr(actor, call.method).remote(*call.args)
        call.deadline = time.monotonic() + self.timeout_s
        for method, args in after:
            getattr(actor, method).remote(*args)

    def close(self) -> None:
        """Kill the actors and release their placement group."""
        if not self.actors and self._placement_group is None:
            return
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._placement_group)
            self._placement_group = None

    # -- internals -------------------------------------------------------------------------
    def _gather(self, ready: list, waiting: dict, calls: list[ActorCall], results: dict[int, Any]) -> list[tuple[int, str]]:
        """Results of the finished calls into `results`; returns the calls whose actor died."""
        import ray

        failed = []
        for ref in ready:
            k = waiting[ref]
            try:
                results[k] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
                failed.append((k, f"died ({type(error).__name__})"))
            except ray.exceptions.RayTaskError as error:
                cause = task_error_cause(error)
                raise RolloutWorkerError(
                    f"rollout worker {calls[k].worker} raised in {calls[k].method}: {type(cause).__name__}: {cause}"
                ) from cause
        return failed

    def _reserve(self, strategy: str) -> Any:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {k: v for k, v in (("CPU", self.resources["num_cpus"]), ("GPU", self.resources["num_gpus"])) if v > 0}
        if not bundle:
            raise ValueError("a placement group needs cpus_per_worker or gpus_per_worker > 0")
        group = placement_group([dict(bundle) for _ in range(self.size)], strategy=strategy)
        ready, _ = ray.wait([group.ready()], timeout=self.startup_timeout_s)
        if not ready:
            remove_placement_group(group)
            raise RolloutWorkerError(
                f"Ray could not reserve {self.size} rollout workers of {bundle} ({strategy}) within "
                f"{self.startup_timeout_s:.0f} s: the cluster lacks the resources; lower rollouts.num_workers or "
                f"the per-worker CPUs/GPUs, or add nodes (ray status shows what is free)"
            )
        return group

    def _start(self, index: int) -> Any:
        # Inside a placement group too: the actor takes its bundle's CPUs and GPUs (and Ray sets
        # CUDA_VISIBLE_DEVICES from num_gpus).
        options: dict[str, Any] = dict(self.resources, max_restarts=0)
        if self._placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._placement_group, placement_group_bundle_index=index
            )
        return self.build(index, options)

    def _wait_ready(self, indices: list[int], what: str) -> None:
        import ray

        refs = [self.actors[i].ready.remote() for i in indices]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.startup_timeout_s)
        if len(ready) < len(refs):
            raise RolloutWorkerError(
                f"rollout workers {indices} did not {what} within {self.startup_timeout_s:.0f} s: Ray may lack "
                f"free resources ({self.resources} per worker) or the actors hang while loading the policy"
            )
        try:
            ray.get(ready)
        except ray.exceptions.RayError as error:
            raise RolloutWorkerError(f"rollout workers {indices} failed to {what}: {error}") from error

    def _replace(self, index: int, reason: str) -> None:
        import ray

        ray.kill(self.actors[index], no_restart=True)
        self.restarts += 1
        self.actors[index] = self._start(index)
        self._wait_ready([index], f"restart after worker {index} {reason}")
