"""SPMD launches: `torchrun` or DeepSpeed's launcher start N copies of `vocalign train`.

The processes split the work as `rl.trainers: N` ranks on Ray do, without Ray: rank 0
runs the run (the driver's loop, the run folder, metrics, W&B, checkpoints: only rank 0
writes), and ranks 1..N-1 serve it. Each process holds one `TrainerRank`; rank 0's
`SpmdGroup` sends every call to all of them through `torch.distributed` (the command is
broadcast, each rank runs its own share, the results are gathered back to rank 0), so
the calls, and the collectives inside them (gradient all-reduce, DeepSpeed's ZeRO
gathers, checkpoint barriers), happen in the same order on every rank.

    torchrun --nproc_per_node 8 -m vocalign.rl.cli train RECIPE
    deepspeed --num_gpus 8 --no_local_rank --module vocalign.rl.cli train RECIPE

`rl.trainers` is then the launcher's process count (leave it at 1, or set it to that
count). The commands travel over a gloo group of their own, with a long timeout: the
other ranks wait in it while rank 0 runs the SFT stage and evaluations alone.

A process that dies ends the launch (the launcher stops the others); continue with
`run.resume=true`. The trainer restarts of a Ray group (`rl.trainer_restarts`) do not
apply here.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Any

import torch

from vocalign.model.policy import Policy

from .config import KLConfig, LossConfig, RLConfig
from .critic import ValueModel
from .trainer_group import TrainerGroup, TrainerGroupError, TrainerRank, _snapshot
from vocalign.rollouts.sync import snapshot_policy

# how long ranks 1..N-1 wait for rank 0's next command (it may be running a long SFT stage)
COMMAND_TIMEOUT = datetime.timedelta(hours=24)
_BUILD, _STOP = "__build__", "__stop__"
_link: Link | None = None


def launched() -> tuple[int, int] | None:
    """(rank, world size) when a launcher started this process as one of several; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    return None


def link() -> Link | None:
    """This process's command link, once `start` made it (rank 0's runner asks for it)."""
    return _link


def start() -> Link:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU) and open the command link."""
    global _link
    import torch.distributed as dist

    if _link is None:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _link = Link(dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT))
    return _link


class Link:
    """Rank 0's calls to every rank: broadcast the call, each rank runs its own, gather the results."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self.group, self.rank, self.world = group, dist.get_rank(), dist.get_world_size()
        self.local: TrainerRank | None = None  # this process's rank
        self.stopped = False

    def call(self, method: str, args: list[tuple | None]) -> list[tuple[bool, Any]]:
        """On rank 0: `method(*args[r])` on every rank r (None: nothing on that rank); per rank,
        (True, result) or (False, the error it raised)."""
        import torch.distributed as dist

        dist.broadcast_object_list([(method, args)], src=0, group=self.group)
        out: list[Any] = [None] * self.world
        dist.gather_object(self._run(method, args[0]), out, dst=0, group=self.group)
        return out

    def follow(self) -> None:
        """On ranks 1..N-1: run rank 0's calls until it stops."""
        import torch.distributed as dist

        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0, group=self.group)
            method, args = message[0]
            if method == _STOP:
                break
            dist.gather_object(self._run(method, args[self.rank]), None, dst=0, group=self.group)
        self.stopped = True
        dist.destroy_process_group()

    def stop(self) -> None:
        """On rank 0: release the other ranks (they return from `follow`). Once; idempotent."""
        import torch.distributed as dist

        if not self.stopped:
            self.stopped = True
            dist.broadcast_object_list([(_STOP, None)], src=0, group=self.group)
            dist.destroy_process_group()

    def _run(self, method: str, args: tuple | None) -> tuple[bool, Any]:
        if args is None:
            return True, None
        try:
            if method == _BUILD:
                self.local = TrainerRank(*args)
                return True, None
            return True, getattr(self.local, method)(*args)
        except Exception as error:  # reported on rank 0, which stops the run
            print(f"rank {self.rank}: {method} failed", file=sys.stderr)
            return False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"


class SpmdGroup(TrainerGroup):
    """The launcher's processes as a `TrainerGroup`: rank 0 (this process, which also runs the
    driver) and the others, each a `TrainerRank` built from a snapshot of the driver's policy."""

    def __init__(self, link: Link, policy: Policy, config: RLConfig, loss: LossConfig, kl: KLConfig, seed: int,
                 torch_threads: int = 1, critic: ValueModel | None = None, rollouts: dict[str, Any] | None = None) -> None:
        self.link = link
        self._setup(policy, link.world, config, critic)
        snapshot = snapshot_policy(policy)
        critic_snapshot = _snapshot(critic) if critic is not None else None
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if policy.device.type == "cuda" else "cpu"
        args = [(snapshot, r, link.world, config, loss, kl, seed, torch_threads, critic_snapshot, rollouts, device)
                for r in range(link.world)]  # one pickled snapshot: the tuples share it
        self.ranks = list(range(link.world))
        self.gather(self.submit(_BUILD, args), "start of the trainer ranks")
        self.on_ranks("join", what="start of the trainer ranks")

    def submit(self, method: str, args: list[tuple | None]) -> list:
        return self.link.call(method, args)  # runs now, on every rank; `gather` reads the results

    def gather(self, calls: list, what: str) -> list:
        failed = [f"rank {r}: {value}" for r, (ok, value) in enumerate(calls) if not ok]
        if failed:
            raise TrainerGroupError(f"trainer rank(s) failed during the {what}:\n" + "\n".join(failed))
        return [value for ok, value in calls]

    def share(self, obj: Any) -> Any:
        return obj

    def close(self) -> None:
        """The ranks serve until the launch ends (`Link.stop`, called once the run is over)."""
        self.ranks = []
