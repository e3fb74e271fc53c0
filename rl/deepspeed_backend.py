"""The DeepSpeed training backend: full weights through ZeRO stage 1, 2 or 3.

`DeepSpeedBackend` gives a trainer the same five calls as `TorchBackend` (see
`vocalign.rl.backends`), over a DeepSpeed engine:

- the optimiser is `torch.optim.AdamW` handed to DeepSpeed as its client optimiser, so
  an update is `TorchBackend`'s (ZeRO only changes where the fp32 weights, gradients
  and Adam moments live): bitwise on stages 1 and 2 when nothing is clipped; the
  clipping norm (DeepSpeed sums it in fp64) and ZeRO-3's hooks change last bits, see
  tests/test_deepspeed.py for the measured differences. With `offload_optimizer` in the config,
  DeepSpeed's own "AdamW" (its CPU Adam) is used instead, since ZeRO-Offload needs it;
- the trainer owns micro-batching: DeepSpeed runs with `managed_gradient_accumulation:
  false`, so every `backward` accumulates and `step` is the accumulation boundary,
  however many micro-batches came before it;
- the trainer calls the module's own methods (`input_embeddings`, `decode`, ...) rather
  than `engine(...)`. What `engine.forward` would do around a forward is done in
  `backward` instead (see `_start_micro_batch`). Under ZeRO-3 the weights are gathered
  per submodule by the hooks DeepSpeed puts on every submodule, so this works for any
  method that reaches its weights through submodule calls; code that reads a weight
  tensor directly (the audio encoder's position table) must run in `full_parameters()`.

Beyond DeepSpeed's public calls this leans on five of its internals, each named where it
is used: the optimiser's `clear_backward_seen_flag` and the engine's `_backward_prologue`
(what `engine.forward` runs), `deepspeed.runtime.zero.stage3.unwrap_model_for_generation`
(ZeRO-3 gathering for generation), `deepspeed.ops.__compatible_ops__` (to skip an op
build one process does not need) and the engine's `_config.load_universal_checkpoint`
(to load a checkpoint written by another number of ranks). tests/test_deepspeed.py fails if the first or the third
stops doing its job.

On a machine without GPUs DeepSpeed selects its CPU accelerator; the backend then runs
as one process over gloo, setting the single-process rendezvous variables itself. Under
a launcher (`deepspeed`, `torchrun`) those variables are already set and are left alone.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vocalign.common.ray_cluster import free_port

# The DeepSpeed checkpoint (optimiser partitions, fp32 master weights, engine counters)
# goes into this subfolder of the caller's checkpoint folder, under a fixed tag.
CHECKPOINT_SUBFOLDER = "deepspeed"
CHECKPOINT_TAG = "state"

# Keys the backend sets from its own arguments; a `config` must not set them too.
_OWNED_KEYS = {
    "optimizer": "the backend builds AdamW from rl.lr; remove `optimizer` from the DeepSpeed config",
    "scheduler": "the trainer sets the learning rate every step (rl.lr, rl.warmup_steps, rl.lr_decay); remove `scheduler`",
    "gradient_clipping": "the backend clips to rl.grad_clip; set that instead of `gradient_clipping`",
    "gradient_accumulation_steps": "the trainer accumulates micro-batches itself (rl.grad_accum); remove it",
    "train_batch_size": "the trainer forms its own batches; remove it",
    "train_micro_batch_size_per_gpu": "the trainer forms its own batches; remove it",
    "managed_gradient_accumulation": "the backend needs it false (the trainer calls step() at its own boundary); remove it",
}


def ensure_distributed() -> None:
    """Initialise DeepSpeed's communication, as one process when no launcher set it up.

    A launcher (`deepspeed`, `torchrun`) sets RANK and WORLD_SIZE for every process; then
    nothing is overridden. Without them this is a single process: rank 0 of 1, with a free
    local port for the rendezvous. The CPU accelerator talks over gloo.
    """
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("LOCAL_RANK", "0")
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    compatible_ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if on_cpu and isinstance(compatible_ops, dict):
        # DeepSpeed's CPU communication compiles a shared-memory all-reduce op when it
        # starts (45-110 s measured on 2 busy cores); one process never reduces with it, and
        # several (vocalign's trainer ranks) reduce over gloo without it
        compatible_ops["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else accelerator.communication_backend_name())


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `extra`, nested mappings merged key by key (into plain dicts)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping):
            out[key] = _merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(zero_stage: int, grad_clip: float, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config: the backend's own keys, then `config` merged in.

    `config` may add anything DeepSpeed reads (bf16, offload, bucket sizes, ...) but not
    the keys the backend derives from its arguments (`_OWNED_KEYS`, the ZeRO stage).
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed zero_stage must be 1, 2 or 3 (got {zero_stage!r}); set rl.deepspeed.zero_stage")
    config = dict(config or {})
    owned = sorted(k for k in config if k in _OWNED_KEYS)
    if owned:
        raise ValueError("rl.deepspeed.config sets " + "; ".join(f"{k!r}: {_OWNED_KEYS[k]}" for k in owned))
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        raise ValueError(f"rl.deepspeed.config.zero_optimization must be a mapping (got {type(zero).__name__})")
    if "stage" in zero and zero["stage"] != zero_stage:
        raise ValueError(
            f"rl.deepspeed.config.zero_optimization.stage is {zero['stage']!r} but rl.deepspeed.zero_stage is "
            f"{zero_stage}; set the stage once, in rl.deepspeed.zero_stage"
        )
    base = {
        # DeepSpeed wants a batch size; with unmanaged accumulation it is only bookkeeping
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 2**31 - 1,  # the trainer logs its own metrics
    }
    return _merge(base, config)


def saved_ranks(checkpoint: Path) -> int:
    """How many data-parallel ranks wrote DeepSpeed checkpoint `checkpoint` (one optimiser partition each)."""
    return len(list(Path(checkpoint).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


UNIVERSAL_TAG = "universal"


def universal_checkpoint(root: Path, saved: int) -> str:
    """The tag of `root`'s checkpoint converted to DeepSpeed's universal layout, converting it
    on rank 0 the first time (the other ranks wait at a barrier); the conversion is written to a
    temporary folder and renamed, so a kill mid-way leaves the checkpoint as it was."""
    import shutil
    import sys
    from argparse import Namespace

    target = Path(root) / UNIVERSAL_TAG
    if torch.distributed.get_rank() == 0 and not target.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = Path(root) / f".tmp-{UNIVERSAL_TAG}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting the DeepSpeed checkpoint of {saved} ranks in {Path(root) / CHECKPOINT_TAG} to a universal "
              f"checkpoint for {torch.distributed.get_world_size()}", file=sys.stderr)
        args = Namespace(input_folder=str(Path(root) / CHECKPOINT_TAG), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):  # its progress report, off the run's console output
            ds_to_universal.main(args)
        os.replace(tmp, target)
    torch.distributed.barrier()
    return UNIVERSAL_TAG


def _offloads_optimizer(config: dict[str, Any]) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


class DeepSpeedBackend:
    """AdamW on the trainable parameters of `module` through a DeepSpeed ZeRO engine.

    `module` stays the trained module: the trainer keeps calling its methods, and under
    ZeRO-3 its weights are partitioned in place (use `full_parameters()` to read them).
    """

    # ZeRO-3 replaces torch.nn.functional.linear, process-wide and for good, by a version
    # that does not keep gathered weights alive until the backward. The ZeRO-3 backends
    # open are counted; when the last one closes, the original comes back.
    _linear_swap_holders = 0
    _original_linear = None

    def __init__(self, module: nn.Module, lr: float, grad_clip: float, zero_stage: int = 2,
                 config: Mapping[str, Any] | None = None, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, sum_ranks: bool = False,
                 **unknown: Any) -> None:
        if unknown:
            raise ValueError(
                f"unknown DeepSpeed backend option(s) {sorted(unknown)}; the options are zero_stage and config "
                "(rl.deepspeed.zero_stage, rl.deepspeed.config)"
            )
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        ds_config = deepspeed_config(zero_stage, grad_clip, config)
        # the gradient's size, read before ZeRO-3 partitions the weights (each rank then holds a slice)
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in params)
        ensure_distributed()
        linear_before = torch.nn.functional.linear
        if _offloads_optimizer(ds_config):
            # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam, in AdamW mode
            ds_config["optimizer"] = {
                "type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
            }
            engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.engine = engine
        self.module = module
        self.zero_stage = zero_stage
        self._note_linear_swap(linear_before)
        self.config = ds_config
        self._gathered = 0  # depth of nested full_parameters()
        # DeepSpeed averages the data-parallel ranks' gradients; scaling each loss by their number
        # makes that the sum (vocalign's trainer ranks, rl/trainer_group.py)
        self.loss_scale = float(torch.distributed.get_world_size()) if sum_ranks else 1.0

    # -- the Backend interface -----------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (already scaled by the caller)."""
        if self._gathered:
            raise RuntimeError("backward() inside full_parameters(): ZeRO-3's gradient hooks are off there; leave the block first")
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        self._start_micro_batch(loss)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Clip, update and zero the gradients; the gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(
                "DeepSpeed computed no gradient norm; remove zero_optimization.compute_grad_norm=false from rl.deepspeed.config"
            )
        return float(norm)

    def save(self, folder: Path) -> None:
        """Write DeepSpeed's checkpoint into `folder`/deepspeed: each rank's optimiser partition
        (fp32 master weights, Adam moments) and DeepSpeed's copy of the weights.

        Every rank must call it, with the same folder. It may run inside `full_parameters()`.
        """
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # what DeepSpeed's universal-checkpoint converter asks of a checkpoint (see `load`)
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.engine.save_checkpoint(str(Path(folder) / CHECKPOINT_SUBFOLDER), tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state=info)

    def load(self, folder: Path) -> None:
        """Restore the optimiser state from `save`'s files; the weights become those DeepSpeed
        saved (the same as the caller's saved weights, written at the same moment).

        Call it on a fresh backend, before any step: ZeRO-3 loads into a pristine engine only.

        A checkpoint written by another number of ranks (`rl.trainers` changed on resume) holds
        one optimiser partition per rank that wrote it. It is converted once, by rank 0, into
        DeepSpeed's universal checkpoint (one file per parameter and state, whatever the
        partitioning; `deepspeed.checkpoint.ds_to_universal`), written beside it as
        `deepspeed/universal`, and every rank loads its own partition from that.
        """
        root = Path(folder) / CHECKPOINT_SUBFOLDER
        if not (root / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(
                f"{root / CHECKPOINT_TAG} is missing: the checkpoint has no DeepSpeed state to resume from "
                "(was it written with rl.backend=deepspeed?)"
            )
        saved, world = saved_ranks(root / CHECKPOINT_TAG), torch.distributed.get_world_size()
        tag = CHECKPOINT_TAG if saved == world else universal_checkpoint(root, saved)
        # the engine reads its `checkpoint.load_universal` setting when it loads: on for this load only
        self.engine._config.load_universal_checkpoint = tag != CHECKPOINT_TAG
        try:
            path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {root / tag}")

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Every weight materialised on this process, read-only, for generation or saving.

        Stages 1 and 2 keep whole weights on every process: nothing to do. Under ZeRO-3 the
        weights are gathered once and the per-submodule gather hooks are taken off for the
        block (DeepSpeed's `unwrap_model_for_generation`), so generating token by token does
        not all-gather every layer at every token. Changes made to weights inside are lost;
        no backward inside. Every rank must enter it (the gather is collective). Re-entrant.
        """
        if self.zero_stage != 3 or self._gathered:
            self._gathered += 1
            try:
                yield
            finally:
                self._gathered -= 1
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        unwrapped = unwrap_model_for_generation(self.engine)
        unwrapped.__enter__()
        self._gathered += 1
        try:
            yield
        finally:
            self._gathered -= 1
            # exit as if the block succeeded, so the hooks always go back on (an exception
            # passed in would stop DeepSpeed's generator before it re-registers them)
            unwrapped.__exit__(None, None, None)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the engine (hooks, buffers) and undo ZeRO-3's process-wide `F.linear` swap.

        The module is not usable for training afterwards; under ZeRO-3 its weights stay
        partitioned. The process group stays up for the next engine.
        """
        if self.engine is None:
            return
        self.engine.destroy()
        self.engine = None
        if self._holds_linear_swap:
            self._holds_linear_swap = False
            DeepSpeedBackend._linear_swap_holders -= 1
            if DeepSpeedBackend._linear_swap_holders == 0 and DeepSpeedBackend._original_linear is not None:
                torch.nn.functional.linear = DeepSpeedBackend._original_linear

    def _note_linear_swap(self, before) -> None:
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        self._holds_linear_swap = self.zero_stage == 3 and torch.nn.functional.linear is zero3_linear_wrap
        if not self._holds_linear_swap:
            return  # stages 1 and 2, or zero_optimization.memory_efficient_linear: false
        if DeepSpeedBackend._linear_swap_holders == 0:
            # None: swapped before this backend existed (a zero.Init elsewhere); leave it so
            DeepSpeedBackend._original_linear = None if before is zero3_linear_wrap else before
        DeepSpeedBackend._linear_swap_holders += 1

    # -- what engine.forward would have done -----------------------------------------------
    def _start_micro_batch(self, loss: torch.Tensor) -> None:
        """The bookkeeping `engine.forward` does for a micro-batch, for a forward made without it.

        DeepSpeed counts micro-batches when a forward starts (ZeRO-3 adds a micro-batch's
        gradients to the previous ones' only when it has counted a new micro-batch: without
        this, the second of two micro-batches replaces the first) and runs its backward
        prologue from a hook on the forward's output. The trainer's forward calls the
        module's methods, so both happen here, between the previous backward and this one.
        """
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
        from deepspeed.runtime.utils import register_output_backward_hooks

        if isinstance(self.engine.optimizer, ZeROOptimizer):
            self.engine.optimizer.clear_backward_seen_flag()
        register_output_backward_hooks(loss, preprocess_once_fn=self.engine._backward_prologue)
