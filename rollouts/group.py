"""A group of rollout workers on Ray: sharded generation, verified weight sync, restarts.

`RolloutGroup` is a `RolloutSource` (rollouts/contract.py), as the in-process
`RolloutWorker` is, so the trainer drives N Ray actors exactly as it drives one worker:

- generate: the prompts are split into contiguous shards, one per worker; each worker
  generates its shard and the shards are gathered back in order. Sampling is seeded per
  (seed, prompt id, sample index), so the result equals the in-process worker's however
  the prompts are split. Every rollout carries the weight version of the worker that
  made it.
- sync: the trainable state (the adapter only, under LoRA) is put in the object store
  once and every worker loads it; `verify(version, checksum)` then proves each worker
  holds exactly those tensors (`state_checksum`), or raises `WeightSyncError`.
- faults: the actors live in an `ActorPool` (rollouts/actors.py), which replaces a worker
  that dies or times out and runs its call again. The group builds the replacement from
  the same snapshot, gives it the last synced state at its version, and runs a call of an
  older step (one-step-ahead generation) at that step's weights. Same seed, same
  samples: nothing is lost or duplicated. `restarts` counts replacements.

Placement: on CPU each actor simply reserves `cpus_per_worker`. With GPUs
(`gpus_per_worker > 0`) the workers are reserved together as a placement group (PACK by
default); `placement` names the strategy explicitly (it also applies on CPU).
"""

from __future__ import annotations

import os
import time
from typing import Any

from vocalign.common.ray_cluster import ensure_ray, shard_bounds
from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling

from .actors import PLACEMENTS, ActorCall, ActorPool, RolloutWorkerError
from .contract import PendingRollouts, join_shards
from .sync import WeightSyncError, snapshot_policy, state_bytes
from .worker import RolloutActor

__all__ = ["PLACEMENTS", "RolloutGroup", "RolloutWorkerError"]

class RolloutGroup:
    """`num_workers` rollout workers as Ray actors (0: one in-process worker); a context manager.

    `policy` is the trainer's policy at the weights to start from; each actor is built
    from a snapshot of it (LoRA adapters included). `lora_config` (r, alpha, dropout,
    target_modules) makes the workers enable LoRA themselves when `policy` has none yet
    (its adapter then arrives with the first sync); for a LoRA policy it must match the
    policy's own. `address` joins a running Ray cluster (else a local Ray is started).
    """

    actor_class: type = RolloutActor

    def __init__(
        self, policy: Policy, num_workers: int, render_speech: bool = True, cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0, timeout_s: float = 600.0, max_restarts: int = 3, address: str | None = None,
        lora_config: dict[str, Any] | None = None, torch_threads: int = 1, placement: str | None = None,
        startup_timeout_s: float = 300.0, tools: list[str] | tuple[str, ...] = (), max_turns: int = 2,
        tool_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        _check(num_workers >= 1, f"a RolloutGroup needs num_workers >= 1 (got {num_workers}); to generate in the "
                                 f"trainer's process (rollouts.num_workers=0) use RolloutWorker")
        _check(cpus_per_worker >= 0 and gpus_per_worker >= 0,
               f"rollouts.cpus_per_worker and gpus_per_worker must be >= 0 (got {cpus_per_worker}, {gpus_per_worker})")
        _check(timeout_s > 0, f"rollouts.timeout_s must be > 0 seconds (got {timeout_s})")
        _check(max_restarts >= 0, f"rollouts.max_restarts must be >= 0 (got {max_restarts})")
        _check(torch_threads >= 1, f"rollouts.torch_threads must be >= 1 (got {torch_threads})")
        _check(placement is None or placement in PLACEMENTS, f"placement {placement!r} is not a Ray strategy; use one of {', '.join(PLACEMENTS)}")
        if lora_config is not None and policy.lora:
            _check_lora_matches(policy, lora_config)
        self.num_workers = num_workers
        self.last_sync: dict[str, float] = {}
        self._version = 0
        self._state_ref: Any = None  # the last synced state, in the object store: given to replacements
        import ray

        local = address is None and not os.environ.get("RAY_ADDRESS")
        ensure_ray(address=address)
        if local:
            _check_local_resources(num_workers, cpus_per_worker, gpus_per_worker)
        if tools:  # a misconfigured tool fails here, once, not in every actor
            from vocalign.tools import resolve_tools

            unknown = sorted(set(tool_options or {}) - set(resolve_tools(tools)))
            _check(not unknown, f"tool_options name tools that are not enabled: {unknown}; enabled: {sorted(tools)}")
            _check(max_turns >= 0, f"max_turns={max_turns} must be >= 0 (the most tool calls run per response)")
        self._snapshot_ref = ray.put(snapshot_policy(policy))
        self._remote = ray.remote(self.actor_class)
        self._actor_args = dict(render_speech=render_speech, torch_threads=torch_threads,
                                device="cuda" if gpus_per_worker > 0 else "cpu", lora=lora_config,
                                tools=list(tools), max_turns=max_turns, tool_options=tool_options)
        self.pool = ActorPool(
            num_workers, {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}, self._build,
            strategy=placement or ("PACK" if gpus_per_worker > 0 else None), timeout_s=timeout_s,
            max_restarts=max_restarts, startup_timeout_s=startup_timeout_s, around=self._around,
        )

    @property
    def restarts(self) -> int:
        """Workers replaced since the group started."""
        return self.pool.restarts

    @property
    def timeout_s(self) -> float:
        return self.pool.timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self.pool.timeout_s = seconds

    @property
    def max_restarts(self) -> int:
        return self.pool.max_restarts

    @max_restarts.setter
    def max_restarts(self, count: int) -> None:
        self.pool.max_restarts = count

    # -- the rollout contract (rollouts/contract.py) ----------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, version: int) -> None:
        """Restamp the workers' weights as `version` without sending any (a resumed trainer
        whose policy the workers were built from)."""
        self._version = version
        self._on_every("set_version", version)

    def shares_weights(self, policy: Policy) -> bool:
        return False  # the actors hold replicas

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`n` rollouts per prompt, grouped by prompt (rollout i*n+j is sample j of prompt i)."""
        return self.collect(self.generate_async(prompts, n, sampling, seed))

    # -- asynchronous generation -----------------------------------------------------------
    def generate_async(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> PendingRollouts:
        """Start generating; returns at once.

        The workers generate with the weights they hold now. A `sync` called before
        `collect` waits behind the generation on each worker, so the trainer can update
        to version v+1 while version v generates the next step's rollouts, and read the
        staleness from each rollout's `weight_version`.
        """
        bounds = shard_bounds(len(prompts), self.num_workers) if prompts else []
        pin = (self._state_ref, self._version)
        calls = [ActorCall(w, "generate_shard", (prompts[a:b], n, sampling, seed), pin) for w, (a, b) in enumerate(bounds)]
        for call in calls:
            self.pool.submit(call)
        return PendingRollouts(prompts, n, self._version, [a for a, _ in bounds], calls)

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        """The rollouts of `generate_async`, in prompt order, replacing workers that fail."""
        rollouts = join_shards(pending, self.pool.run(pending.calls))
        if len(rollouts) != pending.n * len(pending.prompts):
            raise RolloutWorkerError(
                f"the workers returned {len(rollouts)} rollouts for {len(pending.prompts)} prompts x {pending.n} samples"
            )
        return rollouts

    # -- weight sync -----------------------------------------------------------------------
    def sync(self, state: dict, version: int) -> dict[str, float]:
        """Send the trainer's trainable state to every worker, stamped `version`.

        Returns {"bytes": size of one copy of the state, "seconds": time until every
        worker has loaded it}, also kept as `last_sync`. A worker that fails here is
        replaced and the replacement is built at this state.
        """
        import ray

        t0 = time.perf_counter()
        # On the CPU in the object store: a CUDA tensor would come back on the CUDA device of
        # each worker, which a CPU worker does not have (the worker moves it to its device).
        cpu_state = {k: v.detach().cpu() for k, v in state.items()}
        self._state_ref, self._version = ray.put(cpu_state), version
        self._on_every("sync", self._state_ref, version)
        self.last_sync = {"bytes": float(state_bytes(state)), "seconds": time.perf_counter() - t0}
        return self.last_sync

    def verify(self, version: int, checksum: str) -> None:
        """Raise `WeightSyncError` unless every worker holds weight `version` with `checksum`
        (`state_checksum` of the state the trainer synced)."""
        states = self.weight_states()
        wrong = [
            f"worker {i} holds version {v} with checksum {c}"
            for i, (v, c) in enumerate(states) if v != version or c != checksum
        ]
        if wrong:
            raise WeightSyncError(
                f"rollout workers out of sync with the trainer (version {version}, checksum {checksum}): "
                + "; ".join(wrong) + ". Sync the trainer's state again (sync(state, version)) before generating."
            )

    def weight_states(self) -> list[tuple[int, str]]:
        """(version, checksum) of each worker."""
        return self._on_every("weight_state")

    def logprobs(self, prompts: list[Prompt], response_ids: list[list[int]], temperature: float = 1.0) -> list[list[list[float]]]:
        """Each worker's log-probabilities of the same sequences (one list per worker): to check
        that every worker computes what the trainer does."""
        return self._on_every("logprobs", prompts, response_ids, temperature)

    # -- processes -------------------------------------------------------------------------
    def worker_info(self) -> list[tuple[int, str]]:
        """(process id, Ray node id) of each worker."""
        return self._on_every("ready")

    def actor(self, index: int) -> Any:
        """The Ray actor handle of worker `index` (to inspect it; the group may replace it)."""
        return self.pool.actors[index]

    def close(self) -> None:
        """Kill the actors and release their placement group."""
        self.pool.close()

    def __enter__(self) -> RolloutGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the pool asks of the group ---------------------------------------------------
    def _build(self, index: int, options: dict[str, Any]) -> Any:
        """A new actor for worker `index`, at the current synced state."""
        actor = self._remote.options(**options).remote(self._snapshot_ref, version=self._version, **self._actor_args)
        if self._state_ref is not None:
            actor.sync.remote(self._state_ref, self._version)  # runs before any later call
        return actor

    def _around(self, call: ActorCall) -> tuple[list[tuple[str, tuple]], list[tuple[str, tuple]]]:
        """A call of an older step (one-step-ahead generation) on a replacement runs at that
        step's weights, then the actor returns to the current ones."""
        if call.pin is None or call.pin[1] == self._version:
            return [], []
        if call.pin[0] is None:
            raise RolloutWorkerError(
                f"rollout worker {call.worker} was lost while generating with the weights it was built with "
                f"(version {call.pin[1]}), which the group cannot send to a replacement: sync the workers once "
                f"(sync(state, version)) before the first generate_async"
            )
        current = ("sync", (self._state_ref, self._version)) if self._state_ref is not None else ("set_version", (self._version,))
        return [("sync", call.pin)], [current]

    def _on_every(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every worker, in worker order."""
        return self.pool.run([ActorCall(i, method, args) for i in range(self.num_workers)])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_local_resources(workers: int, cpus: float, gpus: float) -> None:
    """Fail now, not after the startup timeout, when a local Ray cannot hold the workers."""
    import ray

    have = ray.cluster_resources()
    for key, name, each in (("CPU", "cpus_per_worker", cpus), ("GPU", "gpus_per_worker", gpus)):
        if workers * each > have.get(key, 0) + 1e-9:
            raise ValueError(
                f"{workers} rollout workers x rollouts.{name}={each:g} need {workers * each:g} {key}s, but the local "
                f"Ray has {have.get(key, 0):g}: lower rollouts.num_workers or rollouts.{name}, or join a cluster (ray.address)"
            )


def _check_lora_matches(policy: Policy, lora: dict[str, Any]) -> None:
    """A LoRA policy's workers reuse its adapters: a different lora_config would be ignored, so refuse it."""
    config = policy.adapter_model().peft_config["default"]
    have = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout}
    wrong = {k: (lora[k], have[k]) for k in have if k in lora and lora[k] != have[k]}
    if wrong:
        raise ValueError(
            f"lora_config {lora} does not match the policy's LoRA ({have}): {wrong} (given, policy's); "
            f"pass the config the policy was built with, or None"
        )
