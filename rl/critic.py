"""PPO's critic: a value model of the policy's own architecture with a scalar head.

It starts as a copy of the policy (after the warm start, before any adapter), so it
reads prompts and responses as the policy does, and replaces the LM head with one
linear layer to a value per position. Under LoRA it trains its own adapter and the
head; with full weights it trains every decoder weight. The audio encoder is frozen.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vocalign.model.policy import Policy, SequenceBatch

CRITIC_NAME = "critic.safetensors"


class ValueModel(nn.Module):
    def __init__(self, policy: Policy, lora: dict | None = None) -> None:
        super().__init__()
        if policy.lora:
            raise ValueError("build the critic from the policy before its LoRA adapters are attached")
        self.body = copy.deepcopy(policy.model)
        # a Policy view on the body (of the policy's own class), to reuse its sequence packing,
        # hidden-state slicing and LoRA, running its forward as the policy's runs
        view = policy.with_model(self.body)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.lora = lora is not None
        if lora:
            view.enable_lora(**lora)
        else:
            view.train_language_model()
        self.head = nn.Linear(view.hidden_size, 1, device=policy.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.__dict__["_view"] = view

    def freeze_encoder(self) -> None:
        self._view.freeze_encoder()

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """The value of each response position (before its token is chosen): [B, R], 0 on padding."""
        hidden = self._view.response_hidden_states(batch)
        return self.head(hidden.float()).squeeze(-1) * batch.response_mask

    # -- trainable state, as the checkpoint saves it --------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps: the adapter and head under LoRA, else every weight
        (the frozen parts of a full-weight critic are copies of a policy that moves on)."""
        return {n: p.detach().clone().contiguous() for n, p in self.named_parameters() if p.requires_grad or not self.lora}

    def save(self, folder: Path) -> None:
        save_file(self.trainable_state(), str(Path(folder) / CRITIC_NAME))

    def load(self, folder: Path) -> None:
        path = Path(folder) / CRITIC_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint has no critic (was it saved by a GRPO run?)")
        state = load_file(str(path))
        missing = [n for n in self.trainable_state() if n not in state]
        if missing:
            raise ValueError(f"{path} lacks critic weights {missing[:3]}; it was saved with another critic setup")
        self.load_trainable_state(state)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (names of `trainable_state`) into the critic's weights, on their device."""
        with torch.no_grad():
            params = dict(self.named_parameters())
            for name, value in state.items():
                params[name].copy_(value)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token, 0.5 * max((v - R)^2, (v_clipped - R)^2), and where the clip won.

    `v_clipped` keeps each value within `clip` of its rollout-time estimate (no clipping when 0).
    """
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * unclipped * mask, torch.zeros_like(mask, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped) * mask, (clipped > unclipped) & mask.bool()
