"""Supervised warm start: teacher-forced cross-entropy on reference responses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vocalign.data.types import Prompt
from vocalign.model.policy import Policy

from .algorithms import masked_mean
from .allocator import keep_freed_memory


def target_ids(policy: Policy, prompt: Prompt) -> list[int]:
    """The ids of a prompt's reference answer, its speech rendered to audio units."""
    if prompt.target is None:
        raise ValueError(f"prompt {prompt.id!r} has no reference response; SFT needs a `response` for every row")
    units: list[int] = []
    if prompt.target.speech is not None:
        if policy.detokenizer is None:
            raise ValueError(f"prompt {prompt.id!r} has speech in its target but the policy has no speech detokenizer")
        units = policy.detokenizer.encode(prompt.target.speech, prompt.target.style)
    return policy.tokenizer.render_response(prompt.target, units)


class SFTTrainer:
    """One optimiser step per call on a random batch of prompts with targets."""

    def __init__(self, policy: Policy, prompts: list[Prompt], batch_size: int, lr: float, warmup_steps: int,
                 grad_clip: float, seed: int) -> None:
        if not prompts:
            raise ValueError("SFT has no prompts; set data.sft_tasks or data.sft_file, or sft.steps=0")
        self.policy, self.prompts, self.batch_size = policy, prompts, batch_size
        keep_freed_memory()  # see rl/allocator.py
        self.targets = [target_ids(policy, p) for p in prompts]
        self.lr, self.warmup, self.grad_clip = lr, warmup_steps, grad_clip
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=lr, weight_decay=0.0)
        self.rng = np.random.default_rng(seed)

    def step(self, step: int) -> dict[str, float]:
        idx = self.rng.integers(0, len(self.prompts), self.batch_size)
        prompts = [self.prompts[i] for i in idx]
        self.policy.model.train()
        batch = self.policy.encode_prompts(prompts, train_encoder=True)
        seq = self.policy.sequences(batch.ids, [self.targets[i] for i in idx], batch.encoded)
        loss = -masked_mean(self.policy.logprobs(seq), seq.response_mask)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (step + 1) / max(1, self.warmup))
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.grad_clip)
        self.optimizer.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": self.optimizer.param_groups[0]["lr"]}

    # -- checkpoint state: the optimiser and where the batch sampler is ------------------
    def save(self, folder: Path) -> None:
        torch.save(self.optimizer.state_dict(), Path(folder) / "optimizer.pt")
        (Path(folder) / "sft_sampler.json").write_text(json.dumps(self.rng.bit_generator.state))

    def load(self, folder: Path) -> None:
        self.optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True))
        self.rng.bit_generator.state = json.loads((Path(folder) / "sft_sampler.json").read_text())
