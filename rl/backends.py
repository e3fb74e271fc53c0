"""Training backends: how gradients become weight updates.

A trainer computes losses and calls a backend; the backend owns the optimiser, the
gradient clipping and the optimiser's state in checkpoints:

    backend.set_lr(lr)
    for micro_batch in minibatch:        # gradient accumulation
        backend.backward(loss / n_micro) # the caller scales each micro-batch's loss
    grad_norm = backend.step()           # clip, update, zero the gradients

- `torch`: plain `torch.optim.AdamW` on the module's trainable parameters. LoRA
  adapters and small models train here.
- `deepspeed`: a DeepSpeed engine with ZeRO stage 1, 2 or 3 for full weights
  (`vocalign.rl.deepspeed_backend`); on CPU it runs over gloo in one process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

OPTIMIZER_NAME = "optimizer.pt"


class Backend(Protocol):
    module: nn.Module  # the trained module; call its methods for forward passes

    def set_lr(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip the accumulated gradients, update, zero them; the grad norm before clipping."""
        ...

    def save(self, folder: Path) -> None:
        """Write the optimiser state into a checkpoint folder."""
        ...

    def load(self, folder: Path) -> None:
        """Read the optimiser state back from a checkpoint folder written by `save`."""
        ...

    def full_parameters(self) -> contextlib.AbstractContextManager:
        """Every weight materialised on this process (ZeRO-3 gathers them), for generation or saving."""
        ...

    def close(self) -> None:
        """Release what the backend holds beyond the module (engines, process-wide patches)."""
        ...


class TorchBackend:
    """AdamW on the trainable parameters of `module`."""

    def __init__(self, module: nn.Module, lr: float, grad_clip: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.module, self.grad_clip = module, grad_clip
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, folder: Path) -> None:
        torch.save(self.optimizer.state_dict(), Path(folder) / OPTIMIZER_NAME)

    def load(self, folder: Path) -> None:
        path = Path(folder) / OPTIMIZER_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no optimiser state to resume from")
        self.optimizer.load_state_dict(torch.load(path, weights_only=True))

    def full_parameters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def make_backend(kind: str, module: nn.Module, lr: float, grad_clip: float, options: dict[str, Any] | None = None) -> Backend:
    """The backend named `kind` ("torch" or "deepspeed") over `module`'s trainable parameters."""
    if kind == "torch":
        return TorchBackend(module, lr, grad_clip)
    if kind == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(module, lr, grad_clip, **(options or {}))
    raise ValueError(f"training backend {kind!r} is not known; use torch or deepspeed")
