"""Data-parallel training: `rl.trainers` ranks, each a Ray actor holding a policy replica and
its optimiser, gradients summed across ranks (gloo on CPU, NCCL on GPUs) before every
optimiser step.

The driver keeps one readable loop (`RLTrainer.step`): it collects the rollouts, computes
the advantages over the whole batch, and hands the batch to `TrainerGroup.train_on`. Each
rank takes its contiguous share of every minibatch (`PolicyUpdate`), divides its loss by
the whole minibatch's count, and sums its gradients with the other ranks'
(`AllReduceBackend`): every rank then takes the same optimiser step, the one a single
process would take on the whole minibatch. Rank 0's new trainable state comes back to the
driver's policy (which computes the reference pass, evaluates and is checkpointed) and
is synced to the rollout workers if there are any; every rank's checksum is compared with
it. Without rollout workers the ranks generate the rollouts themselves, each its share of
the prompts (`generate_shard`, driven by `RankRollouts` in rl/colocated.py).

What runs here: the torch backend (LoRA adapters or full weights) and DeepSpeed ZeRO 1,
2 and 3 (each rank one part of an engine over the N ranks), the GRPO family and PPO,
whose critic is data-parallel the same way (each rank holds a replica; the driver's
critic, which computes the values, takes rank 0's after each update).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from vocalign.common.ray_cluster import ensure_ray, free_port
from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling
from vocalign.rollouts.sync import restore_policy, snapshot_policy, state_checksum
from vocalign.rollouts.worker import RolloutWorker

from .backends import TorchBackend
from .deepspeed_backend import DeepSpeedBackend
from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel
from .update import PolicyUpdate, StepBatch, combine_ranks


class TrainerGroupError(RuntimeError):
    """A trainer rank died or failed: the group cannot take the step (`run.resume=true` continues the run)."""


class AllReduceBackend(TorchBackend):
    """`TorchBackend` whose gradients are summed across the process group before each step
    (what DDP does, on the trainable parameters in one flat buffer): the policy's forward
    goes through `Policy` methods rather than one `nn.Module.forward`, so DDP's hooks
    would not see it."""

    def __init__(self, module: torch.nn.Module, lr: float, grad_clip: float) -> None:
        super().__init__(module, lr, grad_clip)
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in self.params)  # reduced per step
        self.reduce_seconds = 0.0

    def step(self) -> float:
        import torch.distributed as dist

        t0 = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # a rank with no rows in this minibatch contributes zeros
        offset = 0
        for p, g in zip(self.params, grads):  # views into the reduced buffer (the step sets grads to None after)
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        self.reduce_seconds += time.perf_counter() - t0
        return super().step()


class TrainerRank:
    """One data-parallel rank: a replica of the policy, its optimiser and its share of each update."""

    def __init__(self, snapshot: bytes, rank: int, world: int, config: RLConfig, loss: LossConfig, kl: KLConfig,
                 seed: int, torch_threads: int = 1, critic: bytes | None = None,
                 rollouts: dict[str, Any] | None = None, device: str = "cpu") -> None:
        torch.set_num_threads(torch_threads)
        self.rank, self.world = rank, world
        self.policy = restore_policy(snapshot, device)
        # colocated generation (rl/colocated.py): a rollout worker on this rank's own replica
        self.rollouts = RolloutWorker(self.policy, **(rollouts or {}))
        self.critic = torch.load(io.BytesIO(critic), map_location=self.policy.device, weights_only=False) if critic else None
        self.config, self.loss, self.kl, self.seed = config, loss, kl, seed
        if config.backend == "deepspeed" and config.deepspeed.zero_stage == 3:
            # ZeRO-3 gathers each layer's weights as it runs, collectively: every rank must run the
            # same layers in the same order, whatever its rows. A prompt shared by a rank's rows
            # would take the two-pass forward on one rank and the one-pass forward on another.
            self.policy.shared_prompt_forward = False
            if self.critic is not None:
                self.critic._view.shared_prompt_forward = False

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the others: this node's address and a free port."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def join(self, host: str | None = None, port: int | None = None) -> None:
        """Join the process group at `host`:`port` (returns once every rank has joined), then build
        the optimiser. Without an address the process group exists already (an SPMD launch)."""
        import torch.distributed as dist

        if host is not None:
            backend = "nccl" if self.policy.device.type == "cuda" else "gloo"
            # DeepSpeed reads the rendezvous from the environment and reuses the group made here
            os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0", MASTER_ADDR=host,
                              MASTER_PORT=str(port))
            dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)
        self.backend = self._backend(self.policy.model, self.config.lr)
        critic_backend = self._backend(self.critic, self.config.critic.lr) if self.critic is not None else None
        self.update = PolicyUpdate(self.policy, self.backend, self.config, self.loss, self.kl, self.seed,
                                   self.critic, critic_backend, rank=self.rank, world=self.world)

    def _backend(self, module: torch.nn.Module, lr: float) -> AllReduceBackend | DeepSpeedBackend:
        if self.config.backend == "deepspeed":
            ds = self.config.deepspeed
            # DeepSpeed averages the ranks' gradients: `sum_ranks` makes it the sum the torch backend takes
            return DeepSpeedBackend(module, lr, self.config.grad_clip, zero_stage=ds.zero_stage, config=ds.config,
                                    sum_ranks=True)
        return AllReduceBackend(module, lr, self.config.grad_clip)

    def train_on(self, batch: StepBatch, step: int, kl_coef: float) -> tuple[float, list[dict[str, float]], dict[str, float]]:
        """(learning rate, this rank's share of each optimiser step's statistics, its gradient all-reduce
        bytes and seconds; DeepSpeed's reduction is inside its step, so its seconds are not counted)."""
        backends = [b for b in (self.backend, self.update.critic_backend) if b is not None]
        timed = [b for b in backends if isinstance(b, AllReduceBackend)]
        for backend in timed:
            backend.reduce_seconds = 0.0
        batch = on_device(batch, self.policy.device)
        lr = self.update.set_learning_rates(step)
        steps = self.update.optimiser_steps(batch, step, kl_coef)
        return lr, steps, {"bytes": float(len(steps) * sum(b.gradient_bytes for b in backends)),
                           "seconds": sum(b.reduce_seconds for b in timed)}

    def generate_shard(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int, version: int) -> list[Rollout]:
        """This rank's share of a step's rollouts, stamped `version`, their prompts left out (the
        driver puts them back). Under ZeRO-3 the weights are gathered once for it, collectively."""
        self.rollouts.version = version
        with self.update.full_parameters():
            rollouts = self.rollouts.generate(prompts, n, sampling, seed) if prompts else []
        for r in rollouts:
            r.prompt = None  # type: ignore[assignment]
        return rollouts

    def node(self) -> str:
        """The Ray node this rank runs on (the host name outside Ray)."""
        import socket

        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()

    def weights(self, send: bool) -> tuple[str, str, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """(checksum of the policy's and the critic's trainable state, checksum of the policy's
        alone, and, with `send`, the two states on the CPU). Every rank must call it: under ZeRO-3
        reading the weights is collective."""
        with self.update.full_parameters(), contextlib.ExitStack() as stack:
            if self.update.critic_backend is not None:
                stack.enter_context(self.update.critic_backend.full_parameters())
            policy = {k: v.detach().cpu() for k, v in self.policy.trainable_state().items()}
            critic = {k: v.cpu() for k, v in self.critic.trainable_state().items()} if self.critic is not None else None
        both = {**policy, **{f"critic.{k}": v for k, v in (critic or {}).items()}}
        return state_checksum(both), state_checksum(policy), (policy if send else None), (critic if send else None)

    def save(self, folder: str) -> None:
        self.update.save(Path(folder))

    def load(self, folder: str) -> None:
        self.update.load(Path(folder))

    def rows_seen(self, batch_size: int, step: int) -> list[list[int]]:
        """The rows of a batch of `batch_size` this rank trains on at `step`, per optimiser step."""
        return [self.update.share(rows) for rows in self.update.minibatches(batch_size, step)]


class TrainerGroup:
    """`world` `TrainerRank` actors on Ray; an `Updater` for `RLTrainer`.

    `policy` is the driver's policy, at the weights training starts from, its LoRA adapters
    attached and its encoder frozen; each rank starts from a snapshot of it, and after each
    update the driver's policy takes rank 0's trainable state. `rollouts` holds the options
    of each rank's `RolloutWorker` (render_speech, tools, max_turns, tool_options) for
    colocated generation (`RankRollouts`, rl/colocated.py).
    """

    def __init__(self, policy: Policy, world: int, config: RLConfig, loss: LossConfig, kl: KLConfig, seed: int,
                 cpus_per_trainer: float = 1.0, torch_threads: int = 1, address: str | None = None,
                 critic: ValueModel | None = None, rollouts: dict[str, Any] | None = None,
                 gpus_per_trainer: float = 0.0) -> None:
        import ray

        if world < 1:
            raise ValueError(f"rl.trainers={world} must be at least 1")
        ensure_ray(address=address)
        _check_free(world, cpus_per_trainer, gpus_per_trainer, local=address is None and not os.environ.get("RAY_ADDRESS"))
        self._setup(policy, world, config, critic)
        snapshot = ray.put(snapshot_policy(policy))
        critic_snapshot = ray.put(_snapshot(critic)) if critic is not None else None
        remote = ray.remote(TrainerRank).options(num_cpus=cpus_per_trainer, num_gpus=gpus_per_trainer, max_restarts=0)
        device = "cuda" if gpus_per_trainer > 0 else "cpu"  # Ray shows each rank its own GPU(s)
        self.ranks = [remote.remote(snapshot, r, world, config, loss, kl, seed, torch_threads, critic_snapshot, rollouts,
                                    device) for r in range(world)]
        try:
            host, port = ray.get(self.ranks[0].address.remote())
            ray.get([rank.join.remote(host, port) for rank in self.ranks])
        except BaseException:
            self.close()
            raise

    def _setup(self, policy: Policy, world: int, config: RLConfig, critic: ValueModel | None) -> None:
        self.policy, self.critic, self.world = policy, critic, world
        self.collective_save = config.backend == "deepspeed"
        self.last_comm: dict[str, float] = {}
        self._policy_checksums: list[str] | None = None

    # -- calls on the ranks (Ray actor calls here; rl/spmd.py overrides the two) -----------
    def submit(self, method: str, args: list[tuple | None]) -> list:
        """Start `method(*args[r])` on each rank r whose `args[r]` is not None; `gather` the results."""
        return [getattr(rank, method).remote(*a) for rank, a in zip(self.ranks, args) if a is not None]

    def gather(self, calls: list, what: str) -> list:
        """The results of `submit`'s calls, or a `TrainerGroupError` naming the rank that died or raised."""
        import ray

        try:
            return ray.get(calls)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
            dead = [r for r, ref in enumerate(calls) if not _finished_well(ref)]
            raise TrainerGroupError(
                f"trainer rank(s) {dead or '?'} died during the {what} ({type(error).__name__}); the group cannot go on "
                f"without them. Continue the run from its last checkpoint with run.resume=true (any rl.trainers); look "
                f"in the Ray logs for why the process ended (out of memory, a kill)"
            ) from error
        except ray.exceptions.RayTaskError as error:
            raise TrainerGroupError(f"a trainer rank raised during the {what}: {error}") from error

    def on_ranks(self, method: str, *args: Any, what: str) -> list:
        """`method(*args)` on every rank, its results in rank order."""
        return self.gather(self.submit(method, [args] * self.world), what)

    def share(self, obj: Any) -> Any:
        """`obj` as the ranks receive it: put in Ray's object store once, for every rank."""
        import ray

        return ray.put(obj)

    # -- the Updater ---------------------------------------------------------------------
    def train_on(self, batch: StepBatch, step: int, kl_coef: float) -> tuple[float, dict[str, float]]:
        """Every rank's share of the update; then the driver's policy takes the new weights."""
        results = self.on_ranks("train_on", self.share(_for_ranks(batch)), step, kl_coef, what=f"update at step {step + 1}")
        stats = combine_ranks([steps for _, steps, _ in results])
        self.last_comm = {"bytes": sum(c["bytes"] for _, _, c in results) / self.world,
                          "seconds": max(c["seconds"] for _, _, c in results)}
        stats["trainers/allreduce_bytes"], stats["trainers/allreduce_s"] = self.last_comm["bytes"], self.last_comm["seconds"]
        self._take_weights()
        return results[0][0], stats

    def _take_weights(self) -> None:
        """Rank 0's trainable state into the driver's policy (and critic); every rank must hold the same."""
        held = self.gather(self.submit("weights", [(r == 0,) for r in range(self.world)]), "weight check")
        self._policy_checksums = [policy for _, policy, _, _ in held]
        _, _, state, critic = held[0]
        device = self.policy.device
        self.policy.load_trainable_state({k: v.to(device) for k, v in state.items()})
        if critic is not None:
            self.critic.load_trainable_state(critic)
        wrong = [r for r, (checksum, _, _, _) in enumerate(held) if checksum != held[0][0]]
        if wrong:
            raise TrainerGroupError(f"trainer ranks {wrong} hold other weights than rank 0 after the same update: their "
                                    f"gradients were not summed alike; the run cannot go on")

    def policy_checksums(self) -> list[str]:
        """Each rank's `state_checksum` of its policy's trainable state, as the last weight check
        read it (every update ends with one); read now before the first."""
        if self._policy_checksums is None:
            self._policy_checksums = [policy for _, policy, _, _ in self.on_ranks("weights", False, what="weight check")]
        return self._policy_checksums

    def full_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the driver's policy holds the whole weights

    def save(self, folder: Path) -> None:
        """The optimiser state: the same on every rank under the torch backend (rank 0 writes it);
        under DeepSpeed every rank writes its partition (into one folder)."""
        every = self.collective_save
        self.gather(self.submit("save", [(str(folder),) if every or r == 0 else None for r in range(self.world)]),
                    "checkpoint save")

    def load(self, folder: Path) -> None:
        """Every rank loads the saved optimiser state (whatever the number of ranks that saved it:
        under DeepSpeed through its universal checkpoint) and the critic's weights; the driver
        takes rank 0's weights."""
        self.on_ranks("load", str(folder), what="checkpoint load")
        self._take_weights()

    def nodes(self) -> list[str]:
        """The node of each rank (Ray's node id; the host name in an SPMD launch)."""
        return self.on_ranks("node", what="node query")

    def rows_seen(self, batch_size: int, step: int) -> list[list[list[int]]]:
        """Per rank, the batch rows it trains on at `step` in each optimiser step."""
        return self.on_ranks("rows_seen", batch_size, step, what="row query")

    def close(self) -> None:
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []


def _check_free(world: int, cpus: float, gpus: float, local: bool) -> None:
    """Fail now, with the counts, when a local Ray cannot hold `world` ranks (a cluster may grow)."""
    import ray

    free = ray.available_resources()
    for key, each, knob in (("CPU", cpus, "lower rl.trainers or rollouts.num_workers"), ("GPU", gpus, "lower rl.trainers")):
        if local and each > 0 and world * each > free.get(key, 0.0) + 1e-9:
            raise ValueError(
                f"rl.trainers={world} trainer processes need {world * each:g} {key}s, but the local Ray has "
                f"{free.get(key, 0.0):g} free (rollout workers take theirs first): {knob}, or join a cluster (ray.address)"
            )


def _snapshot(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def _finished_well(ref) -> bool:
    import ray

    try:
        ray.get(ref, timeout=0)
        return True
    except Exception:
        return False


def _for_ranks(batch: StepBatch) -> StepBatch:
    """The batch without what the update does not read (waveforms, prompt audio), on the CPU."""
    from dataclasses import replace

    from vocalign.data.types import Prompt

    light = [replace(r, waveform=None, prompt=Prompt(id=r.prompt.id, messages=[], task=r.prompt.task))
             for r in batch.rollouts]
    return on_device(replace(batch, rollouts=light), torch.device("cpu"))


def on_device(batch: StepBatch, device: torch.device) -> StepBatch:
    """`batch` with its tensors (and the prompts' encoded audio) on `device`."""
    from dataclasses import replace

    moved = {k: v.to(device) for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
    encoded = {k: [t.to(device) for t in clips] for k, clips in batch.encoded.items()}
    return replace(batch, encoded=encoded, **moved)
