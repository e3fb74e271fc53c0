"""Supervised warm start: teacher-forced cross-entropy on reference responses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vocalign.data.types import Prompt
from vocalign.model.policy import Policy

from .algorithms import masked_mean, scheduled_lr
from .allocator import keep_freed_memory
from .backends import TorchBackend


def target_ids(policy: Policy, prompt: Prompt) -> list[int]:
    """The ids of a prompt's reference answer, its speech rendered to audio units."""
    if prompt.target is None:
        raise ValueError(f"prompt {prompt.id!r} has no reference response; SFT needs a `response` for every row")
    units: list[int] = []
    if prompt.target.codes is not None:  # the speech as the model's own audio codes
        n = policy.tokenizer.n_audio
        bad = [c for c in prompt.target.codes if not 0 <= c < n]
        if bad:
            raise ValueError(f"prompt {prompt.id!r}: response.codes has {bad[:5]}, outside the model's {n} audio codes")
        units = list(prompt.target.codes)
    elif prompt.target.speech is not None:
        if policy.detokenizer is None:
            raise ValueError(f"prompt {prompt.id!r} has speech in its target but the policy has no speech detokenizer")
        units = policy.detokenizer.encode(prompt.target.speech, prompt.target.style)
    return policy.tokenizer.render_response(prompt.target, units)


class SFTTrainer:
    """One optimiser step per call on a random batch of prompts with targets (AdamW through `TorchBackend`)."""

    def __init__(self, policy: Policy, prompts: list[Prompt], batch_size: int, lr: float, warmup_steps: int,
                 grad_clip: float, seed: int) -> None:
        if not prompts:
            raise ValueError("SFT has no prompts; set data.sft_tasks or data.sft_file, or sft.steps=0")
        self.policy, self.prompts, self.batch_size = policy, prompts, batch_size
        keep_freed_memory()  # see rl/allocator.py
        self.targets = [target_ids(policy, p) for p in prompts]
        self.lr, self.warmup = lr, warmup_steps
        self.backend = TorchBackend(policy.model, lr, grad_clip)
        self.rng = np.random.default_rng(seed)

    def step(self, step: int) -> dict[str, float]:
        idx = self.rng.integers(0, len(self.prompts), self.batch_size)
        prompts = [self.prompts[i] for i in idx]
        self.policy.model.train()
        batch = self.policy.encode_prompts(prompts, train_encoder=True)
        seq = self.policy.sequences(batch.ids, [self.targets[i] for i in idx], batch.encoded)
        loss = -masked_mean(self.policy.logprobs(seq), seq.response_mask)
        lr = scheduled_lr(self.lr, self.warmup, "constant", 0, step)
        self.backend.set_lr(lr)
        self.backend.backward(loss)
        grad_norm = self.backend.step()
        return {"loss": loss.item(), "grad_norm": grad_norm, "lr": lr}

    # -- checkpoint state: the optimiser and where the batch sampler is ------------------
    def save(self, folder: Path) -> None:
        self.backend.save(folder)
        (Path(folder) / "sft_sampler.json").write_text(json.dumps(self.rng.bit_generator.state))

    def load(self, folder: Path) -> None:
        self.backend.load(folder)
        self.rng.bit_generator.state = json.loads((Path(folder) / "sft_sampler.json").read_text())
