"""Training the reward model that hears (`vocalign.rewards.hearing_reward_model`).

    the policy (after SFT) -> HearingRewardModel (its encoder, adaptor, LM + a zero head)
    spoken arithmetic questions -> pairs of the synthetic kinds (preference_data.spoken_pairs)
    + the policy's own samples to some questions: a right answer over a wrong one
      (`samples`, made by the run: vocalign.rl.reward_model_stage.policy_sample_pairs)
    -> Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), AdamW on the LM and the head
    -> held-out pairwise accuracy per kind, on questions spoken in clips never trained on

The loop is our own rather than TRL's `RewardTrainer`: that trainer takes tokenized text
pairs and a `transformers` sequence classifier, while this model reads each question's
audio through the policy's encoder and packs prompt and response as the policy does. The
encoder is frozen, so each question's audio is encoded once and reused for every step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from vocalign.data.types import Prompt
from vocalign.model.policy import Policy

from .preference_data import PreferencePair

SAMPLES_KIND = "samples"  # a right answer the policy sampled over a wrong one it sampled


def _lr_at(lr: float, warmup: int, steps: int, step: int) -> float:
    """Linear warm-up, then a cosine decay to 0 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_hearing_reward_model(
    policy: Policy, pairs: Sequence[PreferencePair], *, steps: int, batch_size: int, lr: float, warmup_steps: int,
    seed: int, center: float = 0.01, logging_steps: int = 20, progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
):
    """A HearingRewardModel built from `policy` and trained on `pairs` (each with its prompt); returns
    (model, {"steps", "seconds", "final_loss"})."""
    from tqdm.auto import tqdm

    from vocalign.rewards.hearing_reward_model import HearingRewardModel

    if not pairs:
        raise ValueError("train_hearing_reward_model: no preference pairs to train on")
    missing = [p for p in pairs if p.prompt is None]
    if missing:
        raise ValueError(f"train_hearing_reward_model: {len(missing)} pairs have no spoken question (prompt); build "
                         "them with spoken_pairs or policy_sample_pairs")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = HearingRewardModel(policy)
    encoded = _encode_once(model, [p.prompt for p in pairs])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="reward model", disable=not progress, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    final_loss = math.nan
    for step in bar:
        model.train()
        idx = rng.integers(0, len(pairs), batch_size)
        part = [pairs[i] for i in idx]
        prompts = [p.prompt for p in part] * 2
        enc = [encoded[p.prompt.id] for p in part] * 2
        scores = model(prompts, [p.chosen for p in part] + [p.rejected for p in part], enc)
        chosen, rejected = scores[: len(part)], scores[len(part) :]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        margin = (chosen - rejected).detach()
        if center:
            loss = loss + center * ((chosen + rejected) ** 2).mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(lr, warmup_steps, steps, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        final_loss = float(loss.detach())
        window.append({"loss": final_loss, "accuracy": float((margin > 0).float().mean()),
                       "margin": float(margin.mean()), "grad_norm": grad_norm,
                       "learning_rate": optimizer.param_groups[0]["lr"]})
        if (step + 1) % logging_steps == 0 or step + 1 == steps:
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            window = []
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
            if on_log is not None:
                on_log(step + 1, row)
    model.eval()
    return model, {"steps": steps, "seconds": time.perf_counter() - started, "final_loss": final_loss}


def _encode_once(model, prompts: Sequence[Prompt], batch: int = 64) -> dict[str, list[torch.Tensor]]:
    """Each distinct prompt's encoded audio, by prompt id (the encoder is frozen)."""
    unique = list({p.id: p for p in prompts}.values())
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(unique), batch):
        part = unique[i : i + batch]
        for p, enc in zip(part, model.encode(part)):
            out[p.id] = enc
    return out


def hearing_pairwise_accuracy(model, pairs: Sequence[PreferencePair], batch_size: int = 64) -> dict[str, float]:
    """The share of pairs whose chosen response outscores the rejected one: `accuracy` and `accuracy/<kind>`."""
    if not pairs:
        raise ValueError("hearing_pairwise_accuracy: no pairs to evaluate")
    wins = []
    for i in range(0, len(pairs), batch_size):
        part = list(pairs[i : i + batch_size])
        chosen = model.score([p.prompt for p in part], [p.chosen for p in part])
        rejected = model.score([p.prompt for p in part], [p.rejected for p in part])
        wins += [c > r for c, r in zip(chosen, rejected)]
    result = {"accuracy": float(np.mean(wins))}
    for kind in dict.fromkeys(p.kind for p in pairs):
        result[f"accuracy/{kind}"] = float(np.mean([w for w, p in zip(wins, pairs) if p.kind == kind]))
    return result


def save_hearing_reward_model(model, folder: str | Path, meta: dict) -> Path:
    return model.save(folder, meta)
